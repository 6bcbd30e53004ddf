"""The base stage of the embedded default: pretrain the `tiny` backbone into a caption-trained multimodal LLM.

This plays the part of the frozen BLIP-2-family model of the paper, and is trained the way such a model is built:

1. **Vision** (the part of EVA-CLIP pretraining and BLIP-2 stage 1). The ViT learns to see *everything* — a tag
   probe on its patch features predicts, cell by cell, the size, shape, colour and texture of every object, small
   details included — while the Q-Former learns, from the same features, only what a *caption* says: the large
   objects and the background. So the details are in the ViT features but the visual prompt drops them: the
   caption bias VPG-C exists to correct. The probes are thrown away afterwards.
2. **Alignment** (BLIP-2 stage 2 / MiniGPT-4). ViT and Q-Former frozen, the projection and the language model
   learn from captions, single-image questions about the primary content (Yes/No included), two-image prompts
   (describe the named image; describe the difference when one *large* object was edited), plus text-only
   instructions that teach the language model every answer form of the world (difference sentences about any
   object, attributes of details, Yes/No about a caption given in the text) — as an instruction-tuned LLM knows them
   before it is given eyes. So the base compares two images on what captions cover and names the large object; a
   change to a small detail is what it misses, and what VPG-C, trained on the synthetic pairs, must recover.

Starting the language model on images straight from random weights does not work at this scale: it learns the
language long before it learns to read the image tokens (tests on this machine: no grounding after 600 steps),
whereas with a pretrained vision side it reads them within a few hundred steps.

Output: a backbone directory (weights, tokenizer trained on the world's language, image processor) that
`cheetah.model.backbones.load_backbone` reads like any real checkpoint, and `metrics/base.json` with the
held-out captioning quality.

That is `base.init: pretrain`. The stage is the pipeline's one source of the backbone at every scale
(`base_stage`): with `init: checkpoint` it brings a real checkpoint directory (e.g. the official Vicuna-7B release
after `cheetah model import`) into `base.out`, so DVC versions the exact weights later stages read; with
`init: random` it saves a preset's shapes with random weights (the CPU test of the real-scale path, and planning).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from cheetah.config import ConfigError, Params
from cheetah.formats import IMAGE_TOKEN, SOURCE_CAPTIONS, SOURCE_SCENES, read_records, source_problem
from cheetah.io import (DataError, atomic_dir, atomic_write_json, check_output, read_json, safe_join,
                        write_metrics)
from cheetah.model.backbones import BACKBONE_KIND, build_backbone, load_backbone, save_backbone
from cheetah.model.prompts import PromptBuilder
from cheetah.train.data import load_pixels
from cheetah.train.vpgc import lr_lambda
from cheetah.world import (
    CAPTION_PROMPTS,
    CELLS,
    COLORS,
    DIFFERENCE_INSTRUCTIONS,
    EDIT_TYPES,
    PERCEPTION_KINDS,
    QA,
    SHAPES,
    SIZES,
    TEXTURES,
    Scene,
    caption,
    difference_sentence,
    edit_scene,
    heldout_scenes,
    questions,
    read_scenes,
    render,
    sample_question,
    train_tokenizer,
    yes_no_pair,
)
from cheetah.world.language import CAPTION_TEMPLATES

log = logging.getLogger(__name__)

PRIMARY_KINDS = ("color", "shape", "texture", "position", "background")
# The Yes/No questions the base is measured on: what captions cover (PERCEPTION_KINDS), and where it is.
YES_NO_KINDS_ASKED = (*PERCEPTION_KINDS, "position")
YES_NO_SEED = 20_000  # the held-out questions' own stream, apart from the scenes' and the benchmarks'


def primary_questions(scene: Scene) -> list[QA]:
    """Questions about what the caption covers: the large objects, their number, and the background."""
    return [qa for qa in questions(scene)
            if qa.kind == "background" or (qa.kind in PRIMARY_KINDS + ("count",) and " large " in f" {qa.question} ")]


def _image_examples(source: Path, records: list[dict[str, Any]], scenes: dict[str, Scene],
                    seed: int) -> tuple[list[Path], list[tuple[int, str, str]]]:
    """(image paths, [(image index, instruction, response)]): captions and primary-content questions, Yes/No ones
    included (more Yes/No questions are drawn afresh every step: `_yes_no_examples`)."""
    rng = np.random.default_rng(seed)
    paths, examples = [], []
    for i, rec in enumerate(records):
        paths.append(safe_join(source, rec["image"], what=f"{source / SOURCE_CAPTIONS} (id {rec['id']!r}): image"))
        prompt = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
        examples.append(((i,), prompt, rec["caption"]))
        scene = scenes[rec["id"]]
        for qa in primary_questions(scene):
            examples.append(((i,), f"<image> {qa.question}", qa.answer))
        for kind in YES_NO_KINDS_ASKED:  # yes/no questions, about the primary objects only
            yes, no = yes_no_pair(scene, kind, rng, size="large")
            examples += [((i,), f"<image> {yes}", "Yes"), ((i,), f"<image> {no}", "No")]
    # Two-image prompts whose answer is a caption of the image the instruction names: with the difference examples
    # (`_difference_examples`), the instruction, not the number of images, decides what the answer is about.
    for i, rec in enumerate(records):
        j = int(rng.integers(len(records)))
        which, k = (("first", i), ("second", j))[int(rng.integers(2))]
        examples.append(((i, j), f"<image> <image> Describe the {which} image briefly.", records[k]["caption"]))
    return paths, examples


def _yes_no_examples(scenes: list[Scene], n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """(image indices, [(instruction, "Yes" | "No")]): `n` Yes/No questions about the large objects of random images
    of `scenes` (MME's form, `yes_no_pair`), a kind of YES_NO_KINDS_ASKED each, drawn afresh for every step. The
    fixed pairs of `_image_examples` alone are learned by heart: with a batch of them beside the mix, the held-out
    accuracy stayed near 71 % while the training images' counts reached 100 %; fresh questions reach ~85 %
    (docs/base.md point 7)."""
    images = rng.integers(len(scenes), size=n)
    asked = []
    for i in images:
        kind = YES_NO_KINDS_ASKED[int(rng.integers(len(YES_NO_KINDS_ASKED)))]
        pair = yes_no_pair(scenes[i], kind, rng, size="large")
        k = int(rng.integers(2))
        asked.append((f"{IMAGE_TOKEN} {pair[k]}", ("Yes", "No")[k]))
    return images, asked


def _difference_examples(records: list[dict[str, Any]], scenes: dict[str, Scene], first_index: int,
                         rng: np.random.Generator) -> tuple[list[Scene], list[tuple[tuple[int, int], str, str]]]:
    """(edited scenes, [((image, edited image), instruction, difference sentence)]): every record's scene beside one
    edit of one of its *large* objects (the edited scenes are rendered in memory; their image indices count from
    `first_index`). An instruction-tuned base compares what captions cover; the small details it misses are VPG-C's
    to recover. The instruction comes after the images or before them (the DEMON layout), so the instruction, not the
    layout, decides the answer's form."""
    edited, examples = [], []
    for i, rec in enumerate(records):
        scene, sentence = edit_scene(scenes[rec["id"]], rng, size="large")
        instruction = DIFFERENCE_INSTRUCTIONS[int(rng.integers(len(DIFFERENCE_INSTRUCTIONS)))]
        if rng.random() < 0.5:
            images, _, ask = instruction.rpartition(IMAGE_TOKEN)
            instruction = f"{ask.strip()} {images}{IMAGE_TOKEN}"
        examples.append(((i, first_index + len(edited)), instruction, sentence))
        edited.append(scene)
    return edited, examples


def _read_source(source: Path) -> tuple[list[dict[str, Any]], dict[str, Scene]]:
    """The corpus' caption records and the scene graph of every one of them (the base stage learns from both)."""
    records = [rec for _, rec in read_records(source / SOURCE_CAPTIONS, source_problem)]
    scenes = read_scenes(source / SOURCE_SCENES)
    missing = [r["id"] for r in records if r["id"] not in scenes]
    if missing:
        raise DataError(f"{source / SOURCE_SCENES}: no scene graph for image id(s) {missing[:5]} (the base stage "
                        "learns from the world's scene graphs)")
    return records, scenes


def _chat_examples(scenes: list[Scene], rng: np.random.Generator) -> list[tuple[str, str]]:
    """Text-only instruction data for the language model: (instruction, response) pairs about scenes it does not
    see. It learns the *form* of every answer the world asks for — difference sentences, attribute answers,
    Yes/No — and the language of the details, as an instruction-tuned LLM knows them before it is given eyes;
    which object and which attribute is right can only come from the visual prompt."""
    pairs = []
    for scene in scenes:
        objects = list(scene.objects)
        o = objects[int(rng.integers(len(objects)))].attrs()
        edit = EDIT_TYPES[int(rng.integers(len(EDIT_TYPES)))]
        new = {**o, "color": COLORS[int(rng.integers(len(COLORS)))], "shape": SHAPES[int(rng.integers(len(SHAPES)))]}
        before, after = {"modify": (o, {**o, "color": new["color"]}), "swap": (o, new), "delete": (o, None),
                         "add": (None, {**new, "size": "small"})}[edit]
        if edit == "modify" and new["color"] == o["color"]:
            before, after = o, None
            edit = "delete"
        instruction = DIFFERENCE_INSTRUCTIONS[int(rng.integers(len(DIFFERENCE_INSTRUCTIONS)))]
        pairs.append((_without_images(instruction), difference_sentence(edit, before, after)))
        qa = sample_question(scene, rng)
        pairs.append((qa.question, qa.answer))
        # Reading comprehension: Yes/No questions answered from a caption given in the text, as an instruction-tuned
        # LLM answers them before it is given eyes (without the caption the answer would be a coin flip).
        kind = PERCEPTION_KINDS[int(rng.integers(len(PERCEPTION_KINDS)))]
        yes, no = yes_no_pair(scene, kind, rng, size="large")
        context = f"Caption: {caption(scene)}."
        pairs += [(f"{context} {yes}", "Yes"), (f"{context} {no}", "No")]
    return pairs


def _without_images(text: str) -> str:
    return " ".join(text.replace(IMAGE_TOKEN, " ").split())


class TagProbe(nn.Module):
    """Supervision for the vision phase, discarded afterwards.

    - ViT: for each of the 3x3 cells, from the mean of the patch features whose centre lies in the cell: its
      object's size or "none", and the shape, colour and texture of a large and of a small object in separate heads
      (so the many hard small shapes do not hold the large ones back); the background colour and texture from the
      mean patch.
    - Q-Former: the caption's content only — shape, colour and texture of the (up to two) large objects, each from
      one query (the first two; one head shared by both, so an object reads the same in either), and the background
      from the third. The two object queries are matched to the objects in whichever order fits best (the loss is
      the smaller of the two assignments), as there is no natural order to put them in. One object per visual
      token: the form of visual prompt docs/base.md measures the language model on.
    """

    ATTRS = {"shape": len(SHAPES), "color": len(COLORS), "texture": len(TEXTURES)}
    IGNORE = -100  # cross_entropy's ignore_index: a head says nothing about a cell without an object of its size

    def __init__(self, vit_dim: int, query_dim: int, num_queries: int, image_size: int, patch: int):
        super().__init__()
        grid = image_size // patch
        centres = torch.arange(grid) * patch + patch / 2
        span = grid * patch  # the pixels the patches cover
        cell = [min(int(3 * float(centres[r]) / span), 2) * 3 + min(int(3 * float(centres[c]) / span), 2)
                for r in range(grid) for c in range(grid)]
        cell = torch.tensor(cell)
        pool = torch.stack([(cell == k).float() / max(1, int((cell == k).sum())) for k in range(len(CELLS))])
        self.register_buffer("pool", pool)  # (9 cells, patches)
        attrs = sum(self.ATTRS.values())
        self.cell = nn.Linear(vit_dim, len(SIZES) + 1 + len(SIZES) * attrs)
        self.background = nn.Linear(vit_dim, len(COLORS) + len(TEXTURES))
        if num_queries < 3:
            raise ValueError(f"the tag probe reads two objects and the background from 3 queries, got {num_queries}")
        self.slot = nn.Linear(query_dim, attrs + len(self.ATTRS))
        self.caption_background = nn.Linear(query_dim, len(COLORS) + len(TEXTURES))

    @staticmethod
    def targets(scene: Scene) -> dict[str, torch.Tensor]:
        """`cells` (9, 1 + 2 x 3): size (0 = none), then shape, colour, texture of a large and of a small object
        (IGNORE where the cell holds none of that size); `slots` (2, 3): shape, colour, texture of the large objects
        (0 = no such object, else 1 + index), in either order; `background` (2,): colour and texture."""
        cells = torch.full((len(CELLS), 1 + len(SIZES) * 3), TagProbe.IGNORE, dtype=torch.long)
        cells[:, 0] = 0
        for o in scene.objects:
            k, s = CELLS.index(o.cell), SIZES.index(o.size)
            cells[k, 0] = 1 + s
            cells[k, 1 + 3 * s:4 + 3 * s] = torch.tensor([SHAPES.index(o.shape), COLORS.index(o.color),
                                                          TEXTURES.index(o.texture)])
        slots = torch.zeros(2, 3, dtype=torch.long)
        for j, o in enumerate(scene.primary[:2]):
            slots[j] = torch.tensor([1 + SHAPES.index(o.shape), 1 + COLORS.index(o.color),
                                     1 + TEXTURES.index(o.texture)])
        background = torch.tensor([COLORS.index(scene.background_color), TEXTURES.index(scene.background_texture)])
        return {"cells": cells, "slots": slots, "background": background}

    @staticmethod
    def _split(logits: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
        bounds = np.cumsum([0, *widths])
        return [logits[..., bounds[j]:bounds[j + 1]] for j in range(len(widths))]

    def logits(self, patches: torch.Tensor, queries: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """The logits of every column of the targets, in their order: cells (B, 9, classes) x 7, slots
        (B, classes) x 6, and the background from the ViT (`background`) and from the Q-Former (`caption_background`),
        (B, classes) x 2 each."""
        attrs = list(self.ATTRS.values())
        cells = self._split(self.cell(torch.einsum("kp,bpd->bkd", self.pool, patches)),
                            [len(SIZES) + 1] + attrs * len(SIZES))
        background = self._split(self.background(patches.mean(1)), [len(COLORS), len(TEXTURES)])
        slots = [x for j in range(2) for x in self._split(self.slot(queries[:, j]), [n + 1 for n in attrs])]
        caption_background = self._split(self.caption_background(queries[:, 2]), [len(COLORS), len(TEXTURES)])
        return {"cells": cells, "slots": slots, "caption_background": caption_background, "background": background}

    def loss(self, patches: torch.Tensor, queries: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        ce = nn.functional.cross_entropy
        out = self.logits(patches, queries)
        loss = sum(ce(x.flatten(0, 1), t["cells"][..., j].flatten(), ignore_index=self.IGNORE)
                   for j, x in enumerate(out["cells"]))
        loss = loss + self._slot_losses(out["slots"], t["slots"]).min(1).values.mean()
        for key in ("background", "caption_background"):
            loss = loss + sum(ce(x, t["background"][:, j]) for j, x in enumerate(out[key]))
        return loss

    @staticmethod
    def _slot_losses(logits: list[torch.Tensor], slots: torch.Tensor) -> torch.Tensor:
        """(B, 2): per sample, the slot loss with the objects in their order and swapped."""
        ce = nn.functional.cross_entropy
        out = []
        for order in ((0, 1), (1, 0)):
            target = slots[:, order].flatten(1)
            out.append(sum(ce(x, target[:, j], reduction="none") for j, x in enumerate(logits)))
        return torch.stack(out, 1)

    def predict(self, patches: torch.Tensor, queries: torch.Tensor) -> dict[str, torch.Tensor]:
        """The probes' answers, shaped like the (batched) targets: from the ViT for `cells` and `background`, from
        the Q-Former for `slots`."""
        out = self.logits(patches, queries)
        n = patches.shape[0]
        return {"cells": torch.stack([x.argmax(-1) for x in out["cells"]], -1),
                "slots": torch.stack([x.argmax(-1) for x in out["slots"]], -1).reshape(n, 2, 3),
                "background": torch.stack([x.argmax(-1) for x in out["background"]], -1)}


@torch.no_grad()
def probe_accuracy(model: Any, probe: TagProbe, pixels: torch.Tensor, scenes: list[Scene]) -> dict[str, float]:
    """Held-out check of the vision phase (%): what the ViT features hold about the large and the small objects
    (shape, colour and texture from the cell probe), and what the visual prompt holds about what captions say (the
    Q-Former slot probe: shape, colour and texture of the large objects, in the better of the two orders)."""
    patches = model.vision_model(pixel_values=pixels).last_hidden_state
    predicted = probe.predict(patches[:, 1:], _qformer(model, patches))
    targets = [TagProbe.targets(s) for s in scenes]
    cells = torch.stack([t["cells"] for t in targets])
    out = {}
    for s, size in enumerate(SIZES):
        cols = slice(1 + 3 * s, 4 + 3 * s)
        here = cells[..., 0] == 1 + s
        right = (predicted["cells"][..., cols] == cells[..., cols])[here]
        out[f"vit_{size}"] = round(100.0 * float(right.float().mean()), 2)
    slots = torch.stack([t["slots"] for t in targets])
    filled = slots[..., 0] > 0
    right = torch.stack([((predicted["slots"] == slots[:, order]) & filled[:, order, None]).sum((1, 2))
                         for order in ((0, 1), (1, 0))]).max(0).values
    out["qformer_large"] = round(100.0 * float(right.sum()) / (3 * float(filled.sum())), 2)
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
    requests = [Request(CAPTION_PROMPTS[0], [image]) for image in images]
    answers = generator.answer(requests)
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
    """Accuracy (%) of greedy Yes/No answers about held-out scenes, per object size and kind of question.

    For every scene, size and kind, one question whose answer is Yes and one whose answer is No (`yes_no_pair`),
    parsed with the official MME rule: `primary` asks about the large objects (what captions cover), `detail` about
    the small ones no caption mentions, where a caption-trained model should be near chance. `accuracy` is over
    PERCEPTION_KINDS (existence, colour, shape, texture, count); `position` is reported beside it (captions do not
    say where things are). `yes_share`: the share of Yes answers (100 or 0: one constant answer). `images`: the
    scenes' renders, where the caller has them."""
    from cheetah.evaluate.generation import Generator, Request
    from cheetah.evaluate.scoring import parse_yes_no
    from cheetah.model.vpgc import VPGCModel

    rng = np.random.default_rng([YES_NO_SEED, len(scenes)])
    asked = []  # (size, kind, question, truth, image)
    images = images or [render(s).image for s in scenes]
    for scene, image in zip(scenes, images, strict=True):
        for size in SIZES:
            for kind in YES_NO_KINDS_ASKED:
                yes, no = yes_no_pair(scene, kind, rng, size=size)
                asked += [(size, kind, yes, "yes", image), (size, kind, no, "no", image)]
    model = VPGCModel(backbone)  # zero-initialised VPG-C: exactly the backbone
    generator = Generator(model, batch_size=batch_size, max_new_tokens=4)
    answers = generator.answer([Request(f"{IMAGE_TOKEN} {q}", [image]) for _, _, q, _, image in asked])
    model.detach_from_backbone()
    parsed = [parse_yes_no(a) for a in answers]
    right = [p == truth for (_, _, _, truth, _), p in zip(asked, parsed)]
    said_yes = [p == "yes" for p in parsed]

    def pct(rows: list[int], of: list[bool]) -> float:
        return round(100.0 * float(np.mean([of[i] for i in rows])), 2)

    out: dict[str, Any] = {}
    for split, size in (("primary", "large"), ("detail", "small")):
        rows = [i for i, a in enumerate(asked) if a[0] == size]
        scored = [i for i in rows if asked[i][1] in PERCEPTION_KINDS]
        out[split] = {"accuracy": pct(scored, right), "n": len(scored), "yes_share": pct(scored, said_yes),
                      "kinds": {k: pct([i for i in rows if asked[i][1] == k], right) for k in YES_NO_KINDS_ASKED}}
    out["examples"] = [{"question": q, "truth": t, "answer": a} for (_, _, q, t, _), a in
                       list(zip(asked, answers))[:2 * len(YES_NO_KINDS_ASKED)]]
    return out


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
    for step in tqdm(range(steps), desc="base: vision", dynamic_ncols=True):
        model.vision_model.train(), model.qformer.train()
        idx = rng.integers(len(pixels), size=batch_size)
        patches = model.vision_model(pixel_values=pixels[idx]).last_hidden_state
        loss = probe.loss(patches[:, 1:], _qformer(model, patches),
                          {k: torch.stack([tags[i][k] for i in idx]) for k in tags[0]})
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if callback is not None:
            callback(step + 1, losses[-1])
    model.vision_model.eval(), model.qformer.eval()
    return losses


def _lm_loss(model: Any, builder: PromptBuilder, samples: list[Any],
             visual: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The language model's token-mean loss on `samples` (`Encoded`), each with its images' visual prompts `visual`
    (one (images x queries, D) tensor per sample; None: text only). Computed in two length buckets, so a short Yes/No
    question is not padded to the longest two-image sample: the same value as one padded batch on ~40 % fewer
    tokens (the alignment data's lengths run from ~45 to ~110)."""
    if not samples:
        return torch.zeros(())
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    lengths = [len(samples[i].input_ids) for i in order]
    n = len(order)
    cut = min(range(1, n + 1), key=lambda k: k * lengths[k - 1] + (n - k) * lengths[-1])  # the least padding
    targets = sum(s.num_targets for s in samples)
    loss = torch.zeros(())
    for part in (order[:cut], order[cut:]):
        if not part:
            continue
        batch = builder.collate([samples[i] for i in part], "right")
        if visual is None:
            inputs = {"input_ids": batch["input_ids"]}
        else:
            mask = (batch["input_ids"] == model.config.image_token_index).unsqueeze(-1)
            tokens = model.language_projection(torch.cat([visual[i] for i in part]))
            inputs = {"inputs_embeds": model.get_input_embeddings()(batch["input_ids"]).masked_scatter(mask, tokens)}
        # num_items_in_batch: each bucket's summed loss over the whole batch's targets, so the buckets add up to
        # the batch's token mean.
        loss = loss + model.language_model(**inputs, attention_mask=batch["attention_mask"], labels=batch["labels"],
                                           num_items_in_batch=targets).loss
    return loss


def _qformer(model: Any, features: torch.Tensor) -> torch.Tensor:
    queries = model.query_tokens.expand(features.shape[0], -1, -1)
    mask = torch.ones(features.shape[:2], dtype=torch.long)
    return model.qformer(query_embeds=queries, encoder_hidden_states=features,
                         encoder_attention_mask=mask).last_hidden_state


def base_stage(params: Params) -> dict[str, Any]:
    """`cheetah base`: write the backbone to `base.out` as `base.init` says; returns the metrics."""
    cfg = params.base
    if cfg.init == "pretrain":
        return pretrain_base(params)
    metrics = random_base(params) if cfg.init == "random" else checkpoint_base(params)
    write_metrics(cfg.metrics, metrics)
    return metrics


def random_base(params: Params) -> dict[str, Any]:
    """`model.preset`'s shapes with random weights (seed `base.seed`) in `model.dtype`, a tokenizer trained on the
    world's language, saved as a checkpoint directory: every later stage reads it as it would a 7B one."""
    import torch as _torch

    cfg = params.base
    tokenizer = train_tokenizer(cfg.vocab_size)
    backbone = build_backbone(params.model.preset, tokenizer=tokenizer, seed=cfg.seed,
                              image_size=params.world.image_size if params.model.preset == "tiny" else None,
                              dtype=getattr(_torch, params.model.dtype), template=params.model.template)
    save_backbone(backbone, cfg.out, extra_meta={"init": "random", "seed": cfg.seed})  # nothing to protect: no inputs
    return {"init": "random", "preset": params.model.preset, "fingerprint": backbone.fingerprint(),
            "parameters": sum(p.numel() for p in backbone.model.parameters())}


def checkpoint_base(params: Params) -> dict[str, Any]:
    """Bring the checkpoint directory `base.checkpoint` into `base.out`: checked to load as a BLIP-2-family backbone
    (config, tokenizer, image token; on the meta device, so in seconds), then hard-linked file by file (copied where
    the file system cannot link). A different checkpoint path reruns the stage; to have DVC notice weights replaced
    in place, `dvc repro --force base`."""
    cfg = params.base
    if not cfg.checkpoint:
        raise ConfigError("base.init is `checkpoint` but base.checkpoint names no directory")
    source = Path(cfg.checkpoint)
    try:
        backbone = load_backbone(source, device="meta")
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"base.checkpoint: {e}") from None
    files = sorted(p for p in source.rglob("*") if p.is_file())
    with atomic_dir(cfg.out, kind=BACKBONE_KIND, protect=[source]) as tmp:
        for f in files:
            target = tmp / f.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)
        meta = {"template": backbone.template.name, "preset": params.model.preset}
        if (source / "cheetah_backbone.json").is_file():
            meta.update(read_json(source / "cheetah_backbone.json"))
        meta.update(init="checkpoint", checkpoint=str(source.resolve()))
        atomic_write_json(tmp / "cheetah_backbone.json", meta)
    return {"init": "checkpoint", "checkpoint": str(source.resolve()), "fingerprint": backbone.fingerprint(),
            "parameters": sum(p.numel() for p in backbone.model.parameters()), "files": len(files),
            "bytes": sum(f.stat().st_size for f in files)}


def pretrain_base(params: Params) -> dict[str, Any]:
    """Train the tiny backbone from scratch on the source corpus; write it to `params.base.out`."""
    from cheetah.tracking import log_steps

    cfg, world = params.base, params.world
    if params.model.preset != "tiny":
        raise ConfigError(f"base.init `pretrain` trains the embedded `tiny` preset only; for {params.model.preset!r} "
                          "use base.init `checkpoint` (with base.checkpoint) or `random`")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    source = Path(world.out)
    check_output(cfg.out, BACKBONE_KIND, protect=[source])  # before any work: never replace what it did not write

    tokenizer = train_tokenizer(cfg.vocab_size)
    backbone = build_backbone("tiny", tokenizer=tokenizer, image_size=world.image_size, seed=cfg.seed)
    model = backbone.model
    builder = PromptBuilder.for_backbone(backbone, max_length=128)
    records, scene_by_id = _read_source(source)
    paths, image_examples = _image_examples(source, records, scene_by_id, cfg.seed)
    pixels = torch.stack([load_pixels(p, backbone.image_processor) for p in paths])
    tags = [TagProbe.targets(scene_by_id[r["id"]]) for r in records]

    t_start = time.perf_counter()

    # -- 1. vision: ViT sees everything, the Q-Former learns what captions say --------------------------------
    vcfg = model.config.vision_config
    probe = TagProbe(vcfg.hidden_size, model.config.qformer_config.hidden_size, backbone.num_query_tokens,
                     vcfg.image_size, vcfg.patch_size)
    vision_losses = train_vision(model, probe, pixels, tags, rng, steps=cfg.vision_steps, batch_size=2 * cfg.batch_size,
                                 lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps)

    heldout = list(heldout_scenes(world, cfg.eval_scenes))
    heldout_images = [render(s).image for s in heldout]
    heldout_pixels = backbone.image_processor(heldout_images, return_tensors="pt")["pixel_values"]
    probe_heldout = probe_accuracy(model, probe, heldout_pixels, heldout)
    log.info("base: what the vision phase holds about held-out scenes (%%, probes): %s", probe_heldout)

    # -- 2. alignment: frozen ViT + Q-Former; the projection and the language model learn ---------------------
    for p in (*model.vision_model.parameters(), *model.qformer.parameters(), model.query_tokens):
        p.requires_grad_(False)
    edited, difference = _difference_examples(records, scene_by_id, len(paths), rng)
    image_examples += difference
    all_pixels = torch.cat([pixels, backbone.image_processor([render(s).image for s in edited],
                                                             return_tensors="pt")["pixel_values"]])
    with torch.no_grad():  # frozen: every image's visual prompt is computed once
        prompts = torch.cat([_qformer(model, model.vision_model(pixel_values=all_pixels[i:i + 128]).last_hidden_state)
                             for i in range(0, len(all_pixels), 128)])
    encoded = [builder.encode(instr, len(images), resp) for images, instr, resp in image_examples]
    chat = [builder.encode(instr, 0, resp) for instr, resp in _chat_examples(list(scene_by_id.values()), rng)]
    align_params = [*model.language_projection.parameters(), *model.language_model.parameters()]
    model.language_model.train()
    optimizer = torch.optim.AdamW(align_params, lr=cfg.align_lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.steps, "cosine"))
    scenes = [scene_by_id[r["id"]] for r in records]  # image i shows scenes[i]

    align_losses = []  # (image loss, Yes/No loss, text loss) per step
    for step in tqdm(range(cfg.steps), desc="base: alignment", dynamic_ncols=True):
        idx = rng.integers(len(encoded), size=cfg.batch_size)
        loss_img = _lm_loss(model, builder, [encoded[i] for i in idx],
                            [prompts[list(image_examples[i][0])].flatten(0, 1) for i in idx])
        # Yes/No questions in a batch and a loss term of their own: mixed in, their one-token answers weigh too
        # little for the language model to learn to compare a question with the image within the run (docs/base.md).
        images, asked = _yes_no_examples(scenes, cfg.yes_no_batch, rng)
        loss_yes_no = _lm_loss(model, builder, [builder.encode(q, 1, a) for q, a in asked], list(prompts[images]))
        text = rng.integers(len(chat), size=max(1, cfg.batch_size // 2))
        loss_txt = _lm_loss(model, builder, [chat[i] for i in text])
        (loss_img + loss_yes_no + 0.5 * loss_txt).backward()
        torch.nn.utils.clip_grad_norm_(align_params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        align_losses.append((loss_img.item(), loss_yes_no.item(), loss_txt.item()))
        if (step + 1) % 20 == 0 or step + 1 == cfg.steps:
            log_steps([(step + 1, {"image_loss": loss_img.item(), "yes_no_loss": loss_yes_no.item(),
                                   "text_loss": loss_txt.item(), "lr": scheduler.get_last_lr()[0]})])
    train_seconds = time.perf_counter() - t_start

    model.eval()
    model.requires_grad_(False)
    quality = caption_quality(backbone, heldout, heldout_images)
    yes_no = yes_no_accuracy(backbone, heldout, heldout_images)
    last = np.array(align_losses[-20:])
    metrics = {
        "vision_steps": cfg.vision_steps,
        "steps": cfg.steps,
        "train_seconds": round(train_seconds, 1),
        "final_vision_loss": float(np.mean(vision_losses[-20:])) if vision_losses else None,
        "final_image_loss": float(last[:, 0].mean()),
        "final_yes_no_loss": float(last[:, 1].mean()),
        "final_text_loss": float(last[:, 2].mean()),
        "heldout_scenes": quality["n"],
        "caption_exact_match": quality["caption_exact_match"],
        "caption_rouge_l": quality["caption_rouge_l"],
        "yes_no_primary_accuracy": yes_no["primary"]["accuracy"],
        "yes_no_detail_accuracy": yes_no["detail"]["accuracy"],
        "probe": probe_heldout,
        "parameters": sum(p.numel() for p in model.parameters()),
        "image_examples": len(encoded),
        "chat_examples": len(chat),
    }
    save_backbone(backbone, cfg.out, extra_meta={"init": "pretrain", "base_metrics": metrics}, protect=[source])
    write_metrics(cfg.metrics, {**metrics, "yes_no": yes_no, "examples": quality["examples"]})
    return metrics
