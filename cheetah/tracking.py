"""MLflow tracking shared by every stage.

By default runs go to a local sqlite database and artifact folder (git-ignored); `MLFLOW_TRACKING_URI` overrides
it (e.g. a shared server). A pipeline run is one parent MLflow run with a child run per stage. Stages run as
separate processes (under `dvc repro` or Prefect), so the parent run's id travels in the `CHEETAH_PARENT_RUN_ID`
environment variable; without it, a stage logs a standalone run. `CHEETAH_TRACKING=0` turns tracking off.

Every stage is logged the same way, by `track_stage` at the CLI boundary (which DVC and the Prefect flow call): the
stage function (cheetah/stages.py) takes its typed config and returns a `StageResult`; the wrapper opens the stage's
run, logs the params of the sections the stage reads (`section.key`), every finite number of its metrics (flattened,
`a.b.c`) and its artifacts. What a stage logs while it runs (a training curve per step) goes through `log_steps`.

The stages that do the work (base, train, evaluate) also log MLflow's system metrics while they run: CPU, memory,
disk and network, and GPU utilisation and memory where `pynvml` sees a GPU, as `system/*` metrics of the stage's
run (the run's "System metrics" tab). MLflow's own settings apply: `MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`
turns them off, `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` (seconds; `SYSTEM_METRICS_INTERVAL` here by default)
sets how often they are sampled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cheetah.config import flatten
from cheetah.errors import CheetahError

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
PARENT_ENV = "CHEETAH_PARENT_RUN_ID"
SYSTEM_METRICS_INTERVAL = 5.0
"""Seconds between system-metrics samples (MLflow's default, 10 s, leaves a minute-long stage a handful)."""
SERVER_PATIENCE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
"""How long a tracking server is waited for, unless these MLflow settings are set: MLflow's defaults (7 retries,
backoff factor 2, 120 s per request) wait about four minutes for a server that is down before failing; these wait
about ten seconds for one that refuses connections, about a minute for one that never answers."""


class TrackingError(CheetahError):
    """The tracking server cannot be reached or refuses the request."""


def configure(experiment: str = "cheetah", root: str | Path = ".") -> str:
    """Point MLflow at the tracking store and select the experiment; returns the tracking URI."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{Path(root).resolve() / DEFAULT_DB}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
    if uri.startswith(("http://", "https://")):
        for key, value in SERVER_PATIENCE.items():
            os.environ.setdefault(key, value)
    mlflow.set_tracking_uri(uri)
    try:
        known = mlflow.get_experiment_by_name(experiment)
    except mlflow.exceptions.MlflowException as e:
        # The first request: a server that is down or refuses is one line (which server, which setting), not a
        # traceback after minutes of retries.
        reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise TrackingError(f"MLFLOW_TRACKING_URI={uri}: the tracking server did not answer ({reason}); start it, "
                            "point MLFLOW_TRACKING_URI elsewhere, or set CHEETAH_TRACKING=0 to run without "
                            "tracking") from None
    if known is None:
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
    from cheetah.provenance import code_state

    configure(experiment)
    parent = os.environ.get(PARENT_ENV)
    # The code it ran, on every run (`dvc repro` and `dvc exp run` too, not only under `make run`'s parent run):
    # git_commit, git_dirty, git_uncommitted, dvc_experiment; the commit also as MLflow's own source tag.
    code = code_state()
    tags = {"cheetah.stage": stage, **code}
    if code["git_commit"] != "unknown":
        tags["mlflow.source.git.commit"] = code["git_commit"]
    if parent:
        tags["mlflow.parentRunId"] = parent
    log_system = system_metrics and _system_metrics_wanted()
    if log_system and not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL)  # (it sets that variable)
    with mlflow.start_run(run_name=stage, tags=tags, log_system_metrics=log_system) as run:
        _log_params(params)
        yield run


@dataclasses.dataclass
class StageResult:
    """What a stage hands back to the boundary: its numbers, its artifacts and what `cheetah <stage>` prints."""

    metrics: dict[str, Any]
    """Nested numbers; every finite one is logged as a metric under its dotted path (`flat_metrics`)."""
    artifacts: list[tuple[str | Path | dict[str, Any], str | None]] = dataclasses.field(default_factory=list)
    """(file or folder, folder in the run) pairs; a dict is logged as a JSON document, the second item its name."""
    printed: Any = None
    """What the command prints as JSON (None: nothing, e.g. on the non-zero ranks of a distributed job)."""


def track_stage(stage: str, params: Any, sections: Sequence[str], run: Callable[[], StageResult | None], *,
                enabled: bool = True, system_metrics: bool = False,
                extra_params: Mapping[str, Any] | None = None) -> StageResult | None:
    """Run one stage inside its MLflow run (`stage_run`) and log what it returns: the params of `sections` of
    `params` (a `cheetah.config.Params`; "section" or "section.field") and `extra_params`, the metrics flattened, the artifacts. Only rank 0 of a
    distributed job tracks (the others have no run)."""
    from cheetah.config import to_dict

    logged: dict[str, Any] = {}
    for spec in sections:  # "train" (the section) or "evaluate.demon_per_task" (one field of it)
        section, _, field = spec.partition(".")
        values = to_dict(getattr(params, section))
        logged.setdefault(section, {}).update({field: values[field]} if field else values)
    logged |= dict(extra_params or {})
    rank0 = os.environ.get("RANK", "0") == "0"
    with stage_run(stage, logged, experiment=params.register.experiment, enabled=enabled and rank0,
                   system_metrics=system_metrics) as active:
        result = run()
        if active is not None and result is not None:
            _log_result(result)
    return result


def _log_result(result: StageResult) -> None:
    import mlflow

    mlflow.log_metrics(flat_metrics(result.metrics))
    for what, where in result.artifacts:
        if isinstance(what, dict):
            mlflow.log_dict(what, str(where))
        elif Path(what).is_dir():
            mlflow.log_artifacts(str(what), artifact_path=where or Path(what).name)
        elif Path(what).is_file():
            mlflow.log_artifact(str(what), artifact_path=where)


def log_steps(steps: Sequence[tuple[int, Mapping[str, float]]]) -> None:
    """Metrics a stage logs while it runs (a learning curve), as (step, {name: value}) pairs, on the active run;
    nothing when there is none (tracking off, or a rank other than 0)."""
    mlflow = sys.modules.get("mlflow")  # (not imported: no run is open, and importing it takes seconds)
    run = mlflow.active_run() if mlflow is not None else None
    if run is None or not steps:
        return
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for step, values in steps for k, v in values.items()
             if v is not None and math.isfinite(float(v))]
    for i in range(0, len(batch), 900):  # the REST API accepts at most 1000 metrics per batch
        MlflowClient().log_batch(run.info.run_id, metrics=batch[i:i + 900], synchronous=True)
