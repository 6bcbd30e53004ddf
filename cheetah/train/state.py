"""Resumable training state: DeepSpeed checkpoints that are verified before they are read, and read as data only.

`state_dir` holds `step-NNNNNN/` folders, each written under a temporary name and renamed when complete, plus a
`latest` file naming the newest. Every folder carries `cheetah_state.json`: the settings fingerprint it was written
under and the SHA-256 of every file in it. Resuming takes the newest folder that is intact (its record parses, its
fingerprint matches, every file has its recorded hash) and says why it skipped any newer one, so a checkpoint
truncated by a crash or a full disk costs one checkpoint interval, not the run.

State folders are copied between machines and shared on clusters, so a file in one must never run code. DeepSpeed
reads its checkpoints with full unpickling; here every file is read with `torch.load(weights_only=True)`, which
builds tensors and plain containers only, plus the few DeepSpeed types its checkpoints hold (`SAFE_GLOBALS`). A file
asking for anything else is refused with `UnsafeState`, naming the file and the type, and nothing in it runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cheetah.config import Params, to_dict
from cheetah.errors import CheetahError
from cheetah.io import DataError, atomic_write_json, atomic_write_text, sha256_file
from cheetah.provenance import code_digest
from cheetah.train import distributed

log = logging.getLogger(__name__)

RECORD = "cheetah_state.json"
TRAINING_CODE = ("cheetah/train/vpgc.py", "cheetah/train/schedule.py", "cheetah/train/data.py",
                 "cheetah/train/distributed.py", "cheetah/train/state.py", "cheetah/model", "cheetah/formats.py",
                 "cheetah/provenance.py", "cheetah/cpu_kernels.py")
"""The code `cheetah train` runs (the train stage's code dependencies in dvc.yaml, a test keeps them equal): a state
written by other code is not resumed, so a rerun after a code change trains with the new code."""
STATE_KIND = "training state"  # the kind of folder `train.state_dir` is (cheetah.io.claim_dir)
# train.* keys that do not change what a resumed run computes: a state written under other values is still resumed
# (a run stopped by a DivergenceError resumes with a larger max_skipped_steps).
VOLATILE_KEYS = ("out", "state_dir", "metrics", "curve", "curve_image", "log_every", "checkpoint_every",
                 "keep_checkpoints", "eval_every", "feature_cache", "workers", "launcher", "deepspeed_config",
                 "max_skipped_steps")


class UnsafeState(CheetahError):
    """A state file that asks to build something other than tensors and plain data (a planted pickle)."""


def safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed 0.19 checkpoints hold (ZeRO 0-3, fp32/bf16/fp16; listed with
    `torch.serialization.get_unsafe_globals_in_checkpoint`). Each is a plain record or enum: building it runs no
    code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_tensors_only(path: str | Path, map_location: Any = None) -> Any:
    """`torch.load` that builds tensors, plain containers and `safe_globals()` only."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeState(f"{path}: refusing to read this training state file: it is not plain tensors and data "
                          f"({first}). Nothing in it was run. Delete the state folder or start over with "
                          "`cheetah train --restart`.") from None


class _TensorsOnly:
    """DeepSpeed's checkpoint engine with its `load` replaced by `load_tensors_only` (saving is unchanged)."""

    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_tensors_only(path, map_location)


# DeepSpeed settings that follow from the train.* settings and the number of ranks: the ranks are compared apart.
_PER_WORLD_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu")


def fingerprint(params: Params, data_files: list[Path], engine_config: dict[str, Any] | None = None,
                backbone: str | None = None) -> str:
    """What a resumable state depends on, the number of ranks aside (`TrainingState` compares it apart): a state
    written under other settings, data, backbone weights (`backbone`: their digest), DeepSpeed config (the merged one
    the engine runs with) or training code is not resumed."""
    train = {k: v for k, v in to_dict(params.train).items() if k not in VOLATILE_KEYS}
    engine = {k: v for k, v in (engine_config or {}).items() if k not in _PER_WORLD_KEYS}
    key = {"train": train, "model": to_dict(params.model), "data": [sha256_file(f) for f in data_files],
           "deepspeed": engine, "backbone": backbone, "code": code_digest(TRAINING_CODE)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """Every RNG as tensors and plain data (no numpy objects: the state is read with `weights_only=True`)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


class TrainingState:
    """The checkpoints of one training run in `directory` (see the module docstring)."""

    def __init__(self, directory: str | Path, keep: int, rank: int, fingerprint: str, world: int = 1):
        self.dir = Path(directory)
        self.keep = keep
        self.rank = rank
        self.fingerprint = fingerprint
        self.world = world

    def _tags(self) -> list[str]:
        return sorted((p.name for p in self.dir.glob("step-*") if p.is_dir()), reverse=True)

    def _problem(self, tag: str) -> str | None:
        """Why `tag` cannot be resumed (None: it is intact and was written under these settings)."""
        folder = self.dir / tag
        try:
            record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
            files = record["files"]
            written_under = record["fingerprint"]
        except FileNotFoundError:
            return f"it has no {RECORD} (not written completely)"
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"its {RECORD} is unreadable ({type(e).__name__}: {e})"
        if written_under != self.fingerprint:
            return "it was written under other settings or data"
        ranks = record.get("world", self.world)
        if ranks != self.world:  # the same run on another number of ranks: never restarted silently
            raise CheetahError(f"{folder}: written by {ranks} rank(s), and this run has {self.world}: its optimiser "
                               f"state is partitioned over {ranks}. Resume with {ranks} rank(s), or start over with "
                               "`cheetah train --restart`")
        if not isinstance(files, dict) or not files:
            return f"its {RECORD} lists no files"
        for rel, digest in sorted(files.items()):
            path = folder / rel
            if not path.is_file():
                return f"{rel} is missing"
            if sha256_file(path) != digest:
                return f"{rel} differs from the hash recorded when it was written (truncated or replaced)"
        return None

    def resumable(self) -> str | None:
        """The newest intact checkpoint written under these settings, saying why any newer one is skipped."""
        for tag in self._tags():
            problem = self._problem(tag)
            if problem is None:
                return tag
            if self.rank == 0:
                print(f"not resuming from {self.dir}/{tag}: {problem}")
        if self._tags() and self.rank == 0:
            print(f"no checkpoint in {self.dir} can be resumed under these settings; starting afresh")
        return None

    def load(self, engine: Any, tag: str) -> dict[str, Any]:
        """Load `tag` into the engine (weights, optimiser, scheduler) with tensors-only reads; its client state."""
        engine.checkpoint_engine = _TensorsOnly(engine.checkpoint_engine)
        _, client = engine.load_checkpoint(str(self.dir), tag=tag, load_module_strict=False)
        if client is None:
            raise DataError(f"{self.dir}/{tag}: DeepSpeed found no checkpoint to load")
        return client

    def restart(self) -> None:
        """Start over deliberately (`cheetah train --restart`): remove every checkpoint of this state folder."""
        if self.rank == 0:
            for tag in self._tags():
                shutil.rmtree(self.dir / tag)
                print(f"--restart: removed {self.dir}/{tag}")
            (self.dir / "latest").unlink(missing_ok=True)
        distributed.barrier()

    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> None:
        tag = f"step-{step:06d}"
        tmp = f".tmp-{tag}"
        if self.rank == 0 and (self.dir / tmp).exists():
            shutil.rmtree(self.dir / tmp)
        distributed.barrier()
        try:
            engine.save_checkpoint(str(self.dir), tag=tmp, client_state=client_state, save_latest=False,
                                   exclude_frozen_parameters=True)
        except RuntimeError as e:
            # A full disk reaches us from PyTorch's zip writer as a RuntimeError (no errno, no file name).
            if "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
                raise
            self._failed_write(tmp, step, e)
        distributed.barrier()
        if self.rank == 0:
            folder = self.dir / tmp
            files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
                     if p.is_file()}
            atomic_write_json(folder / RECORD, {"fingerprint": self.fingerprint, "world": self.world, "step": step,
                                              "files": files})
            if (self.dir / tag).exists():
                shutil.rmtree(self.dir / tag)
            folder.rename(self.dir / tag)
            atomic_write_text(self.dir / "latest", tag + "\n")
            # Prune only this run's checkpoints; one written under other settings is left alone.
            ours = [t for t in self._tags() if self._fingerprint_of(t) == self.fingerprint]
            for old in ours[self.keep:]:
                shutil.rmtree(self.dir / old, ignore_errors=True)
        distributed.barrier()

    def _failed_write(self, tmp: str, step: int, error: Exception) -> None:
        """The checkpoint of `step` could not be written (a full disk): its partial folder is removed (the space is
        what the user needs) and a CheetahError says so; the earlier checkpoints are left as they were."""
        shutil.rmtree(self.dir / tmp, ignore_errors=True)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        try:
            free = f"{shutil.disk_usage(self.dir).free / 2**20:.1f} MiB free there"
        except OSError:
            free = "free space unknown"
        raise CheetahError(f"{self.dir}: writing the checkpoint of step {step} failed ({reason}; {free}): is the "
                           "disk full? The partial checkpoint was removed and the earlier ones are kept; free some "
                           "space and run again to resume") from None

    def _fingerprint_of(self, tag: str) -> str | None:
        try:
            return json.loads((self.dir / tag / RECORD).read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return None
