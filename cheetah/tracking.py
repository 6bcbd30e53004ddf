"""MLflow tracking shared by every stage.

By default runs go to a local sqlite database and artifact folder (git-ignored); `MLFLOW_TRACKING_URI` overrides
it (e.g. a shared server). A pipeline run is one parent MLflow run with a child run per stage. Stages run as
separate processes (under `dvc repro` or Prefect), so the parent run's id travels in the `CHEETAH_PARENT_RUN_ID`
environment variable; without it, a stage logs a standalone run. `CHEETAH_TRACKING=0` turns tracking off.

The stages that do the work (base, train, evaluate) also log MLflow's system metrics while they run: CPU, memory,
disk and network, and GPU utilisation and memory where `pynvml` sees a GPU, as `system/*` metrics of the stage's
run (the run's "System metrics" tab). MLflow's own settings apply: `MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`
turns them off, `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` (seconds; `SYSTEM_METRICS_INTERVAL` here by default)
sets how often they are sampled.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cheetah.config import flatten

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
PARENT_ENV = "CHEETAH_PARENT_RUN_ID"
SYSTEM_METRICS_INTERVAL = 5.0
"""Seconds between system-metrics samples (MLflow's default, 10 s, leaves a minute-long stage a handful)."""


def configure(experiment: str = "cheetah", root: str | Path = ".") -> str:
    """Point MLflow at the tracking store and select the experiment; returns the tracking URI."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{Path(root).resolve() / DEFAULT_DB}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        artifact_location = None
        if uri.startswith("sqlite:///"):  # artifacts next to the database, wherever the process runs
            artifact_location = (Path(uri[len("sqlite:///"):]).resolve().parent / DEFAULT_ARTIFACTS).as_uri()
        mlflow.create_experiment(experiment, artifact_location=artifact_location)
    mlflow.set_experiment(experiment)
    return uri


def flat_metrics(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every finite number of a nested metrics dict, keyed by its dotted path (characters MLflow refuses in metric
    names become `_`)."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_metrics(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)] = float(value)
    return out


def _log_params(params: dict[str, Any] | None) -> None:
    if params:
        import mlflow

        mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})


def _system_metrics_wanted() -> bool:
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").strip().lower() not in ("false", "0")


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any] | None = None, experiment: str = "cheetah",
              enabled: bool = True, system_metrics: bool = False) -> Iterator[Any]:
    """A child run of the pipeline's parent run (or a standalone run) for one stage. Yields the active run, or
    None when tracking is disabled (e.g. on non-zero ranks of a distributed job).

    `system_metrics`: sample the machine's system metrics into the run while it is open (see the module doc).
    Entered while a run of the same stage is active (`cheetah.evaluate.run.evaluate` opens its run around the whole
    stage, so its system metrics cover the generation), it yields that run instead of starting another."""
    if not enabled or os.environ.get("CHEETAH_TRACKING", "1") == "0":
        yield None
        return
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.data.tags.get("cheetah.stage") == stage:
        _log_params(params)
        yield active
        return
    configure(experiment)
    parent = os.environ.get(PARENT_ENV)
    tags = {"cheetah.stage": stage}
    if parent:
        tags["mlflow.parentRunId"] = parent
    log_system = system_metrics and _system_metrics_wanted()
    if log_system and not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL)  # (it sets that variable)
    with mlflow.start_run(run_name=stage, tags=tags, log_system_metrics=log_system) as run:
        _log_params(params)
        yield run
