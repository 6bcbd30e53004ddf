"""The pipeline's MLflow record: one parent run per pipeline run, whose children are the stages' runs.

The parent run's id travels to every stage process in `CHEETAH_PARENT_RUN_ID`, so each stage's own
`cheetah.tracking.stage_run` becomes a child of it. At the end the parent run gets the pipeline's record:
`dvc.lock`, `params.yaml`, the evaluation report and metrics, the GX data docs and the registration receipt.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cheetah.io import DataError
from cheetah.pipeline.dag import RECEIPT, record_paths
from cheetah.tracking import PARENT_ENV


@contextlib.contextmanager
def parent_run(root: str | Path = ".", experiment: str = "cheetah", run_name: str = "pipeline",
               tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """A parent MLflow run for one pipeline run; its id is exported in CHEETAH_PARENT_RUN_ID while it is open."""
    import mlflow

    from cheetah.provenance import lineage
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
    """Log the pipeline's record on the parent run: files and folders (`record_paths`; `params`: params.yaml by
    default), the evaluation (and training, base) metrics as run metrics, the params, the lineage tags, and
    `stages_run` (the stages DVC ran; by default those that logged a child run). Returns what was logged."""
    import time

    import mlflow
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from cheetah.config import flatten
    from cheetah.io import read_json
    from cheetah.provenance import lineage
    from cheetah.tracking import flat_metrics

    from cheetah.config import load_params

    root = Path(root)
    if params is None:
        params = load_params(root / "params.yaml")
    client = MlflowClient()
    logged: dict[str, Any] = {"files": [], "dirs": [], "metrics": 0}
    record_files, record_dirs = record_paths(params)
    for rel in record_files:
        if (root / rel).is_file():
            parent = Path(rel).parent.as_posix()
            client.log_artifact(run_id, str(root / rel), artifact_path="pipeline" if parent == "." else
                                f"pipeline/{parent}")
            logged["files"].append(rel)
    for rel, dest in record_dirs.items():
        if (root / rel).is_dir() and any((root / rel).iterdir()):
            client.log_artifacts(run_id, str(root / rel), artifact_path=dest)
            logged["dirs"].append(rel)
    numbers: dict[str, float] = {}
    for rel, prefix in ((params.evaluate.metrics, ""), (params.train.metrics, "train."),
                        (params.base.metrics, "base.")):
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
