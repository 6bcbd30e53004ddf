"""The base stage's vision phase: a ViT that sees every object, and a Q-Former that keeps what captions say.

This is the part of EVA-CLIP pretraining and BLIP-2 stage 1 the embedded default has to do itself. `TagProbe` is the
supervision, thrown away afterwards:

- ViT: for each cell of the 3x3 grid, from the mean of the patch features whose centre lies in it, the size of its
  object ("none", large, small) and its shape, colour and texture — one head for objects of either size, so an
  attribute reads the same in a large and in a small object (as "red" does in a pretrained CLIP). The background's
  colour and texture from the mean patch. And every patch feature says which patch it is: the Q-Former's
  cross-attention sees features only, so without this it could not tell where an object is (with it, the visual
  prompt holds the large objects' cells; docs/miniature.md).
- Q-Former, the visual prompt (its learned queries): the caption's content only — the shape, colour, texture and
  cell of the (up to two) large objects, each from one query (the first two, in reading order; one head shared by
  both), and the background from the third. Nothing asks the visual prompt about the small objects, so it drops
  them: the caption bias of the paper's visual prompt generator.
- Q-Former, its layers: nine *reader* queries of the probe's own (one per cell, thrown away with it), run through
  the same Q-Former, read the cell's object of either size. BLIP-2's Q-Former is a general reader of the image
  features (a BERT trained on image-text matching and generation); what its learned queries extract is what
  captions say, but other queries — VPG-C's, guided by an instruction — can ask it for anything the ViT sees.
  Without the readers this Q-Former could not: new queries learned through it read the small objects at 22 %
  (chance), the large at 80 % (docs/miniature.md point 9), so no VPG-C could bring the details back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from cheetah.progress import StageBar
from cheetah.train.schedule import lr_lambda
from cheetah.world import CELLS, COLORS, SHAPES, SIZES, TEXTURES, Scene


class TagProbe(nn.Module):
    """The vision phase's targets and heads (see the module docstring)."""

    ATTRS = {"shape": len(SHAPES), "color": len(COLORS), "texture": len(TEXTURES)}
    IGNORE = -100  # cross_entropy's ignore_index: an attribute head says nothing about an empty cell

    def __init__(self, vit_dim: int, query_dim: int, num_queries: int, image_size: int, patch: int):
        super().__init__()
        if num_queries < 3:
            raise ValueError(f"the tag probe reads two objects and the background from 3 queries, got {num_queries}")
        grid = image_size // patch
        centres = torch.arange(grid) * patch + patch / 2
        span = grid * patch  # the pixels the patches cover
        cell = torch.tensor([min(int(3 * float(centres[r]) / span), 2) * 3 + min(int(3 * float(centres[c]) / span), 2)
                             for r in range(grid) for c in range(grid)])
        pool = torch.stack([(cell == k).float() / max(1, int((cell == k).sum())) for k in range(len(CELLS))])
        self.register_buffer("pool", pool)  # (9 cells, patches)
        self.where = nn.Linear(vit_dim, len(cell))
        attrs = sum(self.ATTRS.values())
        self.cell = nn.Linear(vit_dim, len(SIZES) + 1 + attrs)
        self.background = nn.Linear(vit_dim, len(COLORS) + len(TEXTURES))
        self.slot = nn.Linear(query_dim, attrs + len(self.ATTRS) + len(CELLS) + 1)
        self.caption_background = nn.Linear(query_dim, len(COLORS) + len(TEXTURES))
        self.readers = nn.Parameter(0.02 * torch.randn(len(CELLS), query_dim))
        self.read = nn.Linear(query_dim, len(SIZES) + 1 + attrs)

    @staticmethod
    def targets(scene: Scene) -> dict[str, torch.Tensor]:
        """`cells` (9, 4): size (0 = none, 1 + index), then shape, colour, texture of the cell's object (IGNORE in an
        empty cell); `slots` (2, 4): shape, colour, texture and cell of the large objects in reading order (0 = no
        such object, else 1 + index); `background` (2,): colour and texture."""
        cells = torch.full((len(CELLS), 4), TagProbe.IGNORE, dtype=torch.long)
        cells[:, 0] = 0
        slots = torch.zeros(2, 4, dtype=torch.long)
        for o in scene.objects:
            attrs = [SHAPES.index(o.shape), COLORS.index(o.color), TEXTURES.index(o.texture)]
            cells[CELLS.index(o.cell)] = torch.tensor([1 + SIZES.index(o.size), *attrs])
        for j, o in enumerate(sorted(scene.primary, key=lambda o: CELLS.index(o.cell))[:2]):
            slots[j] = 1 + torch.tensor([SHAPES.index(o.shape), COLORS.index(o.color), TEXTURES.index(o.texture),
                                         CELLS.index(o.cell)])
        background = torch.tensor([COLORS.index(scene.background_color), TEXTURES.index(scene.background_texture)])
        return {"cells": cells, "slots": slots, "background": background}

    @staticmethod
    def _split(logits: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
        bounds = np.cumsum([0, *widths])
        return [logits[..., bounds[j]:bounds[j + 1]] for j in range(len(widths))]

    def logits(self, patches: torch.Tensor, queries: torch.Tensor, readers: torch.Tensor
               ) -> dict[str, list[torch.Tensor]]:
        """The logits of every column of the targets, in their order: cells (B, 9, classes) x 4 from the ViT and
        from the reader queries' Q-Former output (`readers`, (B, 9, D)), slots (B, classes) x 8 (two objects) from
        the visual prompt (`queries`), and the background from the ViT and from the visual prompt, (B, classes) x 2
        each."""
        attrs = list(self.ATTRS.values())
        cells = self._split(self.cell(torch.einsum("kp,bpd->bkd", self.pool, patches)), [len(SIZES) + 1, *attrs])
        slot_widths = [n + 1 for n in (*attrs, len(CELLS))]
        slots = [x for j in range(2) for x in self._split(self.slot(queries[:, j]), slot_widths)]
        return {"cells": cells, "read": self._split(self.read(readers), [len(SIZES) + 1, *attrs]), "slots": slots,
                "background": self._split(self.background(patches.mean(1)), [len(COLORS), len(TEXTURES)]),
                "caption_background": self._split(self.caption_background(queries[:, 2]), [len(COLORS), len(TEXTURES)])}

    def loss(self, patches: torch.Tensor, queries: torch.Tensor, readers: torch.Tensor, t: dict[str, torch.Tensor]
             ) -> torch.Tensor:
        ce = nn.functional.cross_entropy
        out = self.logits(patches, queries, readers)
        loss = sum(ce(x.flatten(0, 1), t["cells"][..., j].flatten(), ignore_index=self.IGNORE)
                   for key in ("cells", "read") for j, x in enumerate(out[key]))
        patch = torch.arange(patches.shape[1], device=patches.device).repeat(patches.shape[0])
        loss = loss + ce(self.where(patches).flatten(0, 1), patch)
        slots = t["slots"].flatten(1)
        loss = loss + sum(ce(x, slots[:, j]) for j, x in enumerate(out["slots"]))
        for key in ("background", "caption_background"):
            loss = loss + sum(ce(x, t["background"][:, j]) for j, x in enumerate(out[key]))
        return loss


def qformer_output(model: Any, features: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
    """The backbone's visual prompt before the language projection: its queries over `features` (ViT output); or
    the Q-Former's output for other `queries` ((N, D))."""
    queries = (model.query_tokens if queries is None else queries.unsqueeze(0)).expand(features.shape[0], -1, -1)
    mask = torch.ones(features.shape[:2], dtype=torch.long)
    return model.qformer(query_embeds=queries, encoder_hidden_states=features,
                         encoder_attention_mask=mask).last_hidden_state


def train_vision(model: Any, probe: TagProbe, pixels: torch.Tensor, tags: list[dict[str, torch.Tensor]],
                 rng: np.random.Generator, *, steps: int, batch_size: int, lr: float, weight_decay: float,
                 warmup_steps: int, schedule: str = "cosine",
                 callback: Callable[[int, float], None] | None = None) -> list[float]:
    """The vision phase: the ViT, the Q-Former, its query tokens and `probe` learn the probe's targets (`tags`, one
    per image of `pixels`) with AdamW, warm-up and `schedule`; returns the loss of every step. `callback(step, loss)`
    after each step (it may evaluate: training mode is set again before every step). Leaves both in eval mode."""
    params = [*model.vision_model.parameters(), *model.qformer.parameters(), model.query_tokens, *probe.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps, steps, schedule))
    losses = []
    bar = StageBar("base: vision", steps, "steps")
    for step in range(steps):
        model.vision_model.train(), model.qformer.train()
        idx = rng.integers(len(pixels), size=batch_size)
        patches = model.vision_model(pixel_values=pixels[idx]).last_hidden_state
        loss = probe.loss(patches[:, 1:], qformer_output(model, patches), qformer_output(model, patches, probe.readers),
                          {k: torch.stack([tags[i][k] for i in idx]) for k in tags[0]})
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.update()
        if callback is not None:
            callback(step + 1, losses[-1])
    bar.close()
    model.vision_model.eval(), model.qformer.eval()
    return losses
