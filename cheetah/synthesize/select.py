"""Editing-target selection (paper §2.2 step 1): which candidate does the frozen model ignore most?

The paper averages the Q-Former's cross-attention maps over all layers and all queries into one map over the
ViT patch grid, scores every object by the mean of that map inside its mask, and edits the least-attended
object. `AttentionSelector` does exactly that with a Hugging Face BLIP-2 backbone; `RandomSelector` scores
uniformly at random (an ablation).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image


class TargetSelector(Protocol):
    """Scores candidate masks on an image; the pipeline edits the LOWEST-scoring (least attended) one first."""

    def scores(self, image: Image.Image, masks: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """One score per mask (same order)."""
        ...


class RandomSelector:
    """Uniform random scores: target selection that ignores the model (ablation)."""

    def scores(self, image: Image.Image, masks: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        return rng.random(len(masks))


@contextlib.contextmanager
def _eager_attention(qformer: Any) -> Iterator[None]:
    """Fused attention kernels (sdpa) do not return attention weights; switch the Q-Former to eager meanwhile."""
    config = qformer.config
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


def qformer_attention_map(model: Any, image_processor: Any, image: Image.Image) -> np.ndarray:
    """The Q-Former's cross-attention, averaged over layers, heads and queries, at the image's pixel size.

    `model` is a Hugging Face `Blip2ForConditionalGeneration` or `InstructBlipForConditionalGeneration` (anything
    with `.vision_model`, `.qformer` and `.query_tokens`); `image_processor` turns a PIL image into `pixel_values`. Returns an (H, W) float array
    (it sums to about H*W/num_patches per patch: only the relative values matter).
    """
    import torch

    pixel_values = image_processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
    param = next(model.vision_model.parameters())
    pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
    with torch.no_grad(), _eager_attention(model.qformer):
        image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
        queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        extra = {}
        if getattr(model.config, "model_type", "") == "instructblip":
            # InstructBLIP's Q-Former also reads an instruction; an empty one leaves the queries alone, as in BLIP-2.
            extra["input_ids"] = torch.zeros((image_embeds.shape[0], 0), dtype=torch.long, device=param.device)
        out = model.qformer(
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=param.device),
            output_attentions=True,
            **extra,
        )
    cross = [a for a in (out.cross_attentions or ()) if a is not None]
    if not cross:
        raise RuntimeError("the Q-Former returned no cross-attention weights (is it a BLIP-2 Q-Former?)")
    # Each: (batch, heads, queries, 1 + patches). Average everything but the keys; drop the CLS key.
    attention = torch.stack([a.float().mean(dim=(1, 2)) for a in cross]).mean(dim=0)[0]
    patches = attention[1:]
    side = int(math.isqrt(patches.numel()))
    if side * side != patches.numel():
        raise RuntimeError(f"cannot lay {patches.numel()} vision patches out on a square grid")
    grid = patches.reshape(1, 1, side, side)
    # BLIP-style processors resize the whole image (no crop), so the patch grid spans the whole picture.
    full = torch.nn.functional.interpolate(grid, size=(image.height, image.width), mode="bilinear",
                                           align_corners=False)
    return full[0, 0].cpu().numpy()


class AttentionSelector:
    """Mean Q-Former cross-attention inside each mask (the paper's significance score Φ)."""

    def __init__(self, model: Any, image_processor: Any):
        self.model = model.eval()  # dropout on attention probabilities would make the choice random
        self.image_processor = image_processor

    def attention_map(self, image: Image.Image) -> np.ndarray:
        return qformer_attention_map(self.model, self.image_processor, image)

    def scores(self, image: Image.Image, masks: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        attention = self.attention_map(image)
        return np.array([float(attention[m].mean()) if m.any() else math.inf for m in masks])
