"""Provenance: where a result came from, on the ground floor so that every stage can record it.

`lineage(root)` is what the code, parameters and data of a run were, as tags (strings):

    git_commit, git_dirty     the code (the commit `dvc exp run` or `make run` ran on; dirty: uncommitted edits,
                              listed in git_uncommitted); dvc_experiment: the `dvc exp run` experiment, if any
    dvc_lock_hash             sha256 of the dvc.lock entries of every stage upstream of `stage` (canonical JSON),
                              i.e. of the exact data, parameters and code hashes that produced the result
    data_hash                 DVC's md5 of data/source (data.dvc if there is one, else the `world` stage in dvc.lock)
    backbone_hash             DVC's md5 of the backbone directory (the `base` stage), when DVC produced it

Training records it in the VPG-C card and evaluation in its metrics, at the time they run: the registry's champion
gate reads those records (cheetah.registry.provenance), not the state of the folder it happens to run in.
`code_digest` is the one hash of source code (resumable training states, synthesis shards, study steps).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
"""The folder that holds the `cheetah` package (the checkout, for an editable install): code paths are relative to it."""
DVC_EXPERIMENT_ENV = "DVC_EXP_NAME"  # set by `dvc exp run` in every stage's environment
PROVENANCE_FIELD = "provenance"
"""The field of a VPG-C card (at training) and of evaluation metrics (at evaluation) that holds `lineage`."""


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def load_yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text()) if path.is_file() else None


def out_md5(entry: Mapping[str, Any] | None, path: str) -> str | None:
    for out in (entry or {}).get("outs", []) or []:
        if out.get("path") == path:
            return out.get("md5")
    return None


def uncommitted_changes(root: str | Path = ".") -> list[str] | None:
    """Files that differ from the commit (modified, staged, deleted or untracked, not ignored), except what the
    pipeline itself writes from committed inputs before it registers: `dvc.lock` and every output it lists
    (metrics, plots, the receipt), the `.gitignore` files DVC keeps, the lock files of folders being written and the marks of single-file outputs, and `data.dvc` when it records the embedded
    world (regenerated from the committed `world.*` parameters; a corpus of your own in it counts). None when
    `root` is not a git checkout."""
    from cheetah.io import FILE_MARK_SUFFIX, LOCK_SUFFIX
    from cheetah.pipeline.source import DATA_DVC, read_data_dvc

    try:
        done = subprocess.run(["git", "status", "--porcelain=v1", "-z", "--untracked-files=all"], cwd=root,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    entries = done.stdout.split("\0")
    changed, i = [], 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        changed.append(entry[3:])
        if entry[0] in "RC":  # a rename or copy is followed by its source path
            i += 1
    lock = load_yaml(Path(root) / "dvc.lock") or {}
    outputs = {"dvc.lock"} | {str(o.get("path", "")).rstrip("/") for st in (lock.get("stages") or {}).values()
                              for o in (st or {}).get("outs") or [] if isinstance(o, Mapping)}
    if read_data_dvc(root)["world"] is not None:
        outputs.add(DATA_DVC)
    return sorted(c for c in changed if Path(c).name != ".gitignore" and not Path(c).name.endswith((LOCK_SUFFIX, FILE_MARK_SUFFIX)) and
                  not any(c == o or c.startswith(o + "/") for o in outputs if o))


def code_state(root: str | Path = ".") -> dict[str, str]:
    """The code a process runs on in `root`: `git_commit`, `git_dirty` ("true", "false" or "unknown": not a git
    checkout), `git_uncommitted` (when dirty), `dvc_experiment` (inside `dvc exp run`). What training and evaluation
    record (PROVENANCE_FIELD) and the first tags of `lineage`."""
    root = Path(root)
    tags: dict[str, str] = {}
    commit = _git(root, "rev-parse", "HEAD")
    tags["git_commit"] = commit or "unknown"
    changes = uncommitted_changes(root)
    tags["git_dirty"] = "unknown" if changes is None else str(bool(changes)).lower()
    if changes:
        tags["git_uncommitted"] = ", ".join(changes[:20]) + (f" and {len(changes) - 20} more" if len(changes) > 20
                                                             else "")
    experiment = os.environ.get(DVC_EXPERIMENT_ENV)
    if experiment:
        tags["dvc_experiment"] = experiment
    return tags


def lineage(root: str | Path = ".", stage: str = "register", code: Mapping[str, str] | None = None) -> dict[str, str]:
    """The lineage tags of a result produced in `root` by `stage` (see the module docstring): the code state (`code`,
    as recorded when the stage started; None: `code_state` now) and the hashes of what DVC recorded upstream of
    `stage`. Missing facts are "unknown"."""
    root = Path(root)
    tags = dict(code) if code is not None else code_state(root)
    lock = load_yaml(root / "dvc.lock") or {}
    stages = dict(lock.get("stages") or {})
    upstream = {name: entry for name, entry in stages.items() if name != stage}
    tags["dvc_lock_hash"] = (hashlib.sha256(json.dumps(upstream, sort_keys=True, default=str).encode()).hexdigest()
                             if upstream else "unknown")
    data_dvc = load_yaml(root / "data.dvc")
    data_md5 = out_md5(data_dvc, "data/source") if data_dvc else None
    tags["data_hash"] = data_md5 or out_md5(stages.get("world"), "data/source") or "unknown"
    base_outs = (stages.get("base") or {}).get("outs") or []  # the backbone: the base stage's directory output
    tags["backbone_hash"] = next((o.get("md5") for o in base_outs if str(o.get("md5", "")).endswith(".dir")),
                                 None) or "unknown"
    return tags


def code_digest(paths: Sequence[str], root: str | Path = PACKAGE_ROOT) -> str:
    """SHA-256 over the Python files under `paths` (files or folders, relative to `root`): their names and contents.
    A path that does not exist counts as empty, so the digest is the same wherever the package is installed."""
    root = Path(root)
    h = hashlib.sha256()
    for rel in paths:
        base = root / rel
        files = sorted(base.rglob("*.py")) if base.is_dir() else [base]
        for f in files:
            if f.is_file():
                h.update(f"{f.relative_to(root).as_posix()}\0".encode() + f.read_bytes() + b"\0")
    return h.hexdigest()
