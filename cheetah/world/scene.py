"""Scene graphs of the embedded world: what is in a picture, and where.

A scene is a 3x3 grid of cells. One or two LARGE primary objects and three or four SMALL detail objects each
take one cell, centred in it (so objects never overlap and every object has a unique position name), on a
coloured, optionally textured background. Everything is drawn from a numpy Generator seeded by `(seed, index)`, so any
scene can be regenerated on its own, and scenes drawn from different seeds are independent streams.

The scene graph is plain data (`Scene.to_dict()` is what `scenes.jsonl` holds); `cheetah.world.render` turns it
into pixels, and the synthesis stage edits it and renders it again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from cheetah.io import DataError

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary: every attribute value the world can produce. The language helpers build all text from these.
# ---------------------------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon")

# Named palette. Values are far enough apart that a colour change is always visible.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 180),
    "pink": (245, 130, 180),
    "cyan": (40, 200, 210),
    "brown": (130, 80, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")
SIZES: tuple[str, ...] = ("large", "small")

# Grid cells, row-major. The name is what captions, questions and difference sentences say.
GRID = 3
CELLS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)

# How many objects of each kind a scene has (inclusive ranges). 2 + 4 = 6 < 9 cells, so a scene always has an
# empty background cell, which the `add` edit needs; with one added object and the background a scene is at most
# 8 things, one per visual token of the `tiny` preset (docs/miniature.md).
N_LARGE = (1, 2)
N_SMALL = (3, 4)

# Object extent as a fraction of the cell side. Large objects nearly fill their cell; small ones about half of it:
# at 64 pixels that is 11-12 pixels, where the seven shapes and three textures are still told apart (at 8-10
# pixels, jittered inside the cell, the tiny ViT read a small object's shape at 26 %: docs/miniature.md).
EXTENT = {"large": (0.80, 0.95), "small": (0.50, 0.55)}


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object. `box` is its square footprint in pixels, half-open: [x0, y0, x1, y1] (like PIL's crop)."""

    name: str
    shape: str
    color: str
    texture: str
    size: str
    cell: str
    box: tuple[int, int, int, int]

    def attrs(self) -> dict[str, str]:
        """The attributes language talks about (everything but the name and the pixel box)."""
        return {"size": self.size, "color": self.color, "texture": self.texture, "shape": self.shape,
                "position": self.cell}


@dataclasses.dataclass(frozen=True)
class Scene:
    """A whole picture: background, objects in drawing order, and the pixel size of the square image."""

    id: str
    image_size: int
    background_color: str
    background_texture: str
    objects: tuple[Obj, ...]

    @property
    def primary(self) -> tuple[Obj, ...]:
        """The large objects: the only ones captions mention."""
        return tuple(o for o in self.objects if o.size == "large")

    @property
    def details(self) -> tuple[Obj, ...]:
        return tuple(o for o in self.objects if o.size == "small")

    def object(self, name: str) -> Obj:
        for o in self.objects:
            if o.name == name:
                return o
        raise KeyError(f"scene {self.id} has no object {name!r}")

    def empty_cells(self) -> list[str]:
        used = {o.cell for o in self.objects}
        return [c for c in CELLS if c not in used]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "image_size": self.image_size,
            "background": {"color": self.background_color, "texture": self.background_texture},
            "objects": [
                {"name": o.name, "shape": o.shape, "color": o.color, "texture": o.texture, "size": o.size,
                 "cell": o.cell, "box": list(o.box)}
                for o in self.objects
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "scene") -> Scene:
        """Parse and check a scene graph (e.g. one line of scenes.jsonl); `where` names it in errors."""

        def need(mapping: Any, key: str, kind: type, at: str) -> Any:
            if not isinstance(mapping, Mapping) or key not in mapping:
                raise DataError(f"{where}: missing field {at}{key}")
            value = mapping[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise DataError(f"{where}: field {at}{key} must be {kind.__name__}, got {type(value).__name__}")
            return value

        def choice(value: str, allowed: tuple[str, ...], field: str) -> str:
            if value not in allowed:
                raise DataError(f"{where}: field {field} is {value!r}, expected one of {list(allowed)}")
            return value

        size = need(d, "image_size", int, "")
        bg = need(d, "background", Mapping, "")
        objs = []
        for i, od in enumerate(need(d, "objects", list, "")):
            at = f"objects[{i}]."
            box = need(od, "box", list, at)
            if len(box) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in box):
                raise DataError(f"{where}: field {at}box must be 4 integers, got {box!r}")
            x0, y0, x1, y1 = box
            if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
                raise DataError(f"{where}: field {at}box {box} lies outside the {size}x{size} image")
            objs.append(Obj(
                name=need(od, "name", str, at),
                shape=choice(need(od, "shape", str, at), SHAPES, at + "shape"),
                color=choice(need(od, "color", str, at), COLORS, at + "color"),
                texture=choice(need(od, "texture", str, at), TEXTURES, at + "texture"),
                size=choice(need(od, "size", str, at), SIZES, at + "size"),
                cell=choice(need(od, "cell", str, at), CELLS, at + "cell"),
                box=(x0, y0, x1, y1),
            ))
        return cls(
            id=need(d, "id", str, ""),
            image_size=size,
            background_color=choice(need(bg, "color", str, "background."), COLORS, "background.color"),
            background_texture=choice(need(bg, "texture", str, "background."), TEXTURES, "background.texture"),
            objects=tuple(objs),
        )


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The Generator for scene `index` of the stream `seed`. (seed, index) pairs never share a stream."""
    return np.random.default_rng([seed, index])


def cell_bounds(cell: str, image_size: int) -> tuple[float, float, float, float]:
    """Pixel bounds (x0, y0, x1, y1) of a named grid cell, as floats (cells need not be whole pixels)."""
    k = CELLS.index(cell)
    row, col = divmod(k, GRID)
    side = image_size / GRID
    return col * side, row * side, (col + 1) * side, (row + 1) * side


def place(cell: str, size: str, image_size: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A square footprint for an object of `size`, centred in `cell` (its extent drawn from `rng`).

    Centred, not jittered: the `tiny` ViT has one patch per cell, and its linear patch embedding reads a small
    object's shape only where it sits still (26 % jittered, 99 % centred; docs/miniature.md)."""
    cx0, cy0, cx1, cy1 = cell_bounds(cell, image_size)
    side = cx1 - cx0
    lo, hi = EXTENT[size]
    extent = max(3, int(round(side * rng.uniform(lo, hi))))
    x_lo, x_hi = int(np.ceil(cx0)), int(np.floor(cx1)) - extent
    y_lo, y_hi = int(np.ceil(cy0)), int(np.floor(cy1)) - extent
    if x_hi < x_lo or y_hi < y_lo:  # images so small that a cell cannot hold the object: clipped to the cell
        extent = max(1, min(int(np.floor(cx1)) - x_lo, int(np.floor(cy1)) - y_lo))
        x_hi, y_hi = x_lo, y_lo
    x0, y0 = (x_lo + x_hi + 1) // 2, (y_lo + y_hi + 1) // 2
    return x0, y0, x0 + extent, y0 + extent


def pick(rng: np.random.Generator, items: Sequence[T]) -> T:
    """One of `items`, uniformly (one draw of `rng`)."""
    return items[int(rng.integers(len(items)))]


def pick_color(rng: np.random.Generator, avoid: set[str]) -> str:
    """A palette colour not in `avoid` (an object the colour of the background would be invisible)."""
    options = [c for c in COLORS if c not in avoid]
    return options[int(rng.integers(len(options)))]


def generate_scene(seed: int, index: int, image_size: int = 64, scene_id: str | None = None) -> Scene:
    """Scene `index` of the stream `seed`: the same arguments always give the same scene."""
    rng = scene_rng(seed, index)
    bg_color = COLORS[int(rng.integers(len(COLORS)))]
    bg_texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    n_large = int(rng.integers(N_LARGE[0], N_LARGE[1] + 1))
    n_small = int(rng.integers(N_SMALL[0], N_SMALL[1] + 1))
    cells = [CELLS[k] for k in rng.permutation(len(CELLS))[: n_large + n_small]]
    # Pixel geometry comes from a stream of its own, so a scene has the same content at every image size.
    geometry = np.random.default_rng([seed, index, 2])
    objects = []
    for k, cell in enumerate(cells):
        size = "large" if k < n_large else "small"
        objects.append(Obj(
            name=f"o{k}",
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            color=pick_color(rng, {bg_color}),
            texture=TEXTURES[int(rng.integers(len(TEXTURES)))],
            size=size,
            cell=cell,
            box=place(cell, size, image_size, geometry),
        ))
    return Scene(
        id=scene_id if scene_id is not None else f"{seed}-{index:06d}",
        image_size=image_size,
        background_color=bg_color,
        background_texture=bg_texture,
        objects=tuple(objects),
    )
