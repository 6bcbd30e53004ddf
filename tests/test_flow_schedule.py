"""Prefect against a real `prefect server` started on loopback by the test (stopped in teardown):

1. a scheduled deployment fires: `python flows/pipeline.py serve --interval 5` (the `flow.serve` entry) serves the
   pipeline flow of a small DVC repository; the server's scheduler creates flow runs and the served runner completes
   them, with one task run per DVC stage;
2. prefect.yaml deploys: `prefect deploy --all` registers `cheetah-pipeline/nightly` with its nightly cron, its
   parameters and work pool, and a process worker runs it (here only its `source` task, to stay quick).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    # A session of its own, so teardown can stop the process and everything it started.
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with_group = True
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            with_group = False
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            if with_group:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # Children that outlived their leader (e.g. a flow-run subprocess) are still in the group.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_for(predicate, timeout: float, what: str, logs: list[Path] = ()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    tails = "\n".join(f"--- {p}:\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` on a free loopback port, with its own PREFECT_HOME and a fast scheduler loop."""
    root = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(root / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2", "PREFECT_RUNNER_POLL_FREQUENCY": "2",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "DVC_NO_ANALYTICS": "1",
           "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("CHEETAH_PARENT_RUN_ID", None)
    log = root / "server.log"
    proc = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)
    try:
        def healthy():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for(healthy, 90, "the Prefect server to answer /api/health", [log])
        yield {"root": root, "env": env, "url": env["PREFECT_API_URL"], "log": log}
    finally:
        _stop(proc)


def _client(url: str):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api=url)


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=ci@cheetah", "-c", "user.name=ci", *args], cwd=repo, check=True,
                   capture_output=True)


def _small_repo(path: Path) -> Path:
    """A DVC repository with a two-stage dvc.yaml (the flow reads params.yaml's register section)."""
    path.mkdir()
    (path / "dvc.yaml").write_text(
        "stages:\n"
        "  first:\n"
        "    cmd: python -c \"open('a.txt', 'w').write('a')\"\n"
        "    outs: [a.txt]\n"
        "  second:\n"
        "    cmd: python -c \"open('b.txt', 'w').write(open('a.txt').read() + 'b')\"\n"
        "    deps: [a.txt]\n"
        "    outs: [b.txt]\n")
    (path / "params.yaml").write_text("register:\n  experiment: scheduled\n")
    _git(path, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=path, check=True)
    _git(path, "add", "-A")
    _git(path, "commit", "-qm", "small pipeline")
    return path


def test_a_scheduled_deployment_fires_and_completes(server):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter
    from prefect.client.schemas.filters import FlowRunFilterDeploymentId, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    repo = _small_repo(server["root"] / "small")
    log = server["root"] / "serve.log"
    proc = _start([sys.executable, str(REPO / "flows" / "pipeline.py"), "serve", "--name", "every-5s", "--interval",
                   "5", "--repo-dir", str(repo)], server["env"], log)
    try:
        with _client(server["url"]) as client:
            def deployment():
                found = client.read_deployments(
                    deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["every-5s"])))
                return found[0] if found else None

            dep = _wait_for(deployment, 60, "the served deployment", [log])
            assert dep.schedules and dep.schedules[0].schedule.interval.total_seconds() == 5

            def completed():
                return client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[dep.id]),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))))

            runs = _wait_for(completed, 120, "a scheduled flow run to complete", [log, server["log"]])
            run = runs[0]
            assert run.auto_scheduled, "the run was created by the scheduler, not by hand"
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
            assert sorted(t.name for t in tasks) == ["first", "second"]
            assert all(t.state.is_completed() for t in tasks)
    finally:
        _stop(proc)
    assert (repo / "b.txt").read_text() == "ab"  # the DVC stages really ran


def test_prefect_yaml_deploys_the_nightly_pipeline_and_a_worker_runs_it(server, tmp_path):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from test_flow_pipeline import TINY, copy_repo

    repo = tmp_path / "repo"
    repo.mkdir()
    copy_repo(repo)
    env = {**server["env"], "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/mlflow.db"}
    prefect = str(BIN / "prefect")
    subprocess.run([prefect, "work-pool", "create", "cheetah", "--type", "process"], env=env, check=True,
                   capture_output=True)
    done = subprocess.run([prefect, "--no-prompt", "deploy", "--all"], cwd=repo, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with _client(server["url"]) as client:
        dep = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["nightly"])))[0]
        assert dep.entrypoint == "flows/pipeline.py:pipeline" and dep.work_pool_name == "cheetah"
        assert [s.schedule.cron for s in dep.schedules] == ["0 2 * * *"] and dep.schedules[0].active
        assert dep.parameters == {"repo_dir": None, "stages": None, "force": False}
        assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(repo)}}]
        assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1

        log = tmp_path / "worker.log"
        worker = _start([prefect, "worker", "start", "--pool", "cheetah", "--type", "process"], env, log, cwd=tmp_path)
        try:
            run = client.create_flow_run_from_deployment(dep.id, parameters={"stages": ["source"]})

            def finished():
                state = client.read_flow_run(run.id).state
                return state if state.is_final() else None

            state = _wait_for(finished, 150, "the worker to run the deployment", [log])
            assert state.is_completed(), (state, log.read_text()[-3000:])
        finally:
            _stop(worker)
    # The source task ran in the deployed checkout: the copy's world.* params, regenerated and recorded in data.dvc.
    from cheetah.pipeline import read_data_dvc

    assert (repo / "data/source/captions.jsonl").is_file()
    assert read_data_dvc(repo)["world"]["n"] == TINY["world"]["n"]
    assert not (repo / "dvc.lock").exists()  # `stages: [source]` is that step alone: no DVC stage ran
