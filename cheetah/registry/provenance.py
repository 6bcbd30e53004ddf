"""Lineage: the code, parameters and data a registered model came from, and whether it may become champion.

Tags of every version:

    git_commit, git_dirty     the code (the commit `dvc exp run` or `make run` ran on; dirty: uncommitted edits,
                              listed in git_uncommitted); dvc_experiment: the `dvc exp run` experiment, if any
    dvc_lock_hash             sha256 of the dvc.lock entries of every stage upstream of `register` (canonical JSON),
                              i.e. of the exact data, parameters and code hashes that produced this model
    data_hash                 DVC's md5 of data/source (data.dvc if there is one, else the `world` stage in dvc.lock)
    backbone_hash             DVC's md5 of the backbone directory (the `base` stage), when DVC produced it
    config.*                  the configuration it was trained in (preset, backbone init, world size, ...)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DVC_EXPERIMENT_ENV = "DVC_EXP_NAME"  # set by `dvc exp run` in every stage's environment


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


def lineage(root: str | Path = ".", stage: str = "register") -> dict[str, str]:
    """The lineage tags of a model produced in `root` (see the module docstring). Missing facts are "unknown"."""
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


def config_tags(card: Mapping[str, Any]) -> dict[str, str]:
    """The configuration a model was trained in, from its card: `config.preset`, `config.backbone_init` (pretrain,
    random, checkpoint), `config.random_backbone`, `config.world_size`, `config.zero_stage`, `config.precision`,
    `config.launcher`."""
    training = card.get("training") or {}
    tags = {f"config.{k}": str(card.get(k)) for k in ("backbone_init", "random_backbone")}
    tags.update({f"config.{k}": str(training.get(k)) for k in ("preset", "world_size", "zero_stage", "precision",
                                                              "launcher")})
    return tags


def champion_eligibility(tags: Mapping[str, str]) -> tuple[bool, str]:
    """Whether a version with these lineage tags may take `champion` automatically: only from committed code,
    parameters and data (`git_dirty` false), and not from a `dvc exp run` experiment nobody committed. The rest
    become `challenger`; `cheetah registry promote` moves `champion` by hand, recorded with its reason."""
    if tags.get("dvc_experiment"):
        return False, f"it comes from the DVC experiment {tags['dvc_experiment']!r}, not from committed parameters"
    if tags.get("git_dirty") != "false":
        what = tags.get("git_uncommitted") or "git status unknown"
        return False, f"the code, parameters or data it was trained from are not committed ({what})"
    return True, "committed code, parameters and data"
