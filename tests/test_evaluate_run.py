"""`cheetah evaluate` / `cheetah benchmarks` end to end on tiny models: predictions in the official formats, scores,
report, chart, metrics JSON with base and VPG-C numbers, MLflow; resuming a killed evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cheetah.cli import main
from cheetah.config import load_params
from cheetah.evaluate import generation
from cheetah.evaluate.demon import load_demon
from cheetah.evaluate.mme import load_mme
from cheetah.evaluate.run import evaluate, parse_model_specs
from cheetah.io import DataError
from cheetah.model.backbones import build_backbone, save_backbone
from cheetah.model.vpgc import VPGCModel
from cheetah.model.weights import save_vpgc

N_DEMON_TASKS, PER_TASK, N_MME, PER_SUBTASK = 7, 2, 4, 2
N_SAMPLES = N_DEMON_TASKS * PER_TASK + N_MME * PER_SUBTASK * 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2 shared cores: one intra-op thread is much faster than two fighting
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A saved tiny backbone (LM weights made non-degenerate) and a non-zero VPG-C on it."""
    from cheetah.world.language import train_tokenizer

    root = tmp_path_factory.mktemp("models")
    backbone = build_backbone("tiny", tokenizer=train_tokenizer(512), image_size=32, seed=0)
    model = VPGCModel(backbone)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.language_model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for p in model.vpgc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_backbone(backbone, root / "backbone")
    model.backbone_info.source = str(root / "backbone")
    save_vpgc(model, root / "vpgc")
    return {"base": str(root / "backbone"), "vpgc": str(root / "vpgc")}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    (root / "params.yaml").write_text("world:\n  image_size: 32\n")
    assert main(["--params", str(root / "params.yaml"), "benchmarks", "--demon-dir", str(root / "demon"),
                 "--mme-dir", str(root / "mme"), "--demon-per-task", str(PER_TASK),
                 "--mme-per-subtask", str(PER_SUBTASK)]) == 0
    return {"demon": root / "demon", "mme": root / "mme"}


def _sets(bench, models, out: Path, **extra) -> list[str]:
    values = {"model.backbone_dir": models["base"], "train.out": models["vpgc"],
              "evaluate.demon_dir": str(bench["demon"]), "evaluate.mme_dir": str(bench["mme"]),
              "evaluate.out": str(out / "eval"), "evaluate.metrics": str(out / "metrics" / "eval.json"),
              "evaluate.batch_size": 4, "evaluate.max_new_tokens": 6, "evaluate.device": "cpu", **extra}
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def _params(bench, models, out: Path, **extra):
    return load_params(None, _sets(bench, models, out, **extra))


def test_benchmarks_command_writes_loadable_embedded_benchmarks(bench):
    assert json.loads((bench["demon"] / "benchmark.json").read_text())["image_size"] == 32  # params.yaml read
    tasks = load_demon(bench["demon"])
    assert len(tasks) == N_DEMON_TASKS and all(len(t.samples) == PER_TASK for t in tasks)
    mme = load_mme(bench["mme"])
    assert sorted(mme) == sorted(["existence", "count", "position", "color"])
    assert all(len(s) == 2 * PER_SUBTASK for s in mme.values())


def test_cli_evaluate_end_to_end(bench, models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # samples even from a short run
    monkeypatch.delenv("CHEETAH_PARENT_RUN_ID", raising=False)
    argv = ["--params", str(tmp_path / "absent-is-defaults.yaml")]
    (tmp_path / "absent-is-defaults.yaml").write_text("{}\n")
    for s in _sets(bench, models, tmp_path):
        argv += ["--set", s]
    assert main(argv + ["evaluate"]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    # The terminal shows a bar per model and INFO logging with the rate (nothing configured logging before).
    assert "evaluate base: 100%" in captured.err and "evaluate vpgc: 100%" in captured.err
    assert f"INFO cheetah.progress: evaluate vpgc: {N_SAMPLES} answers in" in captured.err
    assert "INFO cheetah.evaluate.run: mme/color: 4 of 4 samples to generate" in captured.err

    out = tmp_path / "eval"
    for name in ("base", "vpgc"):
        pred = out / name / "predictions"
        for task in load_demon(bench["demon"]):
            rows = json.loads((pred / "demon" / task.dataset / "pred.json").read_text())
            assert [r["sample_id"] for r in rows] == [s.sample_id for s in task.samples]
            assert set(rows[0]) == {"sample_id", "pred_response", "gt_response"}
        for subtask, samples in load_mme(bench["mme"]).items():
            lines = (pred / "mme" / f"{subtask}.txt").read_text().split("\n")[:-1]  # (answers may hold \x1e)
            assert len(lines) == len(samples) and all(len(ln.split("\t")) == 4 for ln in lines)
        assert not list(pred.rglob("*.partial.jsonl"))  # journals folded into the official files
        demon = json.loads((out / name / "demon_scores.json").read_text())
        assert len(demon["tasks"]) == N_DEMON_TASKS and "average" in demon
        mme = json.loads((out / name / "mme_scores.json").read_text())
        assert sorted(mme["subtasks"]) == sorted(["existence", "count", "position", "color"])

    report = (out / "report.md").read_text()
    assert "| Category | base | vpgc |" in report and "World_SpotTheChange" in report and "### MME" in report
    assert (out / "demon_categories.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    assert metrics["model"] == "vpgc"
    assert metrics["demon"]["average"] == demon["average"] and "vpgc" not in metrics["baselines"]
    base_demon = json.loads((out / "base" / "demon_scores.json").read_text())
    assert metrics["baselines"]["base"]["demon"]["average"] == base_demon["average"]
    assert set(metrics["mme"]) >= {"perception", "subtasks"} and "perception" in metrics["baselines"]["base"]["mme"]
    assert printed["metrics"] == metrics
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["models"]["vpgc"]["identity"]["vpgc_sha256"] and summary["models"]["base"]["generated"]
    assert summary["models"]["base"]["identity"]["vpgc_sha256"] is None

    import mlflow

    runs = mlflow.search_runs(experiment_names=["cheetah"], filter_string="tags.`cheetah.stage` = 'evaluate'")
    assert len(runs) == 1
    assert runs.iloc[0]["metrics.base.demon.average"] == pytest.approx(base_demon["average"])
    assert runs.iloc[0]["metrics.demon.average"] == pytest.approx(demon["average"])
    artifacts = {Path(a.path).name for a in mlflow.MlflowClient().list_artifacts(runs.iloc[0]["run_id"], "evaluate")}
    assert {"report.md", "demon_categories.png", "mme_subtasks.png", "eval.json", "demon-World_Story.png",
            "mme-count.png", "demon_vpgc.csv"} <= artifacts
    # The run spans the whole evaluation, generation included, and holds the machine's system metrics.
    assert runs.iloc[0]["metrics.system/cpu_utilization_percentage"] >= 0
    assert runs.iloc[0]["metrics.system/system_memory_usage_megabytes"] > 0

    # Pictures: every chart and example sheet the report shows exists; the dvc plots tables hold the scores.
    import re

    shown = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert {"demon_categories.png", "mme_subtasks.png"} <= set(shown)
    assert sorted(p for p in shown if p.startswith("examples/")) == sorted(
        [f"examples/demon-{t.dataset}.png" for t in load_demon(bench["demon"])]
        + [f"examples/mme-{s}.png" for s in load_mme(bench["mme"])])
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in shown)
    rows = (out / "plots" / "demon_vpgc.csv").read_text().splitlines()
    assert rows[0] == "category,score" and rows[-1] == f"Average,{demon['average']}"
    assert len(rows) == 2 + len(demon["categories"])


class _Killed(Exception):
    pass


def test_killed_evaluation_resumes_with_only_the_missing_samples(bench, models, tmp_path, monkeypatch):
    specs = {"vpgc": models["vpgc"]}
    full = evaluate(_params(bench, models, tmp_path / "full"), specs)
    reference = tmp_path / "full" / "eval" / "vpgc" / "predictions"

    real_iter = generation.Generator.iter_answers
    generated: list[int] = []
    kill_after = [7]

    def iter_answers(self, requests):
        for item in real_iter(self, requests):
            if len(generated) == kill_after[0]:
                raise _Killed
            generated.append(item[0])
            yield item

    monkeypatch.setattr(generation.Generator, "iter_answers", iter_answers)
    params = _params(bench, models, tmp_path / "killed")
    with pytest.raises(_Killed):
        evaluate(params, specs)
    pred = tmp_path / "killed" / "eval" / "vpgc" / "predictions"
    journaled = sum(len(p.read_text().splitlines()) for p in pred.rglob("*.partial.jsonl"))
    finished = len(list(pred.rglob("pred.json"))) * PER_TASK
    assert journaled + finished == 7  # every answer produced before the kill is on disk

    generated.clear()
    kill_after[0] = 10**9
    # The rerun may use another batch size: predictions do not depend on it.
    resumed = evaluate(_params(bench, models, tmp_path / "killed", **{"evaluate.batch_size": 3}), specs)
    assert len(generated) == N_SAMPLES - 7
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(pred) for p in pred.rglob("*") if p.is_file())
    for rel in files:
        assert (pred / rel).read_bytes() == (reference / rel).read_bytes(), rel
    assert resumed["metrics"] == full["metrics"]

    # A finished evaluation reruns without generating anything; other decoding settings are refused, not mixed in.
    generated.clear()
    evaluate(params, specs)
    assert generated == []
    changed = _params(bench, models, tmp_path / "killed", **{"evaluate.max_new_tokens": 7})
    with pytest.raises(DataError, match="existing predictions"):
        evaluate(changed, specs, benchmark="mme")
    evaluate(changed, specs, benchmark="mme", restart=True)
    assert len(generated) == N_MME * PER_SUBTASK * 2


def test_model_specs_and_cli_errors(bench, models, tmp_path, capsys):
    assert parse_model_specs(["a=x", "b.2=y=z"]) == {"a": "x", "b.2": "y=z"}
    for bad in (["noequals"], ["=x"], ["a=x", "a=y"], ["../up=x"]):
        with pytest.raises(DataError):
            parse_model_specs(bad)
    (tmp_path / "p.yaml").write_text("{}\n")
    assert main(["--params", str(tmp_path / "p.yaml"), "evaluate", "--data-dir", str(bench["mme"])]) == 2
    assert "--benchmark demon or --benchmark mme" in capsys.readouterr().err
    argv = ["--params", str(tmp_path / "p.yaml")]
    for s in _sets(bench, models, tmp_path):
        argv += ["--set", s]
    assert main(argv + ["evaluate", "--benchmark", "mme", "--data-dir", str(tmp_path / "nowhere"),
                        "--no-track"]) == 2
    assert "nowhere: MME data folder not found" in capsys.readouterr().err
    assert main(argv + ["evaluate", "--benchmark", "mme", "--model", f"x={tmp_path / 'no-model'}", "--no-track"]) == 2
    assert "no-model: no such model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Data-parallel evaluation: 2 ranks under torchrun
# ---------------------------------------------------------------------------------------------------------------

# Rank 1 dies with kill -9 after its third answer (the other rank is then stopped by torchrun).
_KILL_RANK_1 = """
import glob, os, signal, sys, time
from cheetah.evaluate import generation
real = generation.Generator.iter_answers
count = [0]
def rank0_journaled():
    return any(os.path.getsize(p) for p in glob.glob("**/.*partial-rank0.jsonl", recursive=True))
def iter_answers(self, requests):
    for item in real(self, requests):
        if os.environ["RANK"] == "1" and count[0] == 3:
            # Killed once rank 0 has journaled an answer too (it may start later): both journals are kept.
            deadline = time.monotonic() + 120
            while not rank0_journaled() and time.monotonic() < deadline:
                time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGKILL)
        count[0] += 1
        yield item
generation.Generator.iter_answers = iter_answers
from cheetah.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _torchrun(tmp_path: Path, argv: list[str], program: list[str]) -> subprocess.CompletedProcess:
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CHEETAH_LOG_LEVEL": "INFO"}
    env.pop("CHEETAH_PARENT_RUN_ID", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *program, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_two_ranks_give_the_one_process_predictions_and_resume_after_a_kill(bench, models, tmp_path):
    specs = {"vpgc": models["vpgc"]}
    one = evaluate(_params(bench, models, tmp_path / "one"), specs)
    reference = _files(tmp_path / "one" / "eval" / "vpgc" / "predictions")

    argv = ["--params", str(tmp_path / "p.yaml")]
    (tmp_path / "p.yaml").write_text("{}\n")
    for s in _sets(bench, models, tmp_path / "two"):
        argv += ["--set", s]
    argv += ["evaluate", "--no-track", "--model", f"vpgc={models['vpgc']}"]

    # Killed: what either rank had journaled stays; nothing is final yet.
    (tmp_path / "kill_rank_1.py").write_text(_KILL_RANK_1)
    killed = _torchrun(tmp_path, argv, [str(tmp_path / "kill_rank_1.py")])
    assert killed.returncode != 0
    pred = tmp_path / "two" / "eval" / "vpgc" / "predictions"
    journals = list(pred.rglob(".*.partial-rank*.jsonl"))
    assert journals, killed.stderr[-3000:]
    assert {p.name.rsplit("-", 1)[1] for p in journals} == {"rank0.jsonl", "rank1.jsonl"}
    done = sum(len(p.read_text().splitlines()) for p in journals)
    assert 3 <= done < N_SAMPLES and not list(pred.rglob("pred.json"))

    # Resumed with 2 ranks: only the missing answers, the one-process files, progress and logs on stderr.
    resumed = _torchrun(tmp_path, argv, ["-m", "cheetah.cli"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "eval" / "evaluation.json").read_text())
    assert summary["ranks"] == 2
    assert sum(summary["models"]["vpgc"]["generated"].values()) == N_SAMPLES - done
    assert _files(pred) == reference
    printed = json.loads(resumed.stdout)  # rank 0 alone prints the results
    # The same numbers; where they ran (here a checkout, there a temporary folder) is their provenance.
    printed["metrics"].pop("provenance"), one["metrics"].pop("provenance")
    assert printed["metrics"] == one["metrics"]
    assert "evaluate: rank 1 of 2 on cpu" in resumed.stderr and "on rank 1" in resumed.stderr
    assert "evaluate vpgc: 100%" in resumed.stderr and "answers/s)" in resumed.stderr
