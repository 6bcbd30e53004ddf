"""Running DVC from Python: the environment of a stage process, `dvc <args>`, and its machine-readable status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path


def stage_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a stage process: this interpreter's bin directory first on PATH (so `cheetah` in
    dvc.yaml is this installation's). (`cheetah.pipeline.run` adds the parent run's id; `cheetah.tracking.configure`,
    called by `parent_run`, has already put the absolute tracking URI into the environment.)"""
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def dvc(*args: str, root: str | Path = ".", env: Mapping[str, str] | None = None, capture: bool = False,
        check: bool = False) -> subprocess.CompletedProcess:
    """Run `dvc <args>` with this interpreter (no PATH lookup)."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=dict(env or stage_env()),
                          capture_output=capture, text=True, check=check)


def repro_command(stage: str | None = None, force: bool = False, dry: bool = False) -> list[str]:
    args = ["repro"]
    if stage:
        args += ["--single-item", stage]
    if force:
        args.append("--force")
    if dry:
        args.append("--dry")
    return args


def dvc_quiet(root: Path, *args: str) -> subprocess.CompletedProcess:
    """`dvc <args>` with its output captured and no terminal to ask on: DVC then refuses (rather than asks) to
    delete workspace data it has not cached, so a corpus it does not know is never lost."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=stage_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)


def output_tail(done: subprocess.CompletedProcess, lines: int = 15) -> str:
    return "\n".join((done.stdout + done.stderr).strip().splitlines()[-lines:])


def is_up_to_date(root: str | Path = ".", stages: Sequence[str] | None = None, with_deps: bool = True) -> bool:
    """Whether `dvc status` finds nothing to run: for `stages` (and, `with_deps`, what they need), or the whole
    pipeline. A status that cannot be computed counts as "not up to date", so that `dvc repro` reports the
    problem."""
    args = ["status", "--json", *(["--with-deps"] if stages and with_deps else []), *(stages or [])]
    done = dvc(*args, root=root, capture=True)
    if done.returncode != 0:
        return False
    try:
        return json.loads(done.stdout or "{}") == {}
    except ValueError:
        return False


def stale_stages(root: str | Path = ".") -> dict[str, list[str]]:
    """Stages whose recorded dependencies (code, parameters, data) differ from the checkout, from `dvc status
    --json`: {stage: [what changed]}. Outputs not built yet (a fresh clone) and upstream outputs that are missing
    are not changes."""
    done = dvc_quiet(Path(root), "status", "--json")
    if done.returncode != 0:
        raise RuntimeError(f"`dvc status` failed:\n{output_tail(done)}")
    stale: dict[str, list[str]] = {}
    for stage, entries in (json.loads(done.stdout or "{}") or {}).items():
        reasons: list[str] = []
        for entry in entries:
            if isinstance(entry, str):  # "changed command", "always changed", ...
                reasons.append(entry)
                continue
            for kind, changes in entry.items():
                if kind == "changed outs":
                    continue
                if kind != "changed deps":
                    reasons.append(kind)
                    continue
                for path, what in changes.items():
                    if isinstance(what, Mapping):  # a parameters file: {key: modified | new | deleted}
                        reasons += [f"{path}: {key} {change}" for key, change in what.items()]
                    elif what != "deleted":
                        reasons.append(f"{path} {what}")
        if reasons:
            stale[stage] = reasons
    return stale
