"""The whole pipeline, for real, on a throwaway copy of the repository with every stage shrunk (params.yaml):

1. the Prefect flow runs its `source` task and every DVC stage against the ephemeral API: the copy has data.dvc but
   no data/source and no DVC data, and its world.* params differ from the ones data.dvc records, so the embedded
   world is regenerated and recorded in data.dvc and every stage runs; task runs named after the stages, one parent
   MLflow run with the stages' child runs, a registered model with `challenger` and `champion` tagged with
   data.dvc's hash, the evaluation table as a markdown artifact, and `dvc status` clean afterwards;
2. a second `dvc repro` reruns nothing;
3. changing an `evaluate` parameter reruns evaluate and register only, through `cheetah pipeline run`;
4. `dvc exp run -S register.margin=...` reruns register only; the new version, no better, stays challenger
   (tests/test_dvc_pipeline.py runs `dvc exp run -S train.lr=...` on a small pipeline);
5. `dvc push` to the default remote and `dvc pull` in a fresh clone round-trip the outputs and data/source;
6. another `world.n` is recorded in data.dvc and reruns the stages that read data/source (validate_source, base,
   synthesize: then, through their outputs, everything downstream but benchmarks); the previous data.dvc is restored
   from the cache.

Steps 1-6 share one pipeline run and change its repository one after another, so they are one test that calls them
in this order (each step a function below): the suite can run in any order. The flow's retry test has a repository
of its own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cheetah.config import load_params
from cheetah.pipeline import ensure_source, read_data_dvc

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# What the pipeline needs from the checkout (plus .gitignore files): code, DAG, params, DVC and Prefect config.
COPY = ["cheetah", "configs", "flows", "dvc.yaml", "params.yaml", "data.dvc", "prefect.yaml", "pyproject.toml",
        ".dvc/config", ".dvc/plots", ".dvcignore", ".gitignore", "data/.gitignore"]
# Every stage, shrunk: the whole pipeline in about a minute and a half on 2 cores.
TINY = {
    "world": {"n": 32, "image_size": 32},
    "language": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_scenes": 2, "threads": 1},
    "middle": {"steps": 2, "batch_size": 2, "input_batch": 2, "warmup_steps": 1, "eval_scenes": 2, "threads": 1},
    "base": {"vision_steps": 4, "steps": 4, "batch_size": 4, "yes_no_batch": 4, "eval_scenes": 2, "probe_scenes": 16,
             "probe_heldout": 8, "warmup_steps": 1, "threads": 1},
    "synthesize": {"n": 12, "captions": 12, "workers": 1, "shard_size": 4},  # 3 shards: 3 task runs
    "train": {"steps": 3, "synthetic_batch": 2, "caption_batch": 2, "checkpoint_every": 3, "eval_every": 3,
              "warmup_steps": 1, "log_every": 1, "heldout_fraction": 0.2, "threads": 1},  # 2 of the 12 pairs held out
    "evaluate": {"demon_per_task": 1, "mme_per_subtask": 2, "max_new_tokens": 4, "batch_size": 16, "probe_scenes": 16,
                 "threads": 1},
}
DVC_STAGES = ["validate_source", "language", "middle", "base", "synthesize", "validate", "train", "benchmarks",
              "validate_demon", "validate_mme", "evaluate", "register"]
STAGES = ["source", *DVC_STAGES]  # the flow's tasks: the source corpus (data.dvc), then the stages of dvc.yaml
SHARD_TASKS = [f"synthesize shard {k}" for k in range(3)]  # made as task runs before the stage merges them


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.email=ci@cheetah", "-c", "user.name=ci", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def dvc(repo: Path, *args: str, check: bool = True) -> str:
    from cheetah.pipeline import dvc as run_dvc

    done = run_dvc(*args, root=repo, capture=True)
    out = done.stdout + done.stderr
    if check and done.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({done.returncode}):\n{out[-4000:]}")
    return out


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def tiny_params(source: Path | None) -> dict:
    """The repository's params.yaml (or the defaults), every field written out, every stage shrunk."""
    from cheetah.config import load_params, to_dict

    params = to_dict(load_params(source if source and source.exists() else None))
    for section, values in TINY.items():
        params[section].update(values)
    return params


def copy_repo(dest: Path) -> Path:
    from conftest import copy_checkout

    copy_checkout(dest, COPY)
    (dest / "params.yaml").write_text(yaml.safe_dump(tiny_params(REPO / "params.yaml"), sort_keys=False))
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "throwaway copy")
    return dest


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    repo = root / "repo"
    repo.mkdir()
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo}/mlflow.db")
    mp.setenv("DVC_NO_ANALYTICS", "1")
    mp.setenv("DS_ACCELERATOR", "cpu")
    mp.setenv("TOKENIZERS_PARALLELISM", "false")
    mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # system metrics even from the shrunk stages
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    mp.delenv("CHEETAH_PARENT_RUN_ID", raising=False)
    mp.chdir(root)
    copy_repo(repo)
    try:
        yield {"root": root, "repo": repo}
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings({PREFECT_HOME: home, PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(scope="module")
def flow_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cheetah_flows_pipeline", REPO / "flows" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pipeline_through_the_flow_then_reruns_experiments_and_the_remote(env, prefect_api, flow_module):
    """Steps 1-6 of the module's docstring, in that order, on one pipeline run."""
    flow_run = {"state": flow_module.pipeline(repo_dir=str(env["repo"]), return_state=True), "module": flow_module}
    flow_runs_every_stage_with_tracking_and_an_evaluation_artifact(env, flow_run)
    second_repro_reruns_nothing(env)
    an_evaluate_parameter_reruns_only_evaluate_and_register_under_cheetah_pipeline_run(env)
    dvc_exp_run_of_a_register_parameter_reruns_register_only(env)
    push_and_pull_round_trip_through_the_default_remote(env)
    a_world_parameter_is_recorded_in_data_dvc_and_reruns_what_reads_the_corpus(env)


def flow_runs_every_stage_with_tracking_and_an_evaluation_artifact(env, flow_run):
    import mlflow
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    repo, state = env["repo"], flow_run["state"]
    assert state.is_completed(), state
    summary = state.result()
    assert list(summary["stages"]) == STAGES and all(s["ran"] for s in summary["stages"].values())

    # Prefect: one task run per stage, named after it, all completed; the evaluation table as an artifact.
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["cheetah-evaluation"])))
    assert sorted(t.name for t in tasks) == sorted(STAGES + SHARD_TASKS)
    assert all(t.state.is_completed() for t in tasks)
    assert summary["shards"] == {"shards": 3, "made": 3, "done_before": 0}
    with get_client(sync_client=True) as client:
        progress = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["cheetah-progress-synthesize", "cheetah-progress-evaluate-vpgc"])))
    assert {a.key for a in progress} == {"cheetah-progress-synthesize", "cheetah-progress-evaluate-vpgc"}
    assert all(a.type == "progress" for a in progress)
    assert {a.key: a.data for a in progress if a.data == 100.0}.keys() == {a.key for a in progress}
    assert len(artifacts) == 1 and artifacts[0].type == "markdown"
    markdown = artifacts[0].data
    assert "### DEMON by category" in markdown and "| **Average** |" in markdown
    assert f"Registered: `models:/cheetah-vpgc/1`" in markdown and "**champion**" in markdown

    # MLflow: one parent run; the stages that track log child runs of it; the pipeline's record on the parent.
    client = MlflowClient()
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["cheetah.kind"] == "pipeline"
    assert parent.data.tags["prefect.flow_run_id"] == str(flow_run_id)
    assert parent.data.tags["git_commit"] == git(repo, "rev-parse", "HEAD")
    children = mlflow.search_runs(experiment_ids=[parent.info.experiment_id], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    child_stages = {str(c.data.tags.get("cheetah.stage")).split("-")[0] for c in children}  # validate-synthetic
    assert {"base", "train", "evaluate", "register", "validate"} <= child_stages <= set(DVC_STAGES)
    # The stages that do the work log the machine's system metrics (CPU, memory, ...) on their runs.
    by_stage = {c.data.tags.get("cheetah.stage"): c for c in children}
    for stage in ("base", "train", "evaluate"):
        assert "system/cpu_utilization_percentage" in by_stage[stage].data.metrics, stage
    # Every input was validated, each with its Data Docs: the source corpus, the synthetic set, both benchmarks.
    assert {"validate-source", "validate-synthetic", "validate-demon", "validate-mme"} <= set(by_stage)
    # The synthesis run holds the contact sheets of the set it wrote.
    sheets = {Path(a.path).name for a in client.list_artifacts(by_stage["synthesize"].info.run_id, "contact_sheet")}
    pairs = [json.loads(line) for line in (repo / "data/synthetic/synthetic.jsonl").read_text().splitlines()]
    assert sheets == {f"{p['edit']['type']}.png" for p in pairs} and sheets
    assert parent.data.tags["stages_run"].split(",") == STAGES
    assert parent.data.tags["cheetah.source"] == "recorded"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pipeline", "eval", "data_docs"} <= artifacts
    assert "pipeline/dvc.lock" in {a.path for a in client.list_artifacts(parent.info.run_id, "pipeline")}
    for suite in ("source", "synthetic", "demon", "mme"):
        assert f"data_docs/{suite}/index.html" in {a.path for a in client.list_artifacts(parent.info.run_id,
                                                                                           f"data_docs/{suite}")}
    eval_metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert parent.data.metrics["demon.average"] == pytest.approx(eval_metrics["demon"]["average"])

    # The registry: version 1, challenger and (no champion before) champion, with its lineage.
    version = client.get_model_version_by_alias("cheetah-vpgc", "challenger")
    assert str(version.version) == "1"
    assert str(client.get_model_version_by_alias("cheetah-vpgc", "champion").version) == "1"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    recorded = read_data_dvc(repo)
    assert recorded["world"] == {"n": TINY["world"]["n"], "seed": 0, "image_size": TINY["world"]["image_size"]}
    assert recorded["md5"] != read_data_dvc(REPO)["md5"]  # not the corpus of the checkout's data.dvc
    assert version.tags["data_hash"] == recorded["md5"]
    assert next(d["md5"] for d in lock["stages"]["base"]["deps"] if d["path"] == "data/source") == recorded["md5"]
    receipt = json.loads((repo / "metrics/register.json").read_text())
    assert receipt["version"] == 1 and receipt["promoted"] is True

    # DVC: everything recorded in dvc.lock; metrics and plots readable.
    assert json.loads(dvc(repo, "status", "--json")) == {}
    assert set(lock["stages"]) == set(DVC_STAGES)
    shown = json.loads(dvc(repo, "metrics", "show", "--json"))
    files = shown[""]["data"]
    assert files["metrics/eval.json"]["data"]["demon"]["average"] == eval_metrics["demon"]["average"]
    assert "metrics/register.json" not in files  # the receipt is an output, not a metric
    assert not any("error" in f for f in files.values())
    plots = json.loads(dvc(repo, "plots", "show", "--json"))
    assert not plots.get("errors"), plots.get("errors")
    assert {"plots/train_curve.csv", "reports/eval/demon_categories.png", "reports/eval/mme_subtasks.png",
            "eval_demon", "eval_mme"} <= set(plots["data"])
    compared = plots["data"]["eval_demon"][0]["content"]["data"]["values"]
    assert {v["filename"] for v in compared} == {"demon_base.csv", "demon_vpgc.csv"}


def second_repro_reruns_nothing(env):
    import mlflow

    from cheetah.pipeline import stage_env

    out = dvc(env["repo"], "repro")
    assert stages_run(out) == [] and "Data and pipelines are up to date" in out
    # Code folders are dependencies: Python's bytecode caches in them must not count as changes (.dvcignore).
    cache = env["repo"] / "cheetah" / "world" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "scene.cpython-311.pyc").write_bytes(b"bytecode")
    assert json.loads(dvc(env["repo"], "status", "--json")) == {}
    # `cheetah pipeline run` (make run) neither runs anything nor leaves an empty MLflow run behind.
    before = len(mlflow.search_runs(experiment_names=["cheetah"], output_format="list"))
    done = subprocess.run([sys.executable, "-m", "cheetah.cli", "pipeline", "run"], cwd=env["repo"], env=stage_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0 and "nothing to run" in done.stdout, done.stdout + done.stderr
    assert len(mlflow.search_runs(experiment_names=["cheetah"], output_format="list")) == before


def an_evaluate_parameter_reruns_only_evaluate_and_register_under_cheetah_pipeline_run(env):
    """`cheetah pipeline run` (what `make run` calls): one parent run, and exactly the stages that read the changed
    parameter (evaluate; register, which also serves with it) run again, nothing upstream."""
    from mlflow.tracking import MlflowClient

    from cheetah.pipeline import stage_env

    repo = env["repo"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["max_new_tokens"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert set(json.loads(dvc(repo, "status", "--json"))) == {"evaluate", "register"}

    done = subprocess.run([sys.executable, "-m", "cheetah.cli", "pipeline", "run"], cwd=repo, env=stage_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert stages_run(done.stdout + done.stderr) == ["evaluate", "register"]
    parent_id = re.search(r"MLflow parent run ([0-9a-f]{32})", done.stdout).group(1)
    client = MlflowClient()
    assert client.get_run(parent_id).data.tags["stages_run"] == "evaluate,register"
    assert str(client.get_model_version_by_alias("cheetah-vpgc", "challenger").version) == "2"
    receipt = json.loads((repo / "metrics/register.json").read_text())
    champion = str(client.get_model_version_by_alias("cheetah-vpgc", "champion").version)
    assert receipt["version"] == 2 and champion == ("2" if receipt["promoted"] else "1")
    assert json.loads(dvc(repo, "status", "--json")) == {}


def dvc_exp_run_of_a_register_parameter_reruns_register_only(env):
    """`dvc exp run -S` on the real pipeline (tests/test_dvc_pipeline.py runs `-S train.lr=...` on a small one): a
    wider margin reruns registration only, and the new version, no better, does not take `champion`."""
    from mlflow.tracking import MlflowClient

    repo = env["repo"]
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "pipeline outputs")  # dvc exp run needs a commit to branch from
    champion = str(MlflowClient().get_model_version_by_alias("cheetah-vpgc", "champion").version)
    out = dvc(repo, "exp", "run", "-S", "register.margin=0.5")
    assert stages_run(out) == ["register"], out[-3000:]
    exps = json.dumps(json.loads(dvc(repo, "exp", "show", "--json")))
    assert '"margin": 0.5' in exps
    assert yaml.safe_load((repo / "params.yaml").read_text())["register"]["margin"] == 0.5  # applied
    receipt = json.loads((repo / "metrics/register.json").read_text())
    assert receipt["version"] == 3 and receipt["promoted"] is False
    assert str(MlflowClient().get_model_version_by_alias("cheetah-vpgc", "champion").version) == champion
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "experiment: register.margin=0.5")
    # A training parameter changes the train stage only; evaluate and register follow from its new outputs.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["lr"] = 0.0005
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert set(json.loads(dvc(repo, "status", "--json"))) == {"train"}
    git(repo, "checkout", "params.yaml")


def push_and_pull_round_trip_through_the_default_remote(env):
    repo, root = env["repo"], env["root"]
    config = (repo / ".dvc/config").read_text()
    assert re.search(r"remote\s*=\s*(\S+)", config), config  # a default remote is configured
    out = dvc(repo, "push")
    assert (root / "cheetah-dvc-remote").is_dir(), out  # ../cheetah-dvc-remote, beside the repository
    clone = root / "clone"
    git(root, "clone", "-q", str(repo), str(clone))
    assert not (clone / "checkpoints/vpgc").exists()
    dvc(clone, "pull")
    for rel in ("checkpoints/vpgc/vpgc.safetensors", "data/backbone/config.json", "data/source/captions.jsonl",
                "reports/eval/report.md", "metrics/register.json"):
        assert (clone / rel).read_bytes() == (repo / rel).read_bytes(), rel
    assert json.loads(dvc(clone, "status", "--json")) == {}
    assert stages_run(dvc(clone, "repro")) == []
    assert ensure_source(load_params(clone / "params.yaml"), clone, echo=[].append) == "up to date"


def a_world_parameter_is_recorded_in_data_dvc_and_reruns_what_reads_the_corpus(env):
    """`cheetah pipeline run` and the flow call ensure_source first: another world.n regenerates the corpus and
    records it in data.dvc (`dvc add`), so DVC finds exactly the stages that read data/source changed; the rest of
    the pipeline follows from their outputs (test 1 ran it all from such a change). Benchmarks do not read it."""
    repo = env["repo"]
    before = read_data_dvc(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["world"]["n"] = TINY["world"]["n"] - 8
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ensure_source(load_params(repo / "params.yaml"), repo, echo=[].append) == "recorded"
    after = read_data_dvc(repo)
    assert after["md5"] != before["md5"] and after["world"]["n"] == TINY["world"]["n"] - 8
    assert set(json.loads(dvc(repo, "status", "--json"))) == {"validate_source", "base", "synthesize"}
    # Back to the committed params.yaml and data.dvc: that corpus comes back from DVC's cache, nothing to run.
    git(repo, "checkout", "params.yaml", "data.dvc")
    assert ensure_source(load_params(repo / "params.yaml"), repo, echo=[].append) == "restored"
    assert json.loads(dvc(repo, "status", "--json")) == {}


def test_flow_retries_a_killed_stage_but_not_a_bad_input(env, prefect_api, flow_module, tmp_path, monkeypatch):
    """Retries are for accidents: a stage killed by a signal is run again; a stage that exits 2 (cheetah's code for
    bad configuration or data) fails at once, and the flow with it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    module = flow_module
    small = tmp_path / "small"
    small.mkdir()
    (small / "dvc.yaml").write_text(
        "stages:\n"
        "  flaky:\n"  # killed (SIGKILL) the first time, fine the second
        "    cmd: python -c \"import os, signal, pathlib; m = pathlib.Path('tried'); first = not m.exists(); "
        "m.touch(); first and os.kill(os.getpid(), signal.SIGKILL); pathlib.Path('out.txt').write_text('ok')\"\n"
        "    outs: [out.txt]\n"
        "  bad:\n"  # a cheetah command refusing its input: exit 2, left in $CHEETAH_EXIT_STATUS_FILE
        "    cmd: cheetah --params no-such-params.yaml model summary --meta\n"
        "    deps: [out.txt]\n")
    (small / "params.yaml").write_text("register:\n  experiment: retries\n")
    git(small, "init", "-q")
    dvc(small, "init", "-q")
    git(small, "add", "-A")
    git(small, "commit", "-qm", "small")
    monkeypatch.setattr(module, "run_stage", module.run_stage.with_options(retry_delay_seconds=0))

    state = module.pipeline(repo_dir=str(small), return_state=True)
    assert state.is_failed()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    by_name = {t.name: t for t in runs}
    assert by_name["flaky"].state.is_completed() and by_name["flaky"].run_count == 2  # retried once
    assert by_name["bad"].state.is_failed() and by_name["bad"].run_count == 1  # not retried
    assert "exited with 2" in str(by_name["bad"].state.message) or "exited with 2" in str(
        state.result(raise_on_failure=False))
    assert (small / "out.txt").read_text() == "ok"
