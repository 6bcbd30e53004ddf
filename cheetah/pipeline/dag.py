"""The DAG: dvc.yaml's stages as DVC resolves them, their order, and the parameters file at any scale.

`dvc.yaml` is the one definition of the pipeline; this module reads it through DVC's Python API (templating and
foreach resolved exactly as `dvc repro` resolves them), and writes `params.yaml` from a configuration file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cheetah.io import DataError

DVC_YAML = "dvc.yaml"
SOURCE = "data/source"  # the source image-caption corpus, versioned by data.dvc (cheetah.pipeline.source)
RECEIPT = "metrics/register.json"  # the registration receipt: the register stage's output


def record_paths(params: Any) -> tuple[list[str], dict[str, str]]:
    """What the parent run keeps, where `params` puts it: files, and folders with their artifact names (paths
    relative to the repository root; missing ones are skipped)."""
    files = ["dvc.lock", "dvc.yaml", "params.yaml", params.base.metrics, params.train.metrics,
             params.evaluate.metrics, RECEIPT, params.train.curve, params.train.curve_image]
    return files, {params.evaluate.out: "eval", params.validate.docs_dir: "data_docs"}


def path_inside(path: str, other: str) -> bool:
    return path == other or path.startswith(other + "/") or other.startswith(path + "/")


def read_stages(root: str | Path = ".") -> dict[str, dict[str, Any]]:
    """The stages of `root`/dvc.yaml as DVC resolves them — `${...}` filled in from params.yaml, foreach/matrix
    stages expanded — in the file's order: {name: {"cmd", "deps", "outs"}}, with the paths DVC tracks (relative to
    the repository; absolute outside it) and `outs` holding every output, metrics and plots included. Reading it
    through DVC, not as YAML, keeps the order and the paths right whatever the parameters file says."""
    from dvc.dependency.param import ParamsDependency
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    path = (Path(root) / DVC_YAML).resolve()
    if not path.is_file():
        raise DataError(f"{path}: not found (run from the repository root, or pass its path)")
    try:
        with Repo(str(path.parent), uninitialized=True) as repo:
            found = [s for s in repo.index.stages if isinstance(s, PipelineStage) and Path(s.path) == path]
    except DvcException as e:
        raise DataError(f"{path}: {e}") from None
    if not found:
        raise DataError(f"{path}: no `stages:`")
    stages: dict[str, dict[str, Any]] = {}
    for stage in found:
        cmd = stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd)
        stages[stage.name] = {"cmd": cmd,
                              "deps": [str(d.def_path).rstrip("/") for d in stage.deps
                                       if not isinstance(d, ParamsDependency)],
                              "outs": [str(o.def_path).rstrip("/") for o in stage.outs]}
    return stages


def _needs(stages: Mapping[str, Mapping[str, Any]]) -> dict[str, set[str]]:
    """{stage: the stages producing one of its dependencies}."""
    return {n: {m for m in stages if m != n for d in s["deps"] for o in stages[m]["outs"] if path_inside(d, o)}
            for n, s in stages.items()}


def stage_order(root: str | Path = ".") -> list[str]:
    """The stages of dvc.yaml in an order that runs every stage after the stages it depends on: the order of the
    file, except that a stage is moved after any stage producing one of its dependencies."""
    stages = read_stages(root)
    needs = _needs(stages)
    order: list[str] = []
    pending = list(stages)
    while pending:
        ready = next((n for n in pending if needs[n] <= set(order)), None)
        if ready is None:
            raise DataError(f"{Path(root) / DVC_YAML}: the stages {pending} depend on each other in a cycle")
        order.append(ready)
        pending.remove(ready)
    return order


def with_upstream(root: str | Path, stages: Sequence[str]) -> set[str]:
    """`stages` and every stage they need, directly or not (what `dvc repro <stages>` brings up to date)."""
    needs = _needs(read_stages(root))
    todo, seen = [s for s in stages if s in needs], set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(needs[name])
    return seen


def reads_source(root: str | Path = ".", stages: Sequence[str] | None = None) -> bool:
    """Whether `dvc repro [stages]` (all by default; else these stages and the stages they need) reads data/source."""
    all_stages = read_stages(root)
    if stages and any(s not in all_stages for s in stages):
        return True  # not a stage of dvc.yaml (a path, a .dvc file): let DVC decide, with the corpus in place
    seen = with_upstream(root, stages) if stages else set(all_stages)
    return any(path_inside(d, SOURCE) for n in seen for d in all_stages[n]["deps"])


# ---------------------------------------------------------------------------------------------------------------
# The parameters: params.yaml, at any scale
# ---------------------------------------------------------------------------------------------------------------

PARAMS = "params.yaml"
DEFAULT_DEEPSPEED_CONFIG = "configs/deepspeed.json"  # {}: the generated DeepSpeed config unchanged
_PARAMS_HEADER = """\
# The pipeline's parameters, written by `cheetah pipeline use {source}` from that file, with every field spelled out
# (preset defaults applied): DVC tracks, and dvc.yaml templates, only what this file says. Edit it for runs
# (`dvc exp run -S section.key=value` sets one), or edit {source} and run the command again. Typed and documented in
# cheetah/config.py.
"""


def use_params(config: str | Path, root: str | Path = ".") -> str:
    """Make the parameters file `config` (e.g. configs/vicuna-7b.yaml) the pipeline's params.yaml, every field written
    out; refuses a file whose stages would not chain (the backbone the base stage writes must be the one the others
    read, the data synthesis writes the data training reads). Returns what it did."""
    import json

    import yaml

    from cheetah.config import ConfigError, load_params, to_dict
    from cheetah.io import atomic_write_text

    params = load_params(config)
    chain = [("model.backbone_dir", params.model.backbone_dir, "base.out", params.base.out),
             ("train.data", params.train.data, "synthesize.out", params.synthesize.out)]
    problems = [f"{a} is {va!r} but {b} is {vb!r}" for a, va, b, vb in chain if va != vb]
    if problems:
        raise ConfigError(f"{config}: the pipeline's stages would not chain: {'; '.join(problems)} (make them equal)")
    if params.train.deepspeed_config is None:  # a dependency of the train stage: it must name a file
        params.train.deepspeed_config = DEFAULT_DEEPSPEED_CONFIG
    tree = json.loads(json.dumps(to_dict(params)))  # plain lists and numbers for YAML
    text = _PARAMS_HEADER.format(source=config) + "\n" + yaml.safe_dump(tree, sort_keys=False, width=120)
    atomic_write_text(Path(root) / PARAMS, text)
    return (f"{Path(root) / PARAMS}: written from {config} (preset {params.model.preset}); `dvc status` shows what "
            "reruns, `cheetah pipeline run` or `dvc repro` runs it")
