"""Applying an edit (paper §2.2 step 3): produce the edited image.

`WorldApplier` re-renders the edited scene graph (the world's stand-in for Blended Diffusion): exact, and
identical to the original outside the changed object. `InpaintApplier` runs a diffusers inpainting pipeline
from a local directory inside the edit mask and then blends, as Blended Diffusion does: the result keeps every
original pixel outside the mask exactly.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from PIL import Image

from cheetah.synthesize.common import Edit, Reject, SourceItem, local_dir
from cheetah.world.render import render


class Applier(Protocol):
    def apply(self, image: Image.Image, item: SourceItem, edit: Edit, rng: np.random.Generator) -> Image.Image:
        """The edited image, same size as `image`."""
        ...


class WorldApplier:
    def apply(self, image: Image.Image, item: SourceItem, edit: Edit, rng: np.random.Generator) -> Image.Image:
        if edit.scene is None:
            raise Reject("no_scene_graph", "the world renderer needs an edited scene graph (use masks: world)")
        return render(edit.scene).image


def blend(original: Image.Image, generated: Image.Image, mask: np.ndarray) -> Image.Image:
    """`generated` inside `mask`, `original` everywhere else (pixel-exact outside the mask)."""
    a = np.asarray(original.convert("RGB"))
    b = np.asarray(generated.convert("RGB").resize(original.size, Image.Resampling.BICUBIC))
    return Image.fromarray(np.where(mask[..., None], b, a).astype(np.uint8), "RGB")


class InpaintApplier:
    """A diffusers inpainting pipeline (e.g. Stable Diffusion inpainting) loaded from a local directory.

    The image is resized to a multiple of 8 (what the VAE needs), inpainted inside the edit mask with the edit's
    prompt, resized back, and blended into the original with the mask. The diffusion noise is seeded from the
    sample's generator, so a sample is reproducible on the same machine and library versions.
    """

    def __init__(self, path: str | None, steps: int = 25, guidance: float = 7.5, device: str = "cpu"):
        from diffusers import AutoPipelineForInpainting

        directory = local_dir(path, "synthesize.inpaint_dir")
        self.pipe = AutoPipelineForInpainting.from_pretrained(directory, local_files_only=True,
                                                              safety_checker=None).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.steps, self.guidance = steps, guidance

    def apply(self, image: Image.Image, item: SourceItem, edit: Edit, rng: np.random.Generator) -> Image.Image:
        import torch

        w, h = (max(8, round(v / 8) * 8) for v in image.size)
        mask_image = Image.fromarray(edit.mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
        # A CPU generator: the same noise on any device (diffusers draws it on the CPU and moves it).
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        out = self.pipe(
            prompt=edit.prompt, image=image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC),
            mask_image=mask_image, height=h, width=w, num_inference_steps=self.steps,
            guidance_scale=self.guidance, generator=generator, output_type="np",
        ).images[0]
        generated = Image.fromarray((np.clip(out, 0, 1) * 255).round().astype(np.uint8), "RGB")
        return blend(image, generated, edit.mask)
