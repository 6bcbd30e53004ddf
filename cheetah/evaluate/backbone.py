"""What the embedded backbone knows, on held-out scenes: the numbers `metrics/base.json` reports.

- `representation_probes`: what the ViT features and the visual prompt (the Q-Former's output) hold about the large
  and the small objects (cheetah/evaluate/probes.py): links 1 and 2 of the chain docs/miniature.md measures.
- `caption_quality`: greedy captions against their references.
- `yes_no_accuracy`: greedy MME-style Yes/No answers about the large objects (what captions cover) and the small ones.
- the same questions, and descriptions of an edit, answered from object tokens instead of pixels (link 0):
  cheetah/evaluate/object_tokens.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cheetah.evaluate.object_tokens import yes_no_questions, yes_no_summary
from cheetah.evaluate.probes import linear_probe, object_targets
from cheetah.formats import IMAGE_TOKEN
from cheetah.world import CAPTION_PROMPTS, SIZES, Scene, caption, render
from cheetah.world.language import CAPTION_TEMPLATES



def scene_pixels(scenes: Sequence[Scene], image_processor: Any) -> torch.Tensor:
    """The rendered scenes as the backbone's `pixel_values`."""
    return image_processor([render(s).image for s in scenes], return_tensors="pt")["pixel_values"]


@torch.no_grad()
def vision_features(model: Any, pixels: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(ViT output, Q-Former output) of a BLIP-2 backbone model for `pixels`: the tokens the Q-Former reads and the
    visual prompt before the language projection."""
    from cheetah.train.vision import qformer_output

    vit, prompt = [], []
    for i in range(0, len(pixels), batch):
        features = model.vision_model(pixel_values=pixels[i:i + batch]).last_hidden_state
        vit.append(features)
        prompt.append(qformer_output(model, features))
    return torch.cat(vit), torch.cat(prompt)


def representation_probes(model: Any, image_processor: Any, fit: Sequence[Scene], test: Sequence[Scene]
                          ) -> dict[str, dict[str, float]]:
    """`vit_large`, `vit_small`, `qformer_large`, `qformer_small`: held-out accuracy (%) of `linear_probe` reading
    the shape, colour and texture of the objects of each size from the ViT's tokens and from the visual prompt,
    fitted on the scenes `fit`, scored on `test`."""
    fit_features = vision_features(model, scene_pixels(fit, image_processor))
    test_features = vision_features(model, scene_pixels(test, image_processor))
    out = {}
    for size in SIZES:
        targets = object_targets(fit, size), object_targets(test, size)
        for j, name in enumerate(("vit", "qformer")):
            out[f"{name}_{size}"] = linear_probe(fit_features[j], targets[0], test_features[j], targets[1])
    return out


@torch.no_grad()
def caption_quality(backbone: Any, scenes: list[Scene], images: list[Any] | None = None, batch_size: int = 32,
                    max_new_tokens: int = 32) -> dict:
    """Greedy captions of held-out scenes against their reference captions: exact match and ROUGE-L F (%).
    `images`: the scenes' renders, where the caller has them."""
    from cheetah.evaluate.generation import Generator, Request
    from cheetah.evaluate.scoring import rouge_l
    from cheetah.model.vpgc import VPGCModel

    model = VPGCModel(backbone)  # zero-initialised VPG-C: exactly the backbone
    generator = Generator(model, batch_size=batch_size, max_new_tokens=max_new_tokens)
    images = images or [render(s).image for s in scenes]
    answers = generator.answer([Request(CAPTION_PROMPTS[0], [image]) for image in images])
    model.detach_from_backbone()
    # A scene has one caption per template ("a picture of …", "an image of …"); any of them is right.
    refs = [[caption(s, t) for t in range(len(CAPTION_TEMPLATES))] for s in scenes]
    exact = float(np.mean([a.strip() in r for a, r in zip(answers, refs)])) * 100
    rouge = float(np.mean([max(rouge_l(a, x) for x in r) for a, r in zip(answers, refs)])) * 100
    examples = [{"reference": r[0], "generated": a} for r, a in list(zip(refs, answers))[:5]]
    return {"caption_exact_match": exact, "caption_rouge_l": rouge, "examples": examples, "n": len(scenes)}


@torch.no_grad()
def yes_no_accuracy(backbone: Any, scenes: list[Scene], images: list[Any] | None = None,
                    batch_size: int = 32) -> dict[str, Any]:
    """Accuracy (%) of greedy Yes/No answers about held-out scenes (`yes_no_questions`), parsed with the official
    MME rule: `primary` asks about the large objects (what captions cover), `detail` about the small ones no caption
    mentions, where a caption-trained model should be near chance. `accuracy` is over PERCEPTION_KINDS (existence,
    colour, shape, texture, count); `position` is reported per kind beside it. `images`: the scenes' renders,
    where the caller has them."""
    from cheetah.evaluate.generation import Generator, Request
    from cheetah.evaluate.scoring import parse_yes_no
    from cheetah.model.vpgc import VPGCModel

    images = images or [render(s).image for s in scenes]
    asked = yes_no_questions(scenes)
    model = VPGCModel(backbone)  # zero-initialised VPG-C: exactly the backbone
    generator = Generator(model, batch_size=batch_size, max_new_tokens=4)
    answers = generator.answer([Request(f"{IMAGE_TOKEN} {q}", [images[i]]) for _, _, q, _, i in asked])
    model.detach_from_backbone()
    out = yes_no_summary(asked, [parse_yes_no(a) for a in answers])
    out["examples"] = [{"question": q, "truth": t, "answer": a} for (_, _, q, t, _), a in list(zip(asked, answers))[:12]]
    return out
