"""Edits of a scene graph: the paper's four edit types (§2.2) on one object of a world scene.

`apply_edit` is the one definition of what each edit does to the graph; the synthesis stage's `WorldEditor` (which
picks its target by attention) and `edit_scene` (a random visible edit: the embedded benchmarks, the base stage's
two-image examples) both call it, so an edit means the same everywhere.
"""

from __future__ import annotations

import dataclasses
import numpy as np

from cheetah.world.language import EDIT_TYPES, difference_sentence
from cheetah.world.render import render
from cheetah.world.scene import SHAPES, TEXTURES, Obj, Scene, pick, pick_color, place


def apply_edit(scene: Scene, edit_type: str, rng: np.random.Generator, *, target: Obj | None = None,
               cell: str | None = None, size: str = "small") -> tuple[Scene, Obj | None, Obj | None]:
    """(edited scene, the object before, the object after) for one edit.

    - `modify` `target`: one of its colour, texture or shape changes;
    - `swap` `target`: another kind of object in its place (new shape and colour, texture drawn afresh);
    - `delete` `target`;
    - `add` a new object of `size` in the empty `cell`.
    A new colour is never the background's (the object would vanish)."""
    background = scene.background_color
    if edit_type == "add":
        if cell is None or cell not in scene.empty_cells():
            raise ValueError(f"add: cell {cell!r} of scene {scene.id} is not empty")
        used = {o.name for o in scene.objects}
        name = next(f"o{k}" for k in range(len(used) + 1) if f"o{k}" not in used)
        new = Obj(name=name, shape=pick(rng, SHAPES), color=pick_color(rng, {background}),
                  texture=pick(rng, TEXTURES), size=size, cell=cell, box=place(cell, size, scene.image_size, rng))
        return dataclasses.replace(scene, objects=scene.objects + (new,)), None, new
    if target is None:
        raise ValueError(f"{edit_type}: no target object")
    if edit_type == "delete":
        kept = tuple(o for o in scene.objects if o.name != target.name)
        return dataclasses.replace(scene, objects=kept), target, None
    if edit_type == "modify":
        key = pick(rng, ("color", "texture", "shape"))
        if key == "color":
            new = dataclasses.replace(target, color=pick_color(rng, {background, target.color}))
        else:
            options = TEXTURES if key == "texture" else SHAPES
            new = dataclasses.replace(target, **{key: pick(rng, [v for v in options if v != getattr(target, key)])})
    elif edit_type == "swap":
        new = dataclasses.replace(target, shape=pick(rng, [s for s in SHAPES if s != target.shape]),
                                  color=pick_color(rng, {background, target.color}), texture=pick(rng, TEXTURES))
    else:
        raise ValueError(f"unknown edit type {edit_type!r}; expected one of {list(EDIT_TYPES)}")
    return dataclasses.replace(scene, objects=tuple(new if o.name == target.name else o for o in scene.objects)), \
        target, new


def edit_scene(scene: Scene, rng: np.random.Generator, size: str = "small") -> tuple[Scene, str]:
    """One visible random edit of one object of `size`, and the sentence that describes it.

    The benchmarks edit small detail objects: they are what a caption-trained visual prompt generator misses. The base
    stage learns to compare two images on the large ones, which captions cover; a large-object edit keeps one to two
    large objects (what a caption names)."""
    before = np.asarray(render(scene).image)
    for _ in range(50):
        edit_type = pick(rng, EDIT_TYPES)
        target = pick(rng, (scene.details if size == "small" else scene.primary) or scene.objects)
        if edit_type == "delete" and (len(scene.objects) < 3 or (size == "large" and len(scene.primary) < 2)):
            continue
        cell = None
        if edit_type == "add":
            cells = scene.empty_cells()
            if not cells or (size == "large" and len(scene.primary) >= 2):
                continue
            cell = pick(rng, cells)
        edited, old, new = apply_edit(scene, edit_type, rng, target=target, cell=cell, size=size)
        edited = dataclasses.replace(edited, id=f"{scene.id}+{edit_type}")
        if not np.array_equal(before, np.asarray(render(edited).image)):  # e.g. a texture too fine for a tiny object
            return edited, difference_sentence(edit_type, old and old.attrs(), new and new.attrs())
    raise RuntimeError(f"no visible edit found for scene {scene.id}")
