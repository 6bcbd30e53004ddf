"""Data passed between the synthesis steps: candidate regions, edits, and rejections."""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cheetah.config import ConfigError
from cheetah.io import DataError


@dataclasses.dataclass
class Region:
    """A candidate edit target: an object's mask (or, for `add`, an empty background area) and what it is.

    `attrs` is an attribute dict as `cheetah.world.language` understands it: world objects carry size, color,
    texture, shape and position; objects on real images carry label and position; background areas only carry
    position.
    """

    name: str
    mask: np.ndarray
    attrs: dict[str, str]


@dataclasses.dataclass
class Edit:
    """One proposed edit.

    The structured description (`describe()`) is what the synthetic set stores; `mask` is where pixels may
    change, `prompt` describes the new content (the inpainting prompt and the CLIP filter's text) and `scene` is
    the edited scene graph when the world renderer applies the edit.
    """

    type: str
    object: str
    before: dict[str, str] | None
    after: dict[str, str] | None
    mask: np.ndarray
    sentence: str
    prompt: str
    scene: Any = None

    @property
    def region(self) -> list[int]:
        return bbox(self.mask)

    def describe(self) -> dict[str, Any]:
        return {"type": self.type, "object": self.object, "before": self.before, "after": self.after,
                "region": self.region}


class Reject(Exception):
    """A candidate that cannot be used. `code` is a short stable reason (counted in stats.json)."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def bbox(mask: np.ndarray) -> list[int]:
    """Half-open pixel box [x0, y0, x1, y1] around the True pixels of `mask` (like PIL's crop box)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("empty mask has no bounding box")
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def box_mask(box: list[int] | tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def local_dir(path: str | None, setting: str) -> Path:
    """A model directory that must already be on this machine: model backends never download anything."""
    if not path:
        raise ConfigError(f"{setting} is not set; point it at a local model directory")
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{setting}: {path} is not a local directory (model backends load only from local "
                          f"paths; download or convert the weights there first)")
    return p


@dataclasses.dataclass
class SourceItem:
    """One usable record of the source corpus. `index` is its position in captions.jsonl (0-based)."""

    index: int
    id: str
    image: str
    path: Path
    caption: str
    scene: Any = None
    sha256: str = ""
    """SHA-256 of the image file as read when the corpus was checked (part of the synthesis shards' keys)."""

    def load_image(self) -> Image.Image:
        """The image, as RGB. With `sha256` set, bytes other than those checked are refused (DataError): a shard's
        key names the image it was made from, so a file changed since (or another copy on a worker) must not be
        used in its place."""
        data = self.path.read_bytes()
        if self.sha256 and hashlib.sha256(data).hexdigest() != self.sha256:
            raise DataError(f"{self.image}: the image of record {self.id!r} changed since the corpus was checked "
                            f"(sha256 {hashlib.sha256(data).hexdigest()[:12]}..., checked {self.sha256[:12]}...)")
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
