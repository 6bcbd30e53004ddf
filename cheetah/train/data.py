"""Training data: instruction examples on disk, joint batches in a fixed ratio, and cached vision features.

An example is `{id, images: [paths relative to its folder], instruction (with one <image> per image), response}` —
the format of `synthetic.jsonl` and `captions.jsonl` written by the synthesis stage. Batches are a pure function
of (seed, step), so a resumed run sees exactly the batches an uninterrupted run would, and N data-parallel ranks
each take a fixed slice of the same global batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from cheetah.io import DataError, atomic_write_bytes, iter_jsonl, safe_join
from cheetah.model.prompts import IMAGE_TOKEN, Encoded, PromptBuilder


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    images: tuple[Path, ...]
    instruction: str
    response: str
    source_id: str | None = None


def load_examples(path: str | Path) -> list[Example]:
    """Read a JSONL of instruction examples; every problem names the file, line and field."""
    path = Path(path)
    root = path.parent
    examples = []
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno} (id={rec.get('id')!r})"
        for field, kind in (("id", str), ("instruction", str), ("response", str), ("images", list)):
            if not isinstance(rec.get(field), kind):
                raise DataError(f"{where}: field {field!r} must be a {kind.__name__}, got {rec.get(field)!r}")
        if not rec["response"].strip():
            raise DataError(f"{where}: field 'response' is empty")
        if rec["instruction"].count(IMAGE_TOKEN) != len(rec["images"]):
            raise DataError(f"{where}: field 'instruction' has {rec['instruction'].count(IMAGE_TOKEN)} {IMAGE_TOKEN} "
                            f"placeholders for {len(rec['images'])} images")
        images = tuple(safe_join(root, p, what=f"{where}: images") for p in rec["images"])
        examples.append(Example(rec["id"], images, rec["instruction"], rec["response"], rec.get("source_id")))
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{path}: duplicate id {dup!r}")
    return examples


def split_heldout(examples: Sequence[Example], fraction: float, salt: str = "heldout") -> tuple[list, list]:
    """Deterministic train/held-out split by source image, so no held-out source image is ever trained on."""
    def held(e: Example) -> bool:
        key = (e.source_id or e.id).encode()
        return int(hashlib.sha256(salt.encode() + key).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction

    return [e for e in examples if not held(e)], [e for e in examples if held(e)]


def load_pixels(path: Path, image_processor: Any) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot decode image ({e})") from None
    return image_processor(images=im, return_tensors="pt")["pixel_values"][0]


class FeatureCache:
    """Frozen-ViT features, computed once per image: in memory, and optionally on disk.

    On disk, features live under `<dir>/<backbone fingerprint>/<sha256 of the image file>.safetensors`, so a
    different backbone or a changed image never reads stale features.
    """

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], image_processor: Any,
                 directory: str | Path | None, fingerprint: str, memoize: bool = True):
        self.encode = encode
        self.image_processor = image_processor
        self.directory = Path(directory) / fingerprint if directory else None
        self.memoize = memoize or self.directory is not None
        self.memory: dict[Path, torch.Tensor] = {}
        self.computed = 0

    @classmethod
    def from_setting(cls, setting: str | None, encode: Callable[[torch.Tensor], torch.Tensor], image_processor: Any,
                     fingerprint: str) -> "FeatureCache":
        """`train.feature_cache`: "memory", a directory, or None (recompute every time)."""
        directory = None if setting in (None, "memory") else setting
        return cls(encode, image_processor, directory, fingerprint, memoize=setting is not None)

    def _disk_path(self, image: Path) -> Path:
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
        return self.directory / digest[:2] / f"{digest}.safetensors"

    @torch.no_grad()
    def get(self, images: Sequence[Path], batch_size: int = 64) -> torch.Tensor:
        if not self.memoize:
            self.computed += len(images)
            return self.encode(torch.stack([load_pixels(p, self.image_processor) for p in images])).float()
        missing = [p for p in dict.fromkeys(images) if p not in self.memory]
        todo = []
        for p in missing:
            if self.directory is not None and (f := self._disk_path(p)).exists():
                self.memory[p] = load_file(str(f))["features"]
            else:
                todo.append(p)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            pixels = torch.stack([load_pixels(p, self.image_processor) for p in chunk])
            feats = self.encode(pixels).float().cpu()
            self.computed += len(chunk)
            for p, f in zip(chunk, feats):
                self.memory[p] = f.clone()
                if self.directory is not None:
                    atomic_write_bytes(self._disk_path(p), safetensors_bytes({"features": self.memory[p]}))
        return torch.stack([self.memory[p] for p in images])


class JointSampler:
    """Which examples form step `s`: `synthetic_batch` discriminative + `caption_batch` caption examples.

    Each source is walked through a fresh seeded permutation per epoch; the positions of step `s` are a pure
    function of (seed, s), so resuming at step `s` needs no sampler state.
    """

    def __init__(self, n_synthetic: int, n_captions: int, synthetic_batch: int, caption_batch: int, seed: int):
        if n_synthetic == 0:
            raise DataError("no synthetic training examples")
        if caption_batch and n_captions == 0:
            raise DataError("caption_batch > 0 but there are no caption examples")
        self.sizes = (n_synthetic, n_captions)
        self.batches = (synthetic_batch, caption_batch)
        self.seed = seed

    def _take(self, source: int, step: int) -> list[int]:
        n, b = self.sizes[source], self.batches[source]
        out = []
        for pos in range(step * b, (step + 1) * b):
            epoch, offset = divmod(pos, n)
            perm = np.random.default_rng([self.seed, source, epoch]).permutation(n)
            out.append(int(perm[offset]))
        return out

    def step(self, step: int) -> tuple[list[int], list[int]]:
        return self._take(0, step), self._take(1, step) if self.batches[1] else []


@dataclasses.dataclass
class EncodedExample:
    encoded: Encoded
    images: tuple[Path, ...]
    source: str  # "synthetic" | "caption"


def encode_examples(builder: PromptBuilder, examples: Sequence[Example], source: str) -> list[EncodedExample]:
    return [EncodedExample(builder.encode(e.instruction, len(e.images), e.response), e.images, source)
            for e in examples]


def collate(builder: PromptBuilder, items: Sequence[EncodedExample], features: FeatureCache) -> dict[str, Any]:
    """A right-padded training batch with the vision features of its images, in order of appearance."""
    batch = builder.collate([it.encoded for it in items], "right")
    batch["vision_features"] = features.get([p for it in items for p in it.images])
    return batch

