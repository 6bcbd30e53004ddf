"""Running the DVC pipeline under one parent MLflow run (`cheetah pipeline run`, `make run`, the Prefect flow).

`dvc.yaml` is the one definition of the DAG: its stages, their order and what each depends on. This module reads
it (`stage_order`), runs it (`dvc repro`, whole or one stage at a time), and wraps a pipeline run in a parent
MLflow run: the run's id travels to every stage process in `CHEETAH_PARENT_RUN_ID`, so each stage's own
`cheetah.tracking.stage_run` becomes a child of it. At the end the parent run gets the pipeline's record:
`dvc.lock`, `params.yaml`, the evaluation report and metrics, the GX data docs and the registration receipt.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cheetah.io import DataError
from cheetah.tracking import PARENT_ENV

DVC_YAML = "dvc.yaml"
RECEIPT = "metrics/register.json"
# What the parent run keeps (paths relative to the repository root; missing ones are skipped).
RECORD_FILES = ("dvc.lock", "dvc.yaml", "params.yaml", "metrics/base.json", "metrics/train.json", "metrics/eval.json",
                RECEIPT, "plots/train_curve.csv", "plots/train_curve.png")
RECORD_DIRS = {"reports/eval": "eval", "reports/data_docs": "data_docs"}


# ---------------------------------------------------------------------------------------------------------------
# The DAG, from dvc.yaml
# ---------------------------------------------------------------------------------------------------------------


def _paths(entries: Any) -> list[str]:
    """Paths of a stage's `deps`/`outs`/`metrics`/`plots` list (entries are strings or one-key mappings)."""
    out = []
    for e in entries or []:
        if isinstance(e, str):
            out.append(e)
        elif isinstance(e, Mapping):
            out.extend(str(k) for k in e)
    return [p.rstrip("/") for p in out]


def _inside(path: str, other: str) -> bool:
    return path == other or path.startswith(other + "/") or other.startswith(path + "/")


def read_stages(root: str | Path = ".") -> dict[str, dict[str, Any]]:
    import yaml

    path = Path(root) / DVC_YAML
    if not path.is_file():
        raise DataError(f"{path}: not found (run from the repository root, or pass its path)")
    spec = yaml.safe_load(path.read_text()) or {}
    stages = spec.get("stages")
    if not isinstance(stages, Mapping) or not stages:
        raise DataError(f"{path}: no `stages:`")
    for name, stage in stages.items():
        if not isinstance(stage, Mapping) or "cmd" not in stage:
            raise DataError(f"{path}: stage {name!r} has no cmd (foreach/matrix stages are not supported here)")
    return dict(stages)


def stage_order(root: str | Path = ".") -> list[str]:
    """The stages of dvc.yaml in an order that runs every stage after the stages it depends on: the order of the
    file, except that a stage is moved after any stage producing one of its dependencies."""
    stages = read_stages(root)
    produces = {n: _paths(s.get("outs")) + _paths(s.get("metrics")) + _paths(s.get("plots")) for n, s in stages.items()}
    needs = {n: {m for m in stages if m != n for d in _paths(s.get("deps")) for o in produces[m] if _inside(d, o)}
             for n, s in stages.items()}
    order: list[str] = []
    pending = list(stages)
    while pending:
        ready = next((n for n in pending if needs[n] <= set(order)), None)
        if ready is None:
            raise DataError(f"{Path(root) / DVC_YAML}: the stages {pending} depend on each other in a cycle")
        order.append(ready)
        pending.remove(ready)
    return order


# ---------------------------------------------------------------------------------------------------------------
# Running DVC
# ---------------------------------------------------------------------------------------------------------------


def stage_env(parent_run_id: str | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a stage process: this interpreter's bin directory first on PATH (so `cheetah` in
    dvc.yaml is this installation's) and the parent run id. (`cheetah.tracking.configure`, called by
    `parent_run`, has already put the absolute tracking URI into the environment.)"""
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    if parent_run_id:
        env[PARENT_ENV] = parent_run_id
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


# ---------------------------------------------------------------------------------------------------------------
# The parent run
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def parent_run(root: str | Path = ".", experiment: str = "cheetah", run_name: str = "pipeline",
               tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """A parent MLflow run for one pipeline run; its id is exported in CHEETAH_PARENT_RUN_ID while it is open."""
    import mlflow

    from cheetah.registry import lineage
    from cheetah.tracking import configure

    root = Path(root).resolve()
    configure(experiment, root=root)
    info = lineage(root)
    all_tags = {"cheetah.kind": "pipeline", "git_commit": info["git_commit"], "git_dirty": info["git_dirty"],
                **(tags or {})}
    previous = os.environ.get(PARENT_ENV)
    with mlflow.start_run(run_name=run_name, tags=all_tags) as run:
        os.environ[PARENT_ENV] = run.info.run_id
        try:
            yield run
        finally:
            if previous is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = previous


def log_record(run_id: str, root: str | Path = ".", params: Any = None,
               stages_run: Sequence[str] | None = None) -> dict[str, Any]:
    """Log the pipeline's record on the parent run: files and folders (see RECORD_*), the evaluation (and training,
    base) metrics as run metrics, the params, the lineage tags, and `stages_run` (the stages DVC ran; by default
    those that logged a child run). Returns what was logged."""
    import time

    import mlflow
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from cheetah.config import flatten
    from cheetah.io import read_json
    from cheetah.registry import flat_metrics, lineage

    root = Path(root)
    client = MlflowClient()
    logged: dict[str, Any] = {"files": [], "dirs": [], "metrics": 0}
    for rel in RECORD_FILES:
        if (root / rel).is_file():
            parent = Path(rel).parent.as_posix()
            client.log_artifact(run_id, str(root / rel), artifact_path="pipeline" if parent == "." else
                                f"pipeline/{parent}")
            logged["files"].append(rel)
    for rel, dest in RECORD_DIRS.items():
        if (root / rel).is_dir() and any((root / rel).iterdir()):
            client.log_artifacts(run_id, str(root / rel), artifact_path=dest)
            logged["dirs"].append(rel)
    numbers: dict[str, float] = {}
    for rel, prefix in (("metrics/eval.json", ""), ("metrics/train.json", "train."), ("metrics/base.json", "base.")):
        if (root / rel).is_file():
            try:
                numbers.update({prefix + k: v for k, v in flat_metrics(read_json(root / rel)).items()})
            except (DataError, AttributeError):
                pass  # a metrics file that is not a JSON object is the stage's problem, reported there
    now = int(time.time() * 1000)
    batch = [Metric(k.replace("/", "_"), v, now, 0) for k, v in numbers.items()]
    for i in range(0, len(batch), 900):  # the REST API takes at most 1000 metrics per call
        client.log_batch(run_id, metrics=batch[i:i + 900], synchronous=True)
    logged["metrics"] = len(batch)
    if params is not None:
        existing = client.get_run(run_id).data.params
        items = [(k, str(v)[:500]) for k, v in flatten(params).items() if k not in existing]
        for i in range(0, len(items), 90):  # ... and at most 100 params
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 90]], synchronous=True)
    for key, value in lineage(root).items():
        client.set_tag(run_id, key, value)
    if stages_run is None:
        children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{run_id}'", output_format="list",
                                      experiment_ids=[client.get_run(run_id).info.experiment_id])
        stages_run = sorted({c.data.tags.get("cheetah.stage", c.info.run_name) for c in children})
    client.set_tag(run_id, "stages_run", ",".join(stages_run) if stages_run else "(none: up to date)")
    logged["stages_run"] = list(stages_run)
    return logged


def run_and_echo(cmd: Sequence[str], root: str | Path, env: Mapping[str, str]) -> tuple[int, str]:
    """Run `cmd`, passing its output through to this process' stdout as it comes (progress bars included), and
    return (exit status, the output as text)."""
    chunks: list[bytes] = []
    with subprocess.Popen(list(cmd), cwd=root, env=dict(env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            chunks.append(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
    return proc.returncode, b"".join(chunks).decode("utf-8", errors="replace")


def stages_in_output(text: str) -> list[str]:
    """The stages `dvc repro` ran, from its output ("Running stage 'x':")."""
    import re

    return re.findall(r"Running stage '([^']+)'", text)


def forget_stale_receipt(root: str | Path = ".", experiment: str = "cheetah") -> bool:
    """Delete the registration receipt when the tracking store no longer holds the version it names (a fresh
    clone, a deleted mlflow.db, another MLFLOW_TRACKING_URI), so that `dvc repro` registers the model again.
    Returns True when it deleted one."""
    from cheetah.registry import receipt_is_current

    receipt = Path(root) / RECEIPT
    if receipt.is_file() and not receipt_is_current(receipt, experiment, root=root):
        receipt.unlink()
        return True
    return False


def is_up_to_date(root: str | Path = ".", stages: Sequence[str] | None = None) -> bool:
    """Whether `dvc status` finds nothing to run (for `stages` and what they need, or the whole pipeline). A status
    that cannot be computed counts as "not up to date", so that `dvc repro` reports the problem."""
    import json

    done = dvc("status", "--json", *(["--with-deps", *stages] if stages else []), root=root, capture=True)
    if done.returncode != 0:
        return False
    try:
        return json.loads(done.stdout or "{}") == {}
    except ValueError:
        return False


def run_pipeline(root: str | Path = ".", stages: Sequence[str] | None = None, force: bool = False,
                 params_path: str = "params.yaml") -> int:
    """`cheetah pipeline run`: dvc repro (all, or `stages` and what they need) under a parent MLflow run.
    Returns dvc's exit status. When everything is up to date nothing runs and no MLflow run is created."""
    from cheetah.config import load_params

    root = Path(root).resolve()
    params = load_params(root / params_path)
    experiment = params.register.experiment
    if forget_stale_receipt(root, experiment):
        print(f"{RECEIPT}: the tracking store does not hold that version; registering again", flush=True)
    if not force and is_up_to_date(root, stages):
        print("Data and pipelines are up to date: nothing to run (no MLflow run created).", flush=True)
        return 0
    with parent_run(root, experiment) as run:
        args = ["repro", *(stages or [])] + (["--force"] if force else [])
        print(f"MLflow parent run {run.info.run_id}: dvc {' '.join(args)}", flush=True)
        returncode, output = run_and_echo([sys.executable, "-m", "dvc", *args], root, stage_env(run.info.run_id))
        log_record(run.info.run_id, root, params, stages_run=stages_in_output(output))
        if returncode != 0:
            import mlflow

            mlflow.set_tag("failed", f"dvc repro exited with {returncode}")
            mlflow.end_run(status="FAILED")
    return returncode
