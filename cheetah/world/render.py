"""Rendering scene graphs to pixels, with one boolean mask per object.

Rendering is pure integer numpy + PIL rasterisation, with no anti-aliasing and PNGs written with fixed settings
and no metadata, so the same scene graph always gives byte-identical PNG files. The synthesis stage relies on
this: it edits a scene graph and renders it again, and the edited pixels differ from the original only where the
edit changed something.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math

import numpy as np
from PIL import Image, ImageDraw

from cheetah.world.scene import PALETTE, Obj, Scene, cell_bounds


@dataclasses.dataclass
class Rendered:
    """A rendered scene: the RGB image and, per object name, the mask of its visible pixels."""

    image: Image.Image
    masks: dict[str, np.ndarray]


def shade(rgb: tuple[int, int, int], strength: float) -> tuple[int, int, int]:
    """The pattern colour for a texture: darker for light colours, lighter for dark ones, so it always shows."""
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    if luminance > 100:
        return tuple(int(round(c * (1 - strength))) for c in rgb)  # type: ignore[return-value]
    return tuple(int(round(c + (255 - c) * strength)) for c in rgb)  # type: ignore[return-value]


@functools.lru_cache(maxsize=32)
def _pattern(texture: str, n: int, background: bool) -> np.ndarray:
    """Where a texture puts its pattern colour, in image coordinates (read-only; cached per size).

    Patterns are anchored to the image, not to the object, so an object keeps the same pattern pixels wherever
    it is drawn. Backgrounds use a coarser, differently oriented pattern than objects, so objects stand out.
    """
    y, x = np.mgrid[0:n, 0:n]
    if texture == "plain":
        out = np.zeros((n, n), dtype=bool)
    elif texture == "striped":
        out = ((y // 4) % 2 == 1) if background else (((x + y) // 3) % 2 == 1)
    elif texture == "dotted":
        pitch = 6 if background else 4
        out = np.isin(x % pitch, (1, 2)) & np.isin(y % pitch, (1, 2))
    else:
        raise ValueError(f"unknown texture {texture!r}")
    out.setflags(write=False)
    return out


def _polygon(kind: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
    r = (x1 - x0 - 1) / 2
    if kind == "triangle":
        return [(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)]
    if kind == "diamond":
        return [(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)]
    if kind == "star":
        pts = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return pts
    if kind == "hexagon":
        return [(cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3)) for k in range(6)]
    raise ValueError(f"no polygon for shape {kind!r}")


def footprint(obj: Obj, image_size: int) -> np.ndarray:
    """The pixels `obj` covers (before occlusion by later objects), clipped to its box."""
    canvas = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = obj.box
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
    elif obj.shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
    elif obj.shape == "cross":
        w = x1 - x0
        t0, t1 = x0 + w // 3, x0 + w - w // 3 - 1  # the bar is the middle third
        draw.rectangle([x0, y0 + (t0 - x0), x1 - 1, y0 + (t1 - x0)], fill=255)
        draw.rectangle([t0, y0, t1, y1 - 1], fill=255)
    else:
        draw.polygon(_polygon(obj.shape, obj.box), fill=255)
    mask = np.asarray(canvas) > 0
    clipped = np.zeros_like(mask)
    clipped[y0:y1, x0:x1] = mask[y0:y1, x0:x1]  # rasterisation may spill a pixel; the box is the contract
    return clipped


def cell_mask(cell: str, image_size: int) -> np.ndarray:
    """All pixels of a named grid cell (used to score empty background cells for the `add` edit)."""
    x0, y0, x1, y1 = (int(round(v)) for v in cell_bounds(cell, image_size))
    mask = np.zeros((image_size, image_size), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def render(scene: Scene) -> Rendered:
    """Draw the background, then each object in order; later objects occlude earlier ones in the masks."""
    n = scene.image_size
    canvas = np.empty((n, n, 3), dtype=np.uint8)
    bg = PALETTE[scene.background_color]
    canvas[:] = bg
    canvas[_pattern(scene.background_texture, n, True)] = shade(bg, 0.25)
    masks: dict[str, np.ndarray] = {}
    for obj in scene.objects:
        fp = footprint(obj, n)
        rgb = PALETTE[obj.color]
        canvas[fp] = rgb
        canvas[fp & _pattern(obj.texture, n, False)] = shade(rgb, 0.45)
        for name in masks:
            masks[name] &= ~fp
        masks[obj.name] = fp
    return Rendered(image=Image.fromarray(canvas, "RGB"), masks=masks)


def png_bytes(image: Image.Image) -> bytes:
    """Encode as PNG with fixed settings and no metadata chunks: equal pixels give equal bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
