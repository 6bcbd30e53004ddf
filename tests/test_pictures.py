"""Pictures for people: contact sheets of synthetic pairs, qualitative evaluation examples, the MME chart and the
tables `dvc plots` compares, offline Data Docs, and MLflow system metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from cheetah.config import SynthesizeConfig, ValidateConfig, WorldConfig
from cheetah.pictures import SheetRow, render_sheet

REPO = Path(__file__).resolve().parents[1]

DEMON = {"tasks": {"NLVR2": {"metric": "accuracy", "score": 62.5}, "VIST": {"metric": "rouge_l", "score": 12.5}},
         "categories": {"visual_story_telling_list": 12.5, "multi_image_reasoning": 62.5}, "average": 37.5}
MME = {"subtasks": {"count": 96.667, "existence": 185.0}, "perception": 281.667, "cognition": None,
       "perception_max": 400, "cognition_max": 0}


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    from cheetah.synthesize import synthesize
    from cheetah.world import write_corpus

    root = tmp_path_factory.mktemp("sheets")
    source = write_corpus(WorldConfig(out=str(root / "source"), n=12, seed=0))
    synthesize(SynthesizeConfig(source=str(source), out=str(root / "synthetic"), n=16, captions=2,
                                selector="random"))
    return root / "synthetic"


def test_render_sheet_is_deterministic_and_wraps(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 32), (200, 0, 0)).save(image)
    rows = [SheetRow(images=(image,), captions=("one",), text=(("Text", "word " * 200 + "x" * 300),),
                     boxes=((0, 0, 8, 8),))]
    png = render_sheet("title", rows, thumb=64, text_width=300)
    assert png == render_sheet("title", rows, thumb=64, text_width=300)
    (tmp_path / "s.png").write_bytes(png)
    width, height = _png(tmp_path / "s.png")
    assert width == 10 + 74 + 10 + 300 + 10 and height > 600  # long text wraps into many lines, not wider
    with pytest.raises(Exception, match="cannot be read"):
        render_sheet("t", [SheetRow(images=(tmp_path / "missing.png",))])


def test_contact_sheets_are_written_by_synthesis_per_edit_type(synthetic):
    from cheetah.synthesize.contact_sheet import PER_TYPE, SHEETS_DIR, contact_rows

    pairs = [json.loads(line) for line in (synthetic / "synthetic.jsonl").read_text().splitlines()]
    by_type: dict[str, list[dict]] = {}
    for p in pairs:
        by_type.setdefault(p["edit"]["type"], []).append(p)
    sheets = synthetic / SHEETS_DIR
    assert sorted(p.name for p in sheets.iterdir()) == sorted(f"{t}.png" for t in by_type)
    manifest = json.loads((synthetic / ".cheetah-output.json").read_text())
    assert {f"{SHEETS_DIR}/{t}.png" for t in by_type} <= set(manifest["files"])  # part of the published set
    rows, counts = contact_rows(synthetic)
    for kind, records in by_type.items():
        assert counts[kind] == len(records)
        shown = records[:PER_TYPE]  # the first pairs in file order, not a selection
        assert [r.images for r in rows[kind]] == [tuple(synthetic / i for i in p["images"]) for p in shown]
        assert [dict(r.text)["Response"] for r in rows[kind]] == [p["response"] for p in shown]
        assert [r.boxes[1] for r in rows[kind]] == [tuple(p["edit"]["region"]) for p in shown]
        width, height = _png(sheets / f"{kind}.png")
        assert width > 600 and height > 128 * len(shown)


def test_synthetic_data_docs_render_offline_and_show_the_contact_sheets(synthetic, tmp_path):
    from cheetah.validate import run_suite
    from cheetah.validate.docs import remote_resources, vendor_manifest

    result = run_suite("synthetic", synthetic, ValidateConfig(docs_dir=str(tmp_path / "docs")))
    site = Path(result.report_dir)
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 4
    for page in pages:
        text = page.read_text()
        assert remote_resources(text) == [], page  # nothing is fetched from the network
        for ref in re.findall(r'(?:src|href)="([^"#:]+)"', text):  # every local reference resolves
            assert (page.parent / ref).exists(), (page, ref)
    index = (site / "index.html").read_text()
    assert "static/vendor/bootstrap-table/bootstrap-table.min.js" in index  # what fills the results table
    assert 'href="contact_sheet/modify.png"' in index and (site / "contact_sheet" / "modify.png").is_file()
    # The vendored files are the ones the manifest records (npm package, path, SHA-256).
    import hashlib

    for rel, info in vendor_manifest()["files"].items():
        data = (site / "static" / "vendor" / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"], rel


def test_report_charts_and_the_tables_dvc_plots_compares(tmp_path):
    from cheetah.evaluate.figures import plot_tables
    from cheetah.evaluate.report import write_report

    results = {"base": {"demon": DEMON, "mme": MME}, "vpgc": {"demon": DEMON, "mme": None}}
    written = write_report(tmp_path / "r", results)
    out = tmp_path / "r"
    assert _png(out / "mme_subtasks.png")[0] >= 600 and written["mme_chart"] == out / "mme_subtasks.png"
    png = (out / "mme_subtasks.png").read_bytes()
    write_report(tmp_path / "r", results)
    assert (out / "mme_subtasks.png").read_bytes() == png  # byte-identical for the same numbers
    report = (out / "report.md").read_text()
    assert "![MME by subtask](mme_subtasks.png)" in report and "![DEMON by category](demon_categories.png)" in report
    # In the paper's category order and the official subtask order, whatever order the dicts had.
    assert (out / "plots" / "demon_base.csv").read_text() == (
        "category,score\nVisual Storytelling,12.5\nMulti-Image Reasoning,62.5\nAverage,37.5\n")
    assert (out / "plots" / "mme_base.csv").read_text() == "subtask,score\nexistence,185.0\ncount,96.667\n"
    assert set(plot_tables(results)) == {"demon_base.csv", "mme_base.csv", "demon_vpgc.csv"}
    assert not (tmp_path / "r2").exists()
    write_report(tmp_path / "r2", {"vpgc": {"demon": DEMON}})
    assert not (tmp_path / "r2" / "mme_subtasks.png").exists()  # no MME scores, no MME chart


def test_dvc_plots_compare_the_tables_evaluate_writes():
    """dvc.yaml's evaluation plots read the tables `cheetah evaluate` writes for its default models."""
    from cheetah.config import load_params
    from cheetah.evaluate.figures import MME_CHART, PLOTS_DIR
    from cheetah.evaluate.run import default_model_specs

    params = load_params(REPO / "params.yaml")
    out = params.evaluate.out
    text = (REPO / "dvc.yaml").read_text().replace("${evaluate.out}", out)  # DVC's templating, for this one key
    plots = {k: v for p in yaml.safe_load(text)["plots"] for k, v in (p.items() if isinstance(p, dict) else [(p, None)])}
    assert f"{out}/{MME_CHART}" in plots and f"{out}/demon_categories.png" in plots
    models = list(default_model_specs(params))
    for plot, field in (("eval_demon", "category"), ("eval_mme", "subtask")):
        benchmark = plot.split("_")[1]
        assert plots[plot]["y"] == {f"{out}/{PLOTS_DIR}/{benchmark}_{m}.csv": field for m in models}
        assert plots[plot]["x"] == "score"
        assert (REPO / ".dvc" / "plots" / f"{plots[plot]['template']}.json").is_file()


def test_examples_show_each_models_answer_from_its_prediction_files(tmp_path):
    from cheetah.evaluate.demon import load_demon, write_demon_task
    from cheetah.evaluate.examples import demon_rows, mme_rows, write_examples
    from cheetah.evaluate.mme import load_mme, write_mme_subtask
    from cheetah.evaluate.predictions import PredictionStore
    from cheetah.world import generate_scene, png_bytes, render

    png = png_bytes(render(generate_scene(3, 0, 32)).image)
    records = [{"sample_id": i, "task_instruction_id": 0, "response": f"truth {i}",
                "task_instance": {"context": "{image#1} {image#2} What changed?", "images_path": ["a.png", "b.png"]}}
               for i in range(4)]
    write_demon_task(tmp_path / "demon", "Spot-the-Diff", ["Describe. "], records, {"a.png": png, "b.png": png})
    write_mme_subtask(tmp_path / "mme", "count", [(f"{k}.png", png, [("One?", "Yes"), ("Two?", "No")])
                                                  for k in range(3)])
    task = load_demon(tmp_path / "demon")[0]
    mme = load_mme(tmp_path / "mme")["count"]
    for model in ("base", "vpgc"):
        demon_store = PredictionStore(tmp_path / model / "demon", "demon", "Spot-the-Diff")
        for s in task.samples:
            demon_store.add_sample(s, f"{model} says {s.key}")
        demon_store.finalize()
        mme_store = PredictionStore(tmp_path / model / "mme", "mme", "count")
        for s in mme:
            mme_store.add_sample(s, f"{model} {s.key}")
        mme_store.finalize([s.key for s in mme])
    predictions = {"base": tmp_path / "base", "vpgc": tmp_path / "vpgc", "absent": tmp_path / "absent"}
    written, markdown = write_examples(tmp_path / "report", predictions, tmp_path / "demon", tmp_path / "mme",
                                       per_task=2)
    assert sorted(p.name for p in written.values()) == ["demon-Spot-the-Diff.png", "mme-count.png"]
    assert "![DEMON Spot-the-Diff](examples/demon-Spot-the-Diff.png)" in markdown and "(examples/mme-count.png)" in markdown

    from cheetah.evaluate.examples import _demon_answers, _mme_answers

    rows = demon_rows(task, _demon_answers(predictions, "Spot-the-Diff"), per_task=2)
    assert [dict(r.text) for r in rows] == [
        {"Prompt": task.samples[k].prompt, "Truth": f"truth {k}", "base": f"base says {k}", "vpgc": f"vpgc says {k}"}
        for k in range(2)]  # a model without predictions ("absent") is left out
    assert rows[0].images == task.samples[0].images
    rows = mme_rows(mme, _mme_answers(predictions, "count"), per_task=2)
    assert len(rows) == 2 and rows[1].captions == ("1.png",)
    assert rows[0].text == (("Q1 (truth: Yes)", "One?"), ("base", "base 0.png#0"), ("vpgc", "vpgc 0.png#0"),
                            ("Q2 (truth: No)", "Two?"), ("base", "base 0.png#1"), ("vpgc", "vpgc 0.png#1"))


def test_system_metrics_are_logged_for_a_stage_and_can_be_turned_off(monkeypatch):
    import time

    import mlflow

    from cheetah.tracking import stage_run

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # (the session's throwaway store)
    monkeypatch.delenv("CHEETAH_PARENT_RUN_ID", raising=False)
    with stage_run("train", {"lr": 1}, experiment="sysmetrics", system_metrics=True) as run:
        with stage_run("train", {"steps": 2}, experiment="sysmetrics") as inner:  # the same stage: the same run
            assert inner.info.run_id == run.info.run_id
        time.sleep(1.0)
    logged = mlflow.get_run(run.info.run_id).data
    assert logged.params == {"lr": "1", "steps": "2"}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(logged.metrics)

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    with stage_run("train", experiment="sysmetrics", system_metrics=True) as run:
        time.sleep(0.6)
    assert not [k for k in mlflow.get_run(run.info.run_id).data.metrics if k.startswith("system/")]


def test_every_stage_run_names_its_code_and_dvc_experiment(tmp_path, monkeypatch):
    """A stage run outside `make run` (`dvc repro`, `dvc exp run`) is not anonymous: the commit it ran on, whether the
    tree was dirty, and the DVC experiment it belongs to."""
    import subprocess

    import mlflow

    from cheetah.tracking import stage_run

    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for args in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(git + args, cwd=tmp_path, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, check=True, capture_output=True,
                            text=True).stdout.strip()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CHEETAH_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-seed")
    (tmp_path / "edit.py").write_text("x = 1\n")
    with stage_run("train", experiment="named-runs") as run:
        pass
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert (tags["git_commit"], tags["mlflow.source.git.commit"]) == (commit, commit)
    assert (tags["git_dirty"], tags["git_uncommitted"], tags["dvc_experiment"]) == ("true", "edit.py", "lucky-seed")


def test_every_stage_is_logged_the_same_way_by_the_boundary(tmp_path, monkeypatch, capsys):
    """`track_stage` (what the CLI runs every stage in) logs the params of the stage's sections as `section.key`,
    every finite number of the result flattened, and its artifacts; the stage function itself tracks nothing, and
    `log_steps` outside a run does nothing."""
    import mlflow

    from cheetah.cli import main
    from cheetah.config import Params
    from cheetah.tracking import StageResult, log_steps, track_stage

    monkeypatch.delenv("CHEETAH_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("CHEETAH_TRACKING", raising=False)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    p = Params()
    p.register.experiment = "boundary"

    def stage() -> StageResult:
        log_steps([(1, {"loss": 2.0}), (2, {"loss": 1.5, "lr": float("nan")})])  # (non-finite values are left out)
        return StageResult({"a": {"b": 1, "c": float("inf")}, "n": 3, "name": "text"},
                           [(tmp_path / "folder", "dir"), (tmp_path / "b.txt", None), ({"k": 1}, "doc/k.json")])

    log_steps([(1, {"loss": 9.0})])  # no run: nothing, no error
    result = track_stage("demo", p, ("train",), stage, extra_params={"suite": "x"})
    assert result.metrics["n"] == 3
    run = mlflow.search_runs(experiment_names=["boundary"], output_format="list")[0]
    assert run.data.tags["cheetah.stage"] == "demo"
    assert run.data.params["train.lr"] == str(p.train.lr) and run.data.params["suite"] == "x"
    assert run.data.metrics == {"a.b": 1.0, "n": 3.0, "loss": 1.5}
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.5)]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert artifacts == {"dir", "b.txt", "doc"}

    # The same through the CLI, for a stage the CLI used to log by hand: `cheetah world`.
    assert main(["--set", "register.experiment=boundary-cli", "world", "--out", str(tmp_path / "w"), "--n", "2"]) == 0
    run = mlflow.search_runs(experiment_names=["boundary-cli"], output_format="list")[0]
    assert run.data.tags["cheetah.stage"] == "world" and run.data.params["world.n"] == "2"
    assert run.data.metrics == {"n": 2.0}
    assert json.loads(capsys.readouterr().out)["n"] == 2
