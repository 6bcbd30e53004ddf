"""Are the recorded results those of the committed code? (`cheetah pipeline check`, `make check`, .ci/run)"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cheetah.pipeline.dvc import dvc_quiet, output_tail, is_up_to_date, stale_stages
from cheetah.pipeline.source import DATA_DVC, ensure_source


# Metrics that measure speed or memory, not results: they differ from run to run and are not compared.
VOLATILE_METRIC = ("seconds", "_per_s", "tflops", "rss", "memory")


def _numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    if isinstance(tree, Mapping):
        return {k: v for key, value in tree.items() for k, v in _numbers(value, f"{prefix}{key}.").items()}
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix[:-1]: float(tree)}
    return {}


def metric_differences(path: str | Path, committed: Any, tolerance: float, root: str | Path = ".") -> list[str]:
    """Where the metrics file at `path` differs from `committed` (its content at the last commit) by more than
    `tolerance` (relative, with the same absolute floor), speed and memory figures aside."""
    now = _numbers(json.loads((Path(root) / path).read_text()))
    then = _numbers(committed)
    out = []
    for key in sorted(set(now) | set(then)):
        if any(v in key for v in VOLATILE_METRIC):
            continue
        a, b = then.get(key), now.get(key)
        if a is None or b is None:
            out.append(f"{path}: {key} {'appeared' if a is None else 'disappeared'}")
        elif abs(a - b) > tolerance * max(1.0, abs(a)):
            out.append(f"{path}: {key} was {a}, now {b}")
    return out


def check(params: Any, root: str | Path = ".", reproduced: bool = False, tolerance: float = 0.1,
          echo: Callable[[str], None] = print) -> list[str]:
    """What makes the committed results not those of the committed code (empty: they are). Before a run (a fresh
    clone): `data.dvc` records the corpus the code and parameters generate, no stage's code, parameters or data
    differ from `dvc.lock`, and `dvc metrics show` reads every metrics file. After `make run` (`reproduced`):
    nothing is left to run, and every metrics file equals its committed version within `tolerance` (relative).
    On the machine that recorded them the run reproduces them exactly; every difference is echoed, and only one
    beyond the tolerance (which another CPU's floating-point kernels cannot explain) is a problem."""
    root = Path(root).resolve()
    problems: list[str] = []
    if ensure_source(params, root, echo=echo) == "recorded":
        problems.append(f"{DATA_DVC} does not record the corpus that the committed code and params.yaml generate")
    problems += [f"{stage}: {', '.join(why)}" for stage, why in stale_stages(root).items()]
    shown = dvc_quiet(root, "metrics", "show", "--json")
    try:
        errors = [f"dvc metrics show: {path}: {e}" for rev in json.loads(shown.stdout or "{}").values()
                  for path, data in ((rev or {}).get("data") or {}).items() if isinstance(data, Mapping)
                  for e in [data.get("error")] if e]
    except ValueError:
        errors = [f"dvc metrics show failed:\n{output_tail(shown)}"]
    problems += errors
    if reproduced:
        if not is_up_to_date(root):
            problems.append("`dvc status` is not clean after the run")
        files = subprocess.run(["git", "ls-files", "metrics"], cwd=root, capture_output=True, text=True).stdout
        for path in filter(None, files.splitlines()):
            if not path.endswith(".json"):
                continue
            committed = json.loads(subprocess.run(["git", "show", f"HEAD:{path}"], cwd=root, capture_output=True,
                                                  text=True).stdout)
            for difference in metric_differences(path, committed, 0.0, root):
                echo(f"reproduced with a difference: {difference}")
            problems += metric_differences(path, committed, tolerance, root)
    return problems
