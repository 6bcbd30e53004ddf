"""Filters (paper §2.2 step 3): keep an edited image only if the edit really shows.

`PixelFilter` is exact for rendered edits: enough pixels inside the edit region changed, and none outside it.
`ClipFilter` is the paper's check for real images: CLIP similarity between the edited region and the text of
the edit. Each returns None (keep) or a `Reject` with a short reason code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from PIL import Image

from cheetah.synthesize.common import Edit, Reject, local_dir


class EditFilter(Protocol):
    def check(self, before: Image.Image, after: Image.Image, edit: Edit) -> Reject | None:
        """None if the edited image is acceptable, else the reason it is not."""
        ...


class PixelFilter:
    """The edit must be visible inside its region and leave every pixel outside the region untouched."""

    def __init__(self, min_changed_fraction: float):
        self.min_changed_fraction = min_changed_fraction

    def check(self, before: Image.Image, after: Image.Image, edit: Edit) -> Reject | None:
        a, b = np.asarray(before.convert("RGB")), np.asarray(after.convert("RGB"))
        if a.shape != b.shape:
            return Reject("size_changed",
                          f"edited image is {b.shape[1]}x{b.shape[0]}, original {a.shape[1]}x{a.shape[0]}")
        changed = np.any(a != b, axis=-1)
        x0, y0, x1, y1 = edit.region
        inside = int(changed[y0:y1, x0:x1].sum())
        outside = int(changed.sum()) - inside
        if outside:
            return Reject("changed_outside_region", f"{outside} pixels changed outside the region {edit.region}")
        fraction = inside / ((x1 - x0) * (y1 - y0))
        if fraction < self.min_changed_fraction:
            return Reject("edit_not_visible", f"{fraction:.3f} of the region {edit.region} changed, "
                                              f"below min_changed_fraction={self.min_changed_fraction}")
        return None


class Clip:
    """A CLIP model loaded from a local directory: image-text cosine similarities."""

    def __init__(self, path: str | None, setting: str = "synthesize.clip_dir", device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        directory = local_dir(path, setting)
        self.device = device
        self.model = CLIPModel.from_pretrained(directory, local_files_only=True).eval().to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.image_processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True)

    def similarity(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """(len(images), len(texts)) cosine similarities."""
        import torch

        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            img = self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))
            txt = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                               attention_mask=tokens["attention_mask"].to(self.device))
        img = getattr(img, "pooler_output", img)  # some versions wrap the projected features in an output object
        txt = getattr(txt, "pooler_output", txt)
        img = torch.nn.functional.normalize(img.float(), dim=-1)
        txt = torch.nn.functional.normalize(txt.float(), dim=-1)
        return (img @ txt.T).cpu().numpy()

    def label(self, image: Image.Image, mask: np.ndarray, labels: Sequence[str]) -> str:
        """Zero-shot name for the object under `mask`: the label whose 'a photo of a …' text matches best."""
        crop = crop_region(image, mask)
        sims = self.similarity([crop], [f"a photo of a {label}" for label in labels])[0]
        return labels[int(np.argmax(sims))]


def crop_region(image: Image.Image, mask: np.ndarray, min_side: int = 8) -> Image.Image:
    """The bounding box of `mask`, grown to at least `min_side` pixels so tiny objects keep some context."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    grow_x, grow_y = max(0, min_side - (x1 - x0)), max(0, min_side - (y1 - y0))
    x0, x1 = max(0, x0 - grow_x // 2), min(image.width, x1 + (grow_x + 1) // 2)
    y0, y1 = max(0, y0 - grow_y // 2), min(image.height, y1 + (grow_y + 1) // 2)
    return image.crop((x0, y0, x1, y1))


class ClipFilter:
    """The edited region must match the text of the edit: cosine similarity >= `min_similarity`."""

    def __init__(self, clip: Clip, min_similarity: float):
        self.clip = clip
        self.min_similarity = min_similarity

    def check(self, before: Image.Image, after: Image.Image, edit: Edit) -> Reject | None:
        similarity = float(self.clip.similarity([crop_region(after, edit.mask)], [edit.prompt])[0, 0])
        if similarity < self.min_similarity:
            return Reject("clip_low_similarity", f"CLIP similarity {similarity:.3f} between the edited region and "
                                                 f"{edit.prompt!r} is below {self.min_similarity}")
        return None
