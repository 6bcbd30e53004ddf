"""Embedded benchmarks: DEMON-format tasks and MME-format subtasks built from held-out scenes of the world.

They are written in the official on-disk formats and read back by the same loaders and scorers as the real
benchmarks, so the whole evaluation path is exercised offline. Task folders start with `World_` (registered in
`cheetah.evaluate.demon.TASKS`) and cannot be mistaken for real DEMON tasks.

DEMON categories the world supports (text-rich images and knowledge-grounded QA need text or documents it does
not draw):
    visual_relation_inference   World_SpotTheChange       a scene and one edit of it -> the difference sentence
    multi_image_reasoning       World_WhichImage          which of four images has the "small red star"
                                World_PropertyCoherence   is there a "large circle" in every image? yes / no
    multi_modal_cloze           World_ImageCloze          series A B A UNKNOWN: pick B among look-alikes (images)
                                World_TextCloze           the missing caption among captions one word apart
    multi_modal_dialogue        World_Dialogue            the last answer of a question-answer dialogue on 2 images
    visual_story_telling_list   World_Story               three images, two edits: tell what happens last
MME subtasks: existence, count, position, color (flat layout), one Yes- and one No-question per image; half the
images are asked about a large object (primary: what captions cover), half about a small one (detail).

Everything is drawn from the held-out seed stream (`WorldConfig.heldout_seed`), each task from its own slice of it
(and with its own random generator), so the output is byte-identical for the same parameters and adding a task
does not change the others. Both folders are built aside and renamed into place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cheetah.config import EvaluateConfig, WorldConfig
from cheetah.evaluate.demon import TASKS, write_demon_task
from cheetah.evaluate.mme import write_mme_subtask
from cheetah.io import DataError, atomic_dir, atomic_write_json, read_json
from cheetah.world import (SHAPES, Scene, caption, edit_scene, heldout_scenes, png_bytes, questions, render,
                           yes_no_pair)
from cheetah.world.scene import pick, pick_color

# Benchmark scenes come from far into the held-out stream (base-model evaluation reads its start), each task
# from its own slice.
_STREAM_START = 1_000_000
_SLICE = 100_000

Sample = tuple[str, list[Scene], str, list[str] | None]
"""(context with {image#k} placeholders, the scene of each image, response, choice_list or None)."""


class _SceneStream:
    """Held-out scenes of one task slice, drawn in order; `next(accept)` skips scenes that do not qualify."""

    def __init__(self, world: WorldConfig, slot: int):
        self._scenes: Iterator[Scene] = heldout_scenes(world, _SLICE, start=_STREAM_START + slot * _SLICE)

    def next(self, accept: Callable[[Scene], bool] = lambda s: True) -> Scene:
        for scene in self._scenes:
            if accept(scene):
                return scene
        raise RuntimeError("held-out slice exhausted: no scene satisfies the task's condition")


# ---------------------------------------------------------------------------------------------------------------
# DEMON task builders: one sample each call
# ---------------------------------------------------------------------------------------------------------------

_ORDINALS = ("first", "second", "third", "fourth")


def _images_prefix(n: int) -> str:
    return " ".join(f"Image {k}: {{image#{k}}}" for k in range(1, n + 1))


def _spot_the_change(scenes: _SceneStream, rng: np.random.Generator) -> Sample:
    scene = scenes.next()
    edited, sentence = edit_scene(scene, rng)
    return _images_prefix(2), [scene, edited], sentence, None


def _which_image(scenes: _SceneStream, rng: np.random.Generator) -> Sample:
    target = int(rng.integers(4))
    while True:
        group = [scenes.next() for _ in range(4)]
        others = {(o.size, o.color, o.shape) for i, s in enumerate(group) if i != target for o in s.objects}
        unique = [o for o in group[target].objects if (o.size, o.color, o.shape) not in others]
        details = [o for o in unique if o.size == "small"]
        if unique:
            break
    o = pick(rng, details if details and rng.random() < 0.5 else unique)
    choices = [f"the {w} image" for w in _ORDINALS]
    context = f"{_images_prefix(4)} Question: Which image has {_a(o.size)} {o.size} {o.color} {o.shape}? "
    return context, group, choices[target], choices


def _property_coherence(scenes: _SceneStream, rng: np.random.Generator) -> Sample:
    first = scenes.next()
    o = pick(rng, first.objects)
    if rng.random() < 0.5:
        prop, phrase = (o.size, None, o.shape), f"{_a(o.size)} {o.size} {o.shape}"
    else:
        prop, phrase = (o.size, o.color, None), f"{_a(o.size)} {o.size} {o.color} object"

    def has(s: Scene) -> bool:
        return any(x.size == prop[0] and prop[1] in (None, x.color) and prop[2] in (None, x.shape)
                   for x in s.objects)

    coherent = bool(rng.random() < 0.5)
    group = [first, scenes.next(has), scenes.next(has) if coherent else scenes.next(lambda s: not has(s))]
    group = [group[i] for i in rng.permutation(3)]
    context = f"{_images_prefix(3)} Question: Is there {phrase} in every image? "
    return context, group, "yes" if coherent else "no", ["yes", "no"]


def _image_cloze(scenes: _SceneStream, rng: np.random.Generator) -> Sample:
    a, b, c = scenes.next(), scenes.next(), scenes.next()
    options = [b, edit_scene(b, rng)[0], edit_scene(a, rng)[0], c]  # the answer, two look-alikes, a stranger
    order = rng.permutation(4)
    options = [options[i] for i in order]
    letters = "ABCD"
    answer = f"Image {letters[int(np.where(order == 0)[0][0])]}"
    listed = ", ".join(f"'Image {letters[k]}: {{image#{k + 4}}}'" for k in range(4))
    context = (f"Series: {{image#1}} {{image#2}} {{image#3}} UNKNOWN\nChoice List:[{listed}] "
               f"Your answer to replace 'UNKNOWN' is:")
    return context, [a, b, a, *options], answer, None


def _caption_variants(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Captions of the scene with one word changed: a primary object's colour or shape, or the background."""
    truth = caption(scene)
    out: list[str] = []
    for _ in range(100):
        if len(out) == 3:
            return out
        what = pick(rng, ("color", "shape", "background"))
        if what == "background":
            avoid = {scene.background_color} | {o.color for o in scene.objects}
            variant = dataclasses.replace(scene, background_color=pick_color(rng, avoid))
        else:
            o = pick(rng, scene.primary)
            if what == "color":
                new = dataclasses.replace(o, color=pick_color(rng, {o.color, scene.background_color}))
            else:
                new = dataclasses.replace(o, shape=pick(rng, [s for s in SHAPES if s != o.shape]))
            variant = dataclasses.replace(scene, objects=tuple(new if x is o else x for x in scene.objects))
        text = caption(variant)
        if text != truth and text not in out:
            out.append(text)
    raise RuntimeError(f"no caption variants for scene {scene.id}")


def _text_cloze(scenes: _SceneStream, rng: np.random.Generator) -> Sample:
    group = [scenes.next() for _ in range(3)]
    missing = int(rng.integers(3))
    truth = caption(group[missing])
    choices = [truth, *_caption_variants(group[missing], rng)]
    choices = [choices[i] for i in rng.permutation(4)]
    lines = [f"Image {k + 1}: {{image#{k + 1}}} Caption: {'UNKNOWN' if k == missing else caption(s)}"
             for k, s in enumerate(group)]
    return "\n".join(lines) + "\nWhich caption replaces UNKNOWN? ", group, truth, choices


_DIALOGUE_KINDS = ("color", "shape", "texture", "position", "count")


def _dialogue(scenes: _SceneStream, rng: np.random.Generator) -> Sample:
    group = [scenes.next(), scenes.next()]
    turns = []
    for _ in range(3):
        k = int(rng.integers(2))
        qa = pick(rng, [q for q in questions(group[k]) if q.kind in _DIALOGUE_KINDS])
        turns.append((k, qa))
    history = "\n".join(f"Q: About image {k + 1}: {qa.question} A: {qa.answer}" for k, qa in turns[:-1])
    k, last = turns[-1]
    return f"{_images_prefix(2)}\n{history}\nQ: About image {k + 1}: {last.question} A:", group, last.answer, None


def _story(scenes: _SceneStream, rng: np.random.Generator) -> Sample:
    s0 = scenes.next()
    s1, first = edit_scene(s0, rng)
    s2, second = edit_scene(s1, rng)
    first, second = (_as_next(t) for t in (first, second))
    return f"{{image#1}} {{image#2}} {first} {{image#3}}", [s0, s1, s2], second, None


def _as_next(sentence: str) -> str:
    # The world says "In the second image, ..." (two-image comparisons); a story moves on image by image.
    prefix = "In the second image, "
    return "In the next image, " + sentence[len(prefix):] if sentence.startswith(prefix) else sentence


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


_CHOOSE = "You must choose your answer from the Choice List. "

# name -> (slot in the held-out stream, builder, instruction templates). Slots are fixed so that tasks stay put.
DEMON_BUILDERS: dict[str, tuple[int, Callable[[_SceneStream, np.random.Generator], Sample], list[str]]] = {
    "World_SpotTheChange": (0, _spot_the_change, [
        "Describe the difference between the two images. ",
        "What has changed from the first image to the second one? ",
        "Spot the difference between the two images and describe it in one sentence. ",
    ]),
    "World_WhichImage": (1, _which_image, [
        "Look at the four images and answer the question. " + _CHOOSE,
        "Only one of these images matches the question. " + _CHOOSE,
    ]),
    "World_PropertyCoherence": (2, _property_coherence, [
        "Look at all the images and answer the question. " + _CHOOSE,
        "Check every image before you answer. " + _CHOOSE,
    ]),
    "World_ImageCloze": (3, _image_cloze, [
        "The images form a series with a pattern. Pick the image that replaces UNKNOWN. " + _CHOOSE,
        "Complete the image series: choose the image that belongs in place of UNKNOWN. " + _CHOOSE,
    ]),
    "World_TextCloze": (4, _text_cloze, [
        "Each image has a caption, but one caption is missing. " + _CHOOSE,
        "Fill in the missing caption of the image series. " + _CHOOSE,
    ]),
    "World_Dialogue": (5, _dialogue, [
        "Continue the conversation about the images: answer the last question. ",
        "Here is a dialogue about two images. Give the answer to the final question. ",
    ]),
    "World_Story": (6, _story, [
        "The images tell a story in which each image changes the one before. Say what happens in the last image. ",
        "Continue the story: describe the change in the last image. ",
    ]),
}
MME_SLOTS: dict[str, int] = {"existence": 100, "count": 101, "position": 102, "color": 103}


def write_embedded_demon(out: str | Path, world: WorldConfig, per_task: int = 40,
                         tasks: list[str] | None = None) -> Path:
    """Write the embedded DEMON tasks (all, or `tasks`) with `per_task` samples each under `out`."""
    names = list(DEMON_BUILDERS) if tasks is None else tasks
    unknown = [n for n in names if n not in DEMON_BUILDERS]
    if unknown:
        raise ValueError(f"unknown embedded DEMON task(s) {unknown}; choose from {list(DEMON_BUILDERS)}")
    with atomic_dir(out, kind="DEMON benchmark") as tmp:
        for name in names:
            slot, build, instructions = DEMON_BUILDERS[name]
            assert TASKS[name].embedded  # registered in the task table, so the scorer knows it
            scenes, rng = _SceneStream(world, slot), np.random.default_rng([world.heldout_seed, slot])
            records, images = [], {}
            for i in range(per_task):
                context, shown, response, choices = build(scenes, rng)
                paths = [f"{i}_{k}.png" for k in range(len(shown))]
                images.update({p: png_bytes(render(s).image) for p, s in zip(paths, shown)})
                instance: dict[str, Any] = {"context": context, "images_path": paths}
                if choices is not None:
                    instance["choice_list"] = choices
                records.append({"sample_id": i, "task_instruction_id": int(rng.integers(len(instructions))),
                                "task_instance": instance, "response": response,
                                "world_scenes": [s.id for s in shown]})  # provenance; official readers ignore it
            write_demon_task(tmp, name, instructions, records, images)
        atomic_write_json(tmp / "benchmark.json", {"generator": "cheetah.evaluate.embedded", "format": "demon",
                                                   "heldout_seed": world.heldout_seed,
                                                   "image_size": world.image_size, "per_task": per_task,
                                                   "tasks": names})
    return Path(out)


MME_SPLITS: dict[str, str] = {"primary": "large", "detail": "small"}
"""MME-format questions ask about one object size each: the large objects captions describe (primary) or the small
details they never mention (detail). Images alternate between the two (even index primary, odd detail)."""


def write_embedded_mme(out: str | Path, world: WorldConfig, per_subtask: int = 30) -> Path:
    """Write MME-format existence / count / position / color with `per_subtask` images (two questions each), half of
    them about a large object (primary), half about a small one (detail); `benchmark.json` lists which is which."""
    with atomic_dir(out, kind="MME benchmark") as tmp:
        splits: dict[str, dict[str, str]] = {}
        for subtask, slot in MME_SLOTS.items():
            scenes, rng = _SceneStream(world, slot), np.random.default_rng([world.heldout_seed, slot])
            items = []
            splits[subtask] = {}
            for i in range(per_subtask):
                split = list(MME_SPLITS)[i % len(MME_SPLITS)]
                scene = scenes.next()
                yes, no = yes_no_pair(scene, subtask, rng, size=MME_SPLITS[split])
                name = f"{i:04d}.png"
                items.append((name, png_bytes(render(scene).image), [(yes, "Yes"), (no, "No")]))
                splits[subtask][name] = split
            write_mme_subtask(tmp, subtask, items)
        atomic_write_json(tmp / "benchmark.json", {"generator": "cheetah.evaluate.embedded", "format": "mme",
                                                   "heldout_seed": world.heldout_seed,
                                                   "image_size": world.image_size, "per_subtask": per_subtask,
                                                   "subtasks": list(MME_SLOTS), "splits": splits})
    return Path(out)


def read_mme_splits(mme_dir: str | Path) -> dict[str, dict[str, str]] | None:
    """{subtask: {image file name: split}} of an embedded MME-format benchmark; None for any other MME folder (the
    official release has no such split)."""
    path = Path(mme_dir) / "benchmark.json"
    if not path.is_file():
        return None
    meta = read_json(path)
    splits = meta.get("splits") if isinstance(meta, dict) and meta.get("generator") == "cheetah.evaluate.embedded" \
        else None
    if splits is None:
        return None
    if not isinstance(splits, dict) or not all(isinstance(v, dict) and set(v.values()) <= set(MME_SPLITS)
                                               for v in splits.values()):
        raise DataError(f"{path}: field splits must map each subtask to {{image: {' | '.join(MME_SPLITS)}}}")
    return splits


def write_embedded_benchmarks(world: WorldConfig, evaluate: EvaluateConfig) -> dict[str, Path]:
    """Both embedded benchmarks, where `evaluate.demon_dir` and `evaluate.mme_dir` say, sized by
    `evaluate.demon_per_task` (samples) and `evaluate.mme_per_subtask` (images)."""
    return {
        "demon": write_embedded_demon(evaluate.demon_dir, world, evaluate.demon_per_task),
        "mme": write_embedded_mme(evaluate.mme_dir, world, evaluate.mme_per_subtask),
    }
