"""The one definition of a pipeline run: `cheetah pipeline run` (make run) and the Prefect flow both call it.

    1. the source corpus is brought in line with data.dvc (`ensure_source`), when the stages read it;
    2. a registration receipt the tracking store no longer holds is forgotten, so the model is registered again;
    3. when DVC finds nothing to run, no MLflow run is created;
    4. otherwise one parent MLflow run, and every selected stage, in dvc.yaml's order, through
       `dvc repro --single-item <stage>` (each stage process logs a child run of it);
    5. the pipeline's record is logged on the parent run, whether the stages succeeded or not.

The Prefect flow (flows/pipeline.py) passes its own step functions — the same `dvc_stage` and `source_step` wrapped
as Prefect tasks, for retries of what is transient, task runs named after the stages and their logs — plus a hook
that runs the synthesis shards as task runs before their stage; it adds nothing to the sequence.

Which stages ran is read from DVC's status of each stage just before it runs (`dvc status --json <stage>`), and
why a stage failed from the exit status its command leaves in `$CHEETAH_EXIT_STATUS_FILE` (`cheetah.cli.main`
writes it), never from the text DVC prints: a stage that exits 2 (`cheetah.errors.EXIT_USER_ERROR`: bad
configuration or data) fails the same way again, anything else may be transient.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cheetah.config import ConfigError, load_params
from cheetah.errors import EXIT_USER_ERROR
from cheetah.pipeline.dag import RECEIPT, reads_source, stage_order, with_upstream
from cheetah.pipeline.dvc import is_up_to_date, repro_command, stage_env
from cheetah.pipeline.record import forget_stale_receipt, log_record, parent_run
from cheetah.pipeline.source import ensure_source
from cheetah.tracking import PARENT_ENV

EXIT_STATUS_ENV = "CHEETAH_EXIT_STATUS_FILE"
"""A file a `cheetah` command writes its exit status into (set for the stage processes DVC starts)."""
SOURCE_STEP = "source"  # the step before the DVC stages: data/source in line with data.dvc (not a DVC stage)

StepResult = dict[str, Any]


class StageFailed(RuntimeError):
    """A stage that failed: DVC's exit status, its command's (None: DVC itself failed), and the output's tail."""

    def __init__(self, stage: str, returncode: int, command_status: int | None, tail: str):
        self.stage, self.returncode, self.command_status = stage, returncode, command_status
        how = (f"its command exited with {command_status}" if command_status is not None
               else f"dvc exited with {returncode}")
        super().__init__(f"stage {stage!r} failed ({how}):\n{tail}")

    @property
    def transient(self) -> bool:
        """Worth another try: not bad configuration or data (exit 2), which would fail the same way."""
        return self.command_status != EXIT_USER_ERROR

    @property
    def exit_status(self) -> int:
        return self.command_status if self.command_status is not None else self.returncode


def _stream(cmd: Sequence[str], root: Path, env: Mapping[str, str],
            on_line: Callable[[str], None] | None) -> tuple[int, list[str]]:
    """Run `cmd`. Without `on_line` its output goes through to this process' stdout as it comes (progress bars
    included); with it, each finished line (a progress bar's last state) goes to `on_line`. Returns (exit status,
    the last lines)."""
    tail: list[str] = []
    pending = ""
    with subprocess.Popen(list(cmd), cwd=root, env=dict(env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            if on_line is None:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
            *lines, pending = (pending + chunk.decode("utf-8", errors="replace")).split("\n")
            for raw in lines:
                line = raw.split("\r")[-1].rstrip()
                if line:
                    tail = [*tail[-49:], line]
                    if on_line is not None:
                        on_line(line)
    if pending.strip():
        tail.append(pending.split("\r")[-1].rstrip())
    return proc.returncode, tail


def dvc_stage(root: str | Path, stage: str, parent_run_id: str | None = None, force: bool = False,
              on_line: Callable[[str], None] | None = None) -> StepResult:
    """`dvc repro --single-item <stage>` (and `--force`); raises `StageFailed`. `ran` is whether DVC found the stage
    changed (or `force`)."""
    root = Path(root)
    ran = force or not is_up_to_date(root, [stage], with_deps=False)
    with tempfile.TemporaryDirectory(prefix="cheetah-stage-") as tmp:
        status_file = Path(tmp) / "exit-status"
        env = {**stage_env(), EXIT_STATUS_ENV: str(status_file),
               **({PARENT_ENV: parent_run_id} if parent_run_id else {})}
        returncode, tail = _stream([sys.executable, "-m", "dvc", *repro_command(stage, force=force)], root, env,
                                   on_line)
        if returncode != 0:
            status = int(status_file.read_text()) if status_file.is_file() else None
            raise StageFailed(stage, returncode, status, "\n".join(tail[-30:]))
    return {"stage": stage, "ran": ran, "up_to_date": not ran}


def source_step(root: str | Path, params: Any, echo: Callable[[str], None] = print) -> StepResult:
    """data/source in line with data.dvc and params.yaml (`ensure_source`)."""
    action = ensure_source(params, Path(root), echo=echo)
    return {"stage": SOURCE_STEP, "ran": action != "up to date", "up_to_date": action == "up to date",
            "action": action}


class Pipeline:
    """One run of the pipeline in `root`: all of dvc.yaml's stages, or `stages` and the stages they need (as
    `dvc repro <stage>`); `force` reruns them even when DVC finds them up to date. `stages` may name `source` to
    bring data/source in line alone (with or without stages)."""

    def __init__(self, root: str | Path = ".", stages: Sequence[str] | None = None, force: bool = False,
                 params_path: str = "params.yaml"):
        self.root = Path(root).resolve()
        self.params = load_params(self.root / params_path)
        self.force = force
        order = stage_order(self.root)
        named = [s for s in stages or [] if s != SOURCE_STEP]
        unknown = sorted(set(named) - set(order))
        if unknown:
            raise ConfigError(f"unknown stage(s) {unknown}; dvc.yaml has {order} (and the step `{SOURCE_STEP}`)")
        wanted = with_upstream(self.root, named) if stages else set(order)  # ["source"]: that step alone
        self.selected = [s for s in order if s in wanted]
        self.with_source = SOURCE_STEP in (stages or []) or (bool(self.selected) and reads_source(self.root, named))

    def run(self, run_stage: Callable[[str, str | None, bool], StepResult] | None = None,
            run_source: Callable[[], StepResult] | None = None, before_stage: Callable[[str], Any] | None = None,
            check_when_up_to_date: bool = False, run_name: str = "pipeline", tags: Mapping[str, str] | None = None,
            echo: Callable[[str], None] = print) -> dict[str, Any]:
        """The sequence of the module docstring. `run_stage(stage, parent_run_id, force)` and `run_source()` default
        to `dvc_stage` and `source_step`; `before_stage(stage)` runs first (the flow's synthesis shards);
        `check_when_up_to_date` still runs each stage (finding nothing to do) when nothing changed. Returns
        {"stages": {name: result}, "mlflow_run_id", "before": {stage: what before_stage returned}}."""
        run_stage = run_stage or (lambda stage, parent, force: dvc_stage(self.root, stage, parent, force))
        run_source = run_source or (lambda: source_step(self.root, self.params, echo))
        summary: dict[str, Any] = {"repo_dir": str(self.root), "stages": {}, "mlflow_run_id": None, "before": {}}
        if self.with_source:
            summary["stages"][SOURCE_STEP] = run_source()
        if not self.selected:
            return summary
        experiment = self.params.register.experiment
        if forget_stale_receipt(self.root, experiment):
            echo(f"{RECEIPT}: the tracking store does not hold that version; registering again")
        if not self.force and is_up_to_date(self.root, self.selected):
            echo("Data and pipelines are up to date: nothing to run (no MLflow run created).")
            if check_when_up_to_date:
                for stage in self.selected:
                    summary["stages"][stage] = run_stage(stage, None, False)
            return summary
        all_tags = dict(tags or {})
        if SOURCE_STEP in summary["stages"]:
            all_tags["cheetah.source"] = summary["stages"][SOURCE_STEP]["action"]
        with parent_run(self.root, experiment, run_name=run_name, tags=all_tags) as run:
            summary["mlflow_run_id"] = run.info.run_id
            echo(f"MLflow parent run {run.info.run_id}: stages {', '.join(self.selected)}")
            try:
                for stage in self.selected:
                    if before_stage is not None:
                        summary["before"][stage] = before_stage(stage)
                    summary["stages"][stage] = run_stage(stage, run.info.run_id, self.force)
            except BaseException as e:
                import mlflow

                log_record(run.info.run_id, self.root, self.params, stages_run=self.ran(summary))
                mlflow.set_tag("failed", str(e).splitlines()[0][:500])
                mlflow.end_run(status="FAILED")
                raise
            summary["record"] = log_record(run.info.run_id, self.root, self.params, stages_run=self.ran(summary))
        return summary

    @staticmethod
    def ran(summary: Mapping[str, Any]) -> list[str]:
        """The steps that did something: the source step when it restored, regenerated or recorded the corpus, and
        the stages DVC found changed."""
        return [s for s, result in summary["stages"].items() if result.get("ran")]


def run_pipeline(root: str | Path = ".", stages: Sequence[str] | None = None, force: bool = False,
                 params_path: str = "params.yaml") -> int:
    """`cheetah pipeline run`: `Pipeline(...).run()` with the stages' output passed through; returns the exit status
    (that of the failed stage's command, when one failed)."""
    try:
        Pipeline(root, stages, force, params_path).run(echo=lambda line: print(line, flush=True))
    except StageFailed as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return e.exit_status
    return 0
