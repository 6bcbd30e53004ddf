"""Edit proposals (paper §2.2 step 2): what to change about the chosen target, described in structure and words.

Four edit types, as in the paper: `modify` changes one attribute of the target (colour, texture or shape;
colour only for real images), `swap` replaces it with a different kind of object, `delete` removes it, and
`add` puts a new object on an empty background area (never over an object).

`WorldEditor` edits the scene graph, so the renderer can draw the result exactly. `LabelEditor` works from an
object's label and mask only (real images, where the edit is painted by inpainting). Both write the difference
sentence from the same templates (`cheetah.world.language.difference_sentence`); the paper's ChatGPT-written
descriptions are replaced by those templates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from PIL import Image, ImageFilter

from cheetah.synthesize.common import Edit, Region, Reject, SourceItem
from cheetah.world.edit import apply_edit
from cheetah.world.language import EDIT_TYPES, article, describe, difference_sentence
from cheetah.world.render import footprint
from cheetah.world.scene import COLORS, Obj, Scene


class Editor(Protocol):
    def propose(self, item: SourceItem, image: Image.Image, target: Region, edit_type: str,
                rng: np.random.Generator) -> Edit:
        """An edit of `edit_type` on `target` (an object, or for `add` a background area)."""
        ...


def _other(options: Sequence[str], avoid: set[str], rng: np.random.Generator) -> str:
    choices = [o for o in options if o not in avoid]
    return choices[int(rng.integers(len(choices)))]


def _noun(attrs: dict[str, str]) -> str:
    text = describe(attrs)
    return f"{article(text)} {text}"


class WorldEditor:
    """Edits a world scene graph; the edit's mask is every pixel the old or the new object covers."""

    def propose(self, item: SourceItem, image: Image.Image, target: Region, edit_type: str,
                rng: np.random.Generator) -> Edit:
        scene: Scene | None = item.scene
        if scene is None:
            raise Reject("no_scene_graph", f"source {item.id} has no scene graph")
        if edit_type not in EDIT_TYPES:
            raise Reject("unknown_edit_type", f"unknown edit type {edit_type!r}")
        cell = target.attrs["position"] if edit_type == "add" else None
        if edit_type == "add" and cell not in scene.empty_cells():
            raise Reject("not_background", f"cell {cell!r} of {scene.id} is not empty")
        old = None if edit_type == "add" else scene.object(target.name)
        edited, old, new = apply_edit(scene, edit_type, rng, target=old, cell=cell, size="small")
        n = scene.image_size
        mask = np.zeros((n, n), dtype=bool)
        for o in (old, new):
            if o is not None:
                mask |= footprint(o, n)
        return self._edit(edit_type, old, new, edited, mask, scene.background_color)

    @staticmethod
    def _edit(edit_type: str, old: Obj | None, new: Obj | None, edited: Scene, mask: np.ndarray,
              background: str) -> Edit:
        before = old.attrs() if old else None
        after = new.attrs() if new else None
        return Edit(
            type=edit_type,
            object=describe(before or after),  # type: ignore[arg-type]
            before=before,
            after=after,
            mask=mask,
            sentence=difference_sentence(edit_type, before, after),
            prompt=_noun(after) if after else f"{article(background)} {background} background",
            scene=edited,
        )


def grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Dilate a mask by `pixels` so inpainting also repaints the object's outline."""
    if pixels <= 0:
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.filter(ImageFilter.MaxFilter(2 * pixels + 1))) > 0


class LabelEditor:
    """Edits described from an object's label and position (real images, painted by inpainting)."""

    def __init__(self, labels: Sequence[str], colors: Sequence[str] = COLORS, grow_pixels: int = 2):
        self.labels = list(labels)
        self.colors = list(colors)
        self.grow_pixels = grow_pixels

    def propose(self, item: SourceItem, image: Image.Image, target: Region, edit_type: str,
                rng: np.random.Generator) -> Edit:
        position = target.attrs["position"]
        if edit_type == "add":
            before = None
            after = {"color": _other(self.colors, set(), rng), "label": _other(self.labels, set(), rng),
                     "position": position}
            mask = target.mask
        else:
            before = {"label": target.attrs.get("label", "object"), "position": position}
            mask = grow(target.mask, self.grow_pixels)
            if edit_type == "delete":
                after = None
            elif edit_type == "modify":
                after = {**before, "color": _other(self.colors, set(), rng)}
                before = {**before, "color": None}  # unknown before: the sentence names only the new colour
            elif edit_type == "swap":
                after = {"label": _other(self.labels, {before["label"]}, rng), "position": position}
            else:
                raise Reject("unknown_edit_type", f"unknown edit type {edit_type!r}")
        before_clean = {k: v for k, v in before.items() if v is not None} if before else None
        return Edit(
            type=edit_type,
            object=describe(before_clean or after),  # type: ignore[arg-type]
            before=before_clean,
            after=after,
            mask=mask,
            sentence=difference_sentence(edit_type, before, after),
            prompt=_noun(after) if after else "empty background",
            scene=None,
        )
