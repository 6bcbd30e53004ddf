"""Link 0 of the chain (docs/miniature.md): what the language model can say about a scene when its input names every
object — the scene given as object tokens (cheetah/train/world_examples.py) instead of pixels. The language stage
reports it for the language model alone, the base stage for the language model it ends with; and the held-out Yes/No
questions both stages (and `yes_no_accuracy` from pixels, cheetah/evaluate/backbone.py) ask.

A module of its own so that the language stage, whose output is committed and takes long to rebuild, depends on this
code and not on the base stage's measurements.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cheetah.evaluate.content import change_scores, content_summary
from cheetah.formats import IMAGE_TOKEN
from cheetah.model.prompts import position_ids_from_mask
from cheetah.train.world_examples import YES_NO_KINDS_ASKED, difference_example
from cheetah.world import PERCEPTION_KINDS, SIZES, Scene, yes_no_pair

YES_NO_SEED = 20_000  # the held-out questions' own stream, apart from the scenes' and the benchmarks'


def yes_no_questions(scenes: Sequence[Scene]) -> list[tuple[str, str, str, str, int]]:
    """(size, kind, question, truth, scene index): for every scene, size and kind, one question whose answer is Yes
    and one whose answer is No (`yes_no_pair`), from the held-out questions' own stream."""
    rng = np.random.default_rng([YES_NO_SEED, len(scenes)])
    asked = []
    for i, scene in enumerate(scenes):
        for size in SIZES:
            for kind in YES_NO_KINDS_ASKED:
                yes, no = yes_no_pair(scene, kind, rng, size=size)
                asked += [(size, kind, yes, "yes", i), (size, kind, no, "no", i)]
    return asked


def yes_no_summary(asked: list[tuple[str, str, str, str, int]], said: list[str]) -> dict[str, Any]:
    """Accuracy (%) per size (`primary`: large, `detail`: small) over PERCEPTION_KINDS, per kind, and the share of
    Yes answers (100 or 0: one constant answer)."""
    right = [s == a[3] for a, s in zip(asked, said, strict=True)]

    def pct(rows: list[int], of: list[bool]) -> float:
        return round(100.0 * float(np.mean([of[i] for i in rows])), 2)

    out: dict[str, Any] = {}
    for split, size in (("primary", "large"), ("detail", "small")):
        rows = [i for i, a in enumerate(asked) if a[0] == size]
        scored = [i for i in rows if asked[i][1] in PERCEPTION_KINDS]
        out[split] = {"accuracy": pct(scored, right), "n": len(scored),
                      "yes_share": pct(scored, [s == "yes" for s in said]),
                      "kinds": {k: pct([i for i in rows if asked[i][1] == k], right) for k in YES_NO_KINDS_ASKED}}
    return out


@torch.no_grad()
def object_token_yes_no(model: Any, builder: Any, tokens: Any, scenes: list[Scene], batch_size: int = 64
                        ) -> dict[str, Any]:
    """The held-out Yes/No questions answered from object tokens (`tokens`: cheetah.train.world_examples.
    ObjectTokens) instead of the visual prompt: Yes or No, whichever the language model scores higher as the first
    answer token. What the language model can say about a detail when its input names it."""
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
    return yes_no_summary(asked, said)


@torch.no_grad()
def object_token_differences(model: Any, builder: Any, tokens: Any, scenes: list[Scene], size: str = "small",
                             batch_size: int = 32, max_new_tokens: int = 32) -> dict[str, Any]:
    """Greedy difference descriptions of each scene beside one edit of one of its `size` objects, both given as
    object tokens, scored for content (cheetah/evaluate/content.py): whether the language model can describe a
    change to a detail when its input names every object."""

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
