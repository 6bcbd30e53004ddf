"""What the embedded backbone knows, on held-out scenes: the numbers `metrics/base.json` reports.

- `representation_probes`: what the ViT features and the visual prompt (the Q-Former's output) hold about the large
  and the small objects (cheetah/evaluate/probes.py): links 1 and 2 of the chain docs/miniature.md measures.
- `caption_quality`: greedy captions against their references.
- `yes_no_accuracy`: greedy MME-style Yes/No answers about the large objects (what captions cover) and the small ones.
- `object_token_yes_no`, `object_token_differences`: the same questions, and descriptions of a small edit, answered
  from object tokens (every object named, cheetah/train/world_examples.py) instead of pixels: whether the language
  model can talk about a detail when its input holds it (link 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cheetah.evaluate.probes import linear_probe, object_targets
from cheetah.formats import IMAGE_TOKEN
from cheetah.world import CAPTION_PROMPTS, PERCEPTION_KINDS, SIZES, Scene, caption, render, yes_no_pair
from cheetah.world.language import CAPTION_TEMPLATES

YES_NO_SEED = 20_000  # the held-out questions' own stream, apart from the scenes' and the benchmarks'


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


def yes_no_questions(scenes: Sequence[Scene]) -> list[tuple[str, str, str, str, int]]:
    """(size, kind, question, truth, scene index): for every scene, size and kind, one question whose answer is Yes
    and one whose answer is No (`yes_no_pair`), from the held-out questions' own stream."""
    from cheetah.train.world_examples import YES_NO_KINDS_ASKED

    rng = np.random.default_rng([YES_NO_SEED, len(scenes)])
    asked = []
    for i, scene in enumerate(scenes):
        for size in SIZES:
            for kind in YES_NO_KINDS_ASKED:
                yes, no = yes_no_pair(scene, kind, rng, size=size)
                asked += [(size, kind, yes, "yes", i), (size, kind, no, "no", i)]
    return asked


def _yes_no_summary(asked: list[tuple[str, str, str, str, int]], said: list[str]) -> dict[str, Any]:
    """Accuracy (%) per size (`primary`: large, `detail`: small) over PERCEPTION_KINDS, per kind, and the share of
    Yes answers (100 or 0: one constant answer)."""
    from cheetah.train.world_examples import YES_NO_KINDS_ASKED

    right = [s == a[3] for a, s in zip(asked, said, strict=True)]

    def pct(rows: list[int], of: list[bool]) -> float:
        return round(100.0 * float(np.mean([of[i] for i in rows])), 2)

    out: dict[str, Any] = {}
    for split, size in (("primary", "large"), ("detail", "small")):
        rows = [i for i, a in enumerate(asked) if a[0] == size]
        scored = [i for i in rows if asked[i][1] in PERCEPTION_KINDS]
        out[split] = {"accuracy": pct(scored, right), "n": len(scored), "yes_share": pct(scored, [s == "yes" for s in said]),
                      "kinds": {k: pct([i for i in rows if asked[i][1] == k], right) for k in YES_NO_KINDS_ASKED}}
    return out


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
    out = _yes_no_summary(asked, [parse_yes_no(a) for a in answers])
    out["examples"] = [{"question": q, "truth": t, "answer": a} for (_, _, q, t, _), a in list(zip(asked, answers))[:12]]
    return out


@torch.no_grad()
def object_token_yes_no(model: Any, builder: Any, tokens: Any, scenes: list[Scene], batch_size: int = 64
                        ) -> dict[str, Any]:
    """The held-out Yes/No questions answered from object tokens (`tokens`: cheetah.train.world_examples.
    ObjectTokens) instead of the visual prompt: Yes or No, whichever the language model scores higher as the first
    answer token. What the language model can say about a detail when its input names it."""
    from cheetah.model.vpgc import position_ids_from_mask

    asked = yes_no_questions(scenes)
    yes_no = [builder.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No")]
    rng = np.random.default_rng(YES_NO_SEED)
    embedding = model.get_input_embeddings()
    said = []
    for start in range(0, len(asked), batch_size):
        part = asked[start:start + batch_size]
        batch = builder.collate([builder.encode(f"{IMAGE_TOKEN} {q}", 1) for _, _, q, _, _ in part], "left")
        mask = (batch["input_ids"] == model.config.image_token_index).unsqueeze(-1)
        inputs = embedding(batch["input_ids"]).masked_scatter(
            mask, tokens.embed([scenes[i] for *_, i in part], embedding.weight, rng))
        logits = model.language_model(inputs_embeds=inputs, attention_mask=batch["attention_mask"],
                                      position_ids=position_ids_from_mask(batch["attention_mask"])).logits[:, -1]
        said += ["yes" if y > n else "no" for y, n in logits[:, yes_no].tolist()]
    return _yes_no_summary(asked, said)


@torch.no_grad()
def object_token_differences(model: Any, builder: Any, tokens: Any, scenes: list[Scene], size: str = "small",
                             batch_size: int = 32, max_new_tokens: int = 32) -> dict[str, Any]:
    """Greedy difference descriptions of each scene beside one edit of one of its `size` objects, both given as
    object tokens, scored for content (cheetah/evaluate/content.py): whether the language model can describe a
    change to a detail when its input names every object."""
    from cheetah.evaluate.content import change_scores, content_summary
    from cheetah.model.vpgc import position_ids_from_mask
    from cheetah.train.world_examples import difference_example

    rng = np.random.default_rng([YES_NO_SEED, 1, len(scenes)])
    asked = [difference_example(s, rng, size) for s in scenes]
    embedding = model.get_input_embeddings()
    answers = []
    for start in range(0, len(asked), batch_size):
        part = asked[start:start + batch_size]
        batch = builder.collate([builder.encode(e.instruction, 2) for e in part], "left")
        mask = (batch["input_ids"] == model.config.image_token_index).unsqueeze(-1)
        shown = torch.cat([tokens.embed(e.scenes, embedding.weight, rng) for e in part])
        inputs = embedding(batch["input_ids"]).masked_scatter(mask, shown)
        out = model.language_model.generate(inputs_embeds=inputs, attention_mask=batch["attention_mask"],
                                            max_new_tokens=max_new_tokens, do_sample=False,
                                            pad_token_id=builder.tokenizer.pad_token_id)
        answers += [a.split(builder.template.end)[0] if builder.template.end else a
                    for a in builder.tokenizer.batch_decode(out, skip_special_tokens=True)]
    out = content_summary([change_scores(a, e.response) for a, e in zip(answers, asked)])
    out["examples"] = [{"truth": e.response, "answer": a} for e, a in list(zip(asked, answers))[:4]]
    return out
