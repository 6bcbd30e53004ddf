"""Deterministic shards of the synthesis work, their keys, and the work area that lets a killed run resume.

The pairs 0..n-1 are cut into shards of `synthesize.shard_size` consecutive indices. Sample i depends only on
(the settings, the backbone, the source records it draws, i), never on the shard, the worker or the order, so
merging the shards in index order gives the same bytes for any shard size and any number of workers.

A finished shard is a folder in the stage's work area, a sibling of the output folder that only this stage
writes (`<parent>/.<out name>.shards/`, claimed like every folder a stage fills in place, `cheetah.io.claim_dir`):

    <index:05d>-<key>/synthetic.jsonl    the shard's synthetic records, in index order
    <index:05d>-<key>/quarantine.jsonl   its rejected candidates
    <index:05d>-<key>/images/syn-*.png   its edited images (written as they are made: memory stays bounded)
    <index:05d>-<key>/shard.json         its range, counts, the source records it used, the time it took

Each shard folder appears in one rename (`cheetah.io.atomic_dir`), so a folder that exists is complete. Its key
hashes everything its bytes depend on: the settings that shape the output, the backbone's weights, the code of the
synthesis, world and model packages, the list of usable source records (it fixes which record sample i draws) and
the content (record fields, scene graph, image bytes) of every record the shard's samples draw. A rerun reuses
exactly the shards whose key is unchanged: after a kill or a failed shard only the missing shards run, and a
changed record reruns only the shards that draw it. When the merged output is in place the work area is removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cheetah.config import SynthesizeConfig, to_dict
from cheetah import provenance
from cheetah.io import DataError, claim_dir, read_json, remove_output
from cheetah.model.weights import weights_digest
from cheetah.synthesize.common import SourceItem

WORK_KIND = "synthesis work area"  # the kind of the work area folder (cheetah.io.claim_dir)
SHARD_KIND = "synthesis shard"  # the kind of each finished shard folder (cheetah.io.atomic_dir)
SHARD_INFO = "shard.json"
# Settings that never change a shard's bytes: where things are, how the work is spread, and the caption samples
# (made when the shards are merged).
_NOT_IN_KEY = frozenset({"source", "out", "workers", "executor", "address", "shard_size", "captions"})
_CODE_PACKAGES = ("synthesize", "world", "model")


class ShardFailed(DataError):
    """A shard raised on one of its samples. Names the shard, the sample and the source record it drew."""

    def __init__(self, message: str, shard: int | None = None, pair: int | None = None,
                 record: dict[str, Any] | None = None, trace: str = ""):
        super().__init__(message)
        self.shard, self.pair, self.record, self.trace = shard, pair, record, trace

    def __reduce__(self):  # survives the trip from a Dask worker with its fields
        return (type(self), (str(self), self.shard, self.pair, self.record, self.trace))


@dataclasses.dataclass(frozen=True)
class Shard:
    index: int
    start: int
    stop: int
    key: str

    @property
    def name(self) -> str:
        return f"{self.index:05d}-{self.key[:20]}"

    def __len__(self) -> int:
        return self.stop - self.start


# ---------------------------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------------------------


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def item_digest(item: SourceItem) -> str:
    """A source record's content: its fields, its scene graph and its image's bytes."""
    scene = item.scene.to_dict() if item.scene is not None else None
    return _sha([item.index, item.id, item.image, item.caption, scene, item.sha256])


def code_digest() -> str:
    """The source of the packages a shard runs (a code change must not reuse shards made by the old code)."""
    return provenance.code_digest([f"cheetah/{package}" for package in _CODE_PACKAGES])


def backbone_digest(backbone: Any) -> str | None:
    """The attention selector's backbone: a directory's weight files, a preset name, or a loaded model's tensors."""
    if backbone is None:
        return None
    if isinstance(backbone, (str, Path)):
        path = Path(backbone)
        if path.is_dir():
            return weights_digest(path) or _sha(["empty", str(path)])  # the one folder digest (training's, too)
        return _sha(["name", str(backbone)])
    import torch

    model = getattr(backbone, "model", backbone)
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_key(cfg: SynthesizeConfig, backbone: Any, items: Sequence[SourceItem]) -> str:
    """What every shard of this run depends on."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_IN_KEY}
    usable = [(it.index, it.id) for it in items]
    return _sha({"settings": settings, "backbone": backbone_digest(backbone) if cfg.selector == "attention" else None,
                 "code": code_digest(), "usable": _sha(usable)})


def plan_shards(n: int, size: int, key: str, drawn: Sequence[SourceItem]) -> list[Shard]:
    """Shards of `size` consecutive pair indices; `drawn[i]` is the source record sample i draws."""
    shards = []
    for index, start in enumerate(range(0, n, size)):
        stop = min(n, start + size)
        records = sorted({drawn[i].index: item_digest(drawn[i]) for i in range(start, stop)}.items())
        shards.append(Shard(index, start, stop, _sha([key, start, stop, records])))
    return shards


# ---------------------------------------------------------------------------------------------------------------
# The work area
# ---------------------------------------------------------------------------------------------------------------


class WorkArea:
    """`<parent>/.<out name>.shards/`: finished shards of an unfinished run of the stage writing `out`."""

    def __init__(self, out: str | Path):
        out = Path(out)
        self.out = out
        self.path = out.parent / f".{out.name}.shards"

    def open(self) -> "WorkArea":
        """Create the area (or check that an existing one is this stage's), and drop half-written shard folders."""
        claim_dir(self.path, WORK_KIND)
        for tmp in self.path.glob(".*.tmp"):  # a shard being written when the run was killed
            shutil.rmtree(tmp, ignore_errors=True)
        return self

    def shard_dir(self, shard: Shard) -> Path:
        return self.path / shard.name

    def is_done(self, shard: Shard) -> bool:
        return (self.shard_dir(shard) / SHARD_INFO).is_file()

    def info(self, shard: Shard) -> dict[str, Any]:
        return read_json(self.shard_dir(shard) / SHARD_INFO)

    def remove(self) -> None:
        remove_output(self.path, WORK_KIND)
