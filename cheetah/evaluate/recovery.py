"""What VPG-C brings back, on the embedded world: links 4 and 5 of the chain docs/miniature.md measures.

- `correction_probe`: the representation probe (cheetah/evaluate/probes.py) on what VPG-C adds to the first image's
  tokens of a two-image difference prompt — the re-queried, instruction-guided Q-Former output after its
  projections — against the same probe on the visual prompt (metrics/base.json `probe.qformer_*`).
- `heldout_differences`: the content of a model's difference descriptions (cheetah/evaluate/content.py) on the
  synthetic pairs training held out (`train.heldout_fraction`, the split `ExampleFile.split` makes).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cheetah.evaluate.probes import linear_probe, object_targets
from cheetah.model.prompts import position_ids_from_mask
from cheetah.world import DIFFERENCE_INSTRUCTIONS, SIZES, Scene, edit_scene, render

PROBE_INSTRUCTION = DIFFERENCE_INSTRUCTIONS[0]
"""The instruction the correction is probed under: the synthetic pairs' first one."""


@torch.no_grad()
def correction_features(model: Any, builder: Any, scenes: Sequence[Scene], seed: int, batch_size: int = 64
                        ) -> torch.Tensor:
    """(scenes, queries, H): what VPG-C adds to the tokens of each scene's image, shown first beside one random edit
    of it (a small object, as in the benchmarks) under PROBE_INSTRUCTION. A zero-initialised VPG-C adds zeros."""
    rng = np.random.default_rng(seed)
    processor = model.backbone_info.image_processor
    out = []
    for start in range(0, len(scenes), batch_size):
        part = scenes[start:start + batch_size]
        images = [im for s in part for im in (render(s).image, render(edit_scene(s, rng)[0]).image)]
        batch = builder.collate([builder.encode(PROBE_INSTRUCTION, 2) for _ in part], "right")
        pixels = processor(images, return_tensors="pt")["pixel_values"]
        inputs, injection = model.prepare_inputs(batch["input_ids"], pixels, image_counts=batch["image_counts"],
                                                 guide_positions=batch["guide_positions"])
        hidden = model.language_model.get_decoder()(
            inputs_embeds=inputs, attention_mask=batch["attention_mask"], output_hidden_states=True,
            position_ids=position_ids_from_mask(batch["attention_mask"])).hidden_states[model.update_layer]
        out.append(model.correction(hidden, injection)[0::2].float())  # the first image of every pair
    return torch.cat(out)


def correction_probe(model: Any, builder: Any, fit: Sequence[Scene], test: Sequence[Scene], seed: int = 0
                     ) -> dict[str, dict[str, float]]:
    """`vpgc_large`, `vpgc_small`: held-out accuracy (%) of the probe reading the objects of each size from what
    VPG-C adds (`correction_features`), fitted on `fit`, scored on `test`."""
    fit_features = correction_features(model, builder, fit, seed)
    test_features = correction_features(model, builder, test, seed + 1)
    return {f"vpgc_{size}": linear_probe(fit_features, object_targets(fit, size), test_features,
                                         object_targets(test, size)) for size in SIZES}


def heldout_pairs(data_dir: str | Path, fraction: float) -> list[Any]:
    """The synthetic pairs (cheetah.train.data.Example) that training holds out at `fraction`."""
    from cheetah.formats import SYNTHETIC_PAIRS
    from cheetah.train.data import ExampleFile

    pairs = ExampleFile(Path(data_dir) / SYNTHETIC_PAIRS)
    _, held = pairs.split(fraction)
    return [pairs.example(int(i)) for i in held]


def heldout_differences(generator: Any, pairs: Sequence[Any]) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """(content summary, answers): the generator's difference descriptions of `pairs`, scored for content."""
    from cheetah.evaluate.content import change_scores, content_summary
    from cheetah.evaluate.generation import Request

    answers = generator.answer([Request(p.instruction, list(p.images), key=p.id) for p in pairs])
    rows = [change_scores(a, p.response) for a, p in zip(answers, pairs, strict=True)]
    return content_summary(rows), [{"id": p.id, "truth": p.response, "answer": a} for p, a in zip(pairs, answers)]
