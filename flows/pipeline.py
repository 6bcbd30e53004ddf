"""The Cheetah pipeline as a Prefect flow: the source corpus, then one task per DVC stage, in the order of dvc.yaml.

The flow runs `cheetah.pipeline.Pipeline`, the one definition of a pipeline run that `cheetah pipeline run` (make
run) also calls: the source corpus in line with data.dvc (`ensure_source`), a stale registration receipt
forgotten, no MLflow run when nothing changed, otherwise one parent MLflow run and `dvc repro --single-item
<stage>` for each stage, then the run's record. The flow only passes its own step functions — the same ones, as
Prefect tasks — and a hook for the synthesis shards.

Why the tasks run DVC stages rather than calling the stage functions: DVC owns the DAG and the caching, Prefect owns
scheduling, retries and observability. `dvc.yaml` stays the one definition of the pipeline — which stages exist,
what each depends on, in which order they run — and the flow reads it instead of repeating it. Each task asks DVC
to bring one stage up to date, so a scheduled run of an unchanged pipeline does nothing, a changed parameter reruns
exactly the stages that use it, and `dvc.lock` records every run, whether it came from `dvc repro`, `make run` or
a Prefect deployment. Stages still run the same CLI (`cheetah <stage>`), so there is one code path per stage.

What Prefect adds: retries of transient failures (a killed process, a lock held by another DVC process; not a
stage whose command exits 2 — bad parameters or data, a failed validation — which would fail again), task runs
named after the stages, logs of every stage in the UI, schedules (prefect.yaml: nightly), and a markdown artifact
with the evaluation table.

Progress: every stage logs `progress <stage> <done>/<total>` lines (cheetah.progress); the task that runs the stage
keeps a Prefect progress artifact per stage up to date from them (key `cheetah-progress-<stage>`).

Synthesis shards as task runs: when the `synthesize` stage is out of date, the flow first makes its missing shards,
one task run per shard (`synthesize shard <k>`, retried on its own if a worker dies), on the stage's executor (the
Dask cluster of `synthesize.executor`/`address`, or this process), with the progress artifact counting pairs. The
shards land in the stage's work area, so the DVC stage that follows (`cheetah synthesize`, the same code and keys)
finds them all made and only merges them: DVC still runs and records the stage, and Prefect shows (and retries)
each shard. A shard that fails stops the flow with the source record named; the other shards stay made.

    python flows/pipeline.py run [--stage evaluate --stage register] [--force]    run once (ephemeral API)
                                 (--stage source: only bring data/source in line with data.dvc and params.yaml)
    python flows/pipeline.py serve [--cron "0 2 * * *"] [--interval 3600]         serve with a schedule
    prefect deploy --all        (prefect.yaml: deployment `nightly` on work pool `cheetah`)
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python flows/pipeline.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from cheetah.config import ConfigError  # noqa: E402
from cheetah.io import DataError  # noqa: E402
from cheetah.pipeline import (  # noqa: E402
    RECEIPT,
    SOURCE_STEP,
    Pipeline,
    StageFailed,
    dvc_stage,
    is_up_to_date,
    source_step,
)

ARTIFACT_KEY = "cheetah-evaluation"
SHARDED_STAGE = "synthesize"  # its shards run as task runs before the stage itself merges them


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry unless the step failed for a reason a retry cannot fix."""
    try:
        state.result()
    except StageFailed as e:
        return e.transient
    except (ConfigError, DataError):  # bad parameters or data (e.g. a corpus that cannot be restored)
        return False
    except Exception:  # noqa: BLE001 - anything else (spawning the process, ...) is worth another try
        return True
    return False


def progress_key(stage: str) -> str:
    return "cheetah-progress-" + re.sub(r"[^a-z0-9]+", "-", stage.lower()).strip("-")


class _ProgressArtifacts:
    """One Prefect progress artifact per stage label, created at its first progress line and updated after."""

    def __init__(self) -> None:
        self.ids: dict[str, Any] = {}

    def update(self, stage: str, done: int, total: int) -> None:
        percent = 100.0 * done / total if total else 100.0
        description = f"{stage}: {done} of {total}"
        if stage not in self.ids:
            self.ids[stage] = create_progress_artifact(progress=percent, key=progress_key(stage),
                                                       description=description)
        else:
            update_progress_artifact(self.ids[stage], progress=percent, description=description)


def _log_lines(stage: str) -> Any:
    """A line callback for a stage's output: each line to the task's log, its progress lines to the stage's progress
    artifact."""
    from cheetah.progress import parse_progress_line

    logger = get_run_logger()
    progress = _ProgressArtifacts()

    def on_line(line: str) -> None:
        logger.info("%s | %s", stage, line)
        parsed = parse_progress_line(line)
        if parsed:
            progress.update(*parsed)

    return on_line


@task(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=_retry_transient, task_run_name="{stage}",
      log_prints=True)
def run_stage(stage: str, repo_dir: str, parent_run_id: str | None = None, force: bool = False) -> dict[str, Any]:
    """`cheetah.pipeline.dvc_stage` as a task: `dvc repro --single-item <stage>`, its output in the task's log."""
    import os

    os.environ.setdefault("TQDM_MININTERVAL", "10")  # progress bars become log lines here: one every 10 s is plenty
    return dvc_stage(repo_dir, stage, parent_run_id, force, on_line=_log_lines(stage))


@task(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=_retry_transient, task_run_name=SOURCE_STEP,
      log_prints=True)
def source(repo_dir: str) -> dict[str, Any]:
    """`cheetah.pipeline.source_step` as a task: data/source in line with data.dvc and params.yaml."""
    from cheetah.config import load_params

    root = Path(repo_dir)
    logger = get_run_logger()
    result = source_step(root, load_params(root / "params.yaml"), echo=logger.info)
    logger.info("%s: %s", SOURCE_STEP, result["action"])
    return result


@task(retries=1, retry_delay_seconds=[10], retry_condition_fn=_retry_transient, cache_policy=NO_CACHE)
def synthesis_shard(pool: Any, job: Any, shard: Any) -> dict[str, Any]:
    """One shard of the synthesize stage (`cheetah.synthesize.pipeline.run_shard`) on the stage's executor."""
    from cheetah.synthesize.pipeline import log_shard, run_shard

    info = pool.run(run_shard, job, shard)
    log_shard(shard, info)
    get_run_logger().info("shard %d (pairs %d-%d): %d pairs in %.1f s on %s", shard.index, shard.start,
                          shard.stop - 1, info["pairs"], info["seconds"], info["host"])
    return info


def synthesize_shards(root: Path, force: bool = False) -> dict[str, Any] | None:
    """The synthesize stage's missing shards, one task run each, before `dvc repro` runs the stage (which then only
    merges them). Nothing when DVC finds the stage up to date. The work area's lock is released at the end, so the
    stage's own process can take it."""
    from cheetah.io import lock_scope

    with lock_scope():
        return _synthesize_shards(root, force)


def _synthesize_shards(root: Path, force: bool) -> dict[str, Any] | None:
    from cheetah.config import load_params
    from cheetah.engine import Pool
    from cheetah.synthesize.pipeline import (Synthesizer, build_backends, default_backbone, one_torch_thread,
                                             plan, shard_failures)
    from prefect.futures import as_completed

    if not force and is_up_to_date(root, [SHARDED_STAGE]):
        return None
    params = load_params(root / "params.yaml")
    # The stage runs in the repository root: the same paths (so the same work area and keys) from here.
    cfg = dataclasses.replace(params.synthesize, source=str(root / params.synthesize.source),
                              out=str(root / params.synthesize.out))
    backbone = default_backbone(params)
    if backbone is not None and (root / backbone).exists():
        backbone = str(root / backbone)
    run = plan(cfg, backbone)
    logger = get_run_logger()
    logger.info("%s: %d shard(s), %d to make as task runs", SHARDED_STAGE, len(run.shards), len(run.todo))
    progress = _ProgressArtifacts()
    done = run.done_before
    progress.update(SHARDED_STAGE, done, cfg.n)
    failed: list[tuple[Any, BaseException]] = []
    with one_torch_thread(), Pool(cfg.executor, workers=cfg.workers, address=cfg.address, gpu=cfg.device != "cpu",
                                   name=SHARDED_STAGE) as pool:
        if run.todo and cfg.executor == "local":  # built once, here (a Dask worker builds its own)
            run.job.synthesizer = Synthesizer(cfg, build_backends(cfg, run.job.backbone), run.job.items)
        futures = {synthesis_shard.with_options(task_run_name=f"{SHARDED_STAGE} shard {shard.index}")
                   .submit(quote(pool), quote(run.job), shard): shard for shard in run.todo}
        for future in as_completed(list(futures)):
            shard = futures[future]
            try:
                future.result()
                done += len(shard)
                progress.update(SHARDED_STAGE, done, cfg.n)
            except Exception as e:  # noqa: BLE001 - every failed shard is named below
                failed.append((shard, e))
        run.job.synthesizer = None
    if failed:
        raise shard_failures(run, failed)
    return {"shards": len(run.shards), "made": len(run.todo), "done_before": len(run.shards) - len(run.todo)}


def evaluation_markdown(root: Path, summary: dict[str, Any]) -> str:
    """The markdown artifact: the evaluation report (<evaluate.out>/report.md) under a header with the outcome."""
    import json

    from cheetah.config import load_params

    parts = ["# Cheetah pipeline run", ""]
    ran = [s for s, r in summary["stages"].items() if r.get("ran")]
    parts.append(f"Stages run: {', '.join(ran) if ran else 'none (everything was up to date)'}  ")
    if summary.get("mlflow_run_id"):
        parts.append(f"MLflow parent run: `{summary['mlflow_run_id']}`  ")
    receipt = root / RECEIPT
    if receipt.is_file():
        r = json.loads(receipt.read_text())
        parts.append(f"Registered: `{r['model_uri']}`, {r['metric']} = {r['value']:.4f}; "
                     f"{'**champion**' if r['promoted'] else 'challenger'} ({r['reason']})  ")
    report = root / load_params(root / "params.yaml").evaluate.out / "report.md"
    parts.append("")
    parts.append(report.read_text() if report.is_file() else f"_No evaluation report ({report})._")
    return "\n".join(parts) + "\n"


@flow(name="cheetah-pipeline", log_prints=True)
def pipeline(repo_dir: str | None = None, stages: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Bring the pipeline up to date: `cheetah.pipeline.Pipeline`, the sequence `cheetah pipeline run` runs, with
    the source step and every stage as a task (`stages`: these and what they need; `source` alone brings data/source
    in line), the synthesis shards as task runs before their stage, and the evaluation table as a markdown
    artifact."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    root = Path(repo_dir or REPO).resolve()
    run = Pipeline(root, stages, force)

    def before(stage: str) -> Any:
        return synthesize_shards(root, force) if stage == SHARDED_STAGE else None

    summary = run.run(run_stage=lambda stage, parent, f: run_stage.with_options(name=stage)(stage, str(root), parent, f),
                      run_source=lambda: source(str(root)), before_stage=before, check_when_up_to_date=True,
                      run_name="pipeline (prefect)", echo=logger.info,
                      tags={"prefect.flow_run_id": str(flow_run.id or ""),
                            "prefect.flow_run_name": str(flow_run.name or "")})
    if SHARDED_STAGE in summary["before"]:
        summary["shards"] = summary["before"][SHARDED_STAGE]
    if run.selected:
        unchanged = summary["mlflow_run_id"] is None
        create_markdown_artifact(key=ARTIFACT_KEY, markdown=evaluation_markdown(root, summary),
                                 description="Cheetah: DEMON / MME evaluation" +
                                 (" (unchanged: everything up to date)" if unchanged else " of this pipeline run"))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flows/pipeline.py", description="The Cheetah pipeline as a Prefect flow")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "serve"):
        p = sub.add_parser(name)
        p.add_argument("--repo-dir", default=None, help="repository root (default: this checkout)")
        p.add_argument("--stage", action="append", dest="stages", help="only this stage of dvc.yaml, or `source` (repeatable)")
        p.add_argument("--force", action="store_true", help="rerun stages even if DVC finds them up to date")
    s = sub.choices["serve"]
    s.add_argument("--name", default="nightly")
    s.add_argument("--cron", default=None, help='cron schedule (default "0 2 * * *" unless --interval is given)')
    s.add_argument("--interval", type=float, default=None, help="schedule every this many seconds instead")
    args = parser.parse_args(argv)
    parameters = {"repo_dir": args.repo_dir, "stages": args.stages, "force": args.force}
    if args.command == "run":
        pipeline(**parameters)
        return 0
    from prefect.schedules import Cron, Interval

    # A schedule with a slug (the deployment's name), as prefect.yaml's: serving a deployment that `prefect deploy`
    # created first then updates its schedule instead of failing (Prefect refuses schedules without slugs there).
    schedule = (Interval(args.interval, slug=args.name) if args.interval else
                Cron(args.cron or "0 2 * * *", timezone="UTC", slug=args.name))
    # One run at a time: two pipeline runs in one checkout would fight over DVC's lock and outputs.
    pipeline.serve(name=args.name, parameters=parameters, global_limit=1, schedules=[schedule])
    return 0


if __name__ == "__main__":
    sys.exit(main())
