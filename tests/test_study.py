"""The ablation study's machinery at toy size (a couple of steps per arm): outputs, schema, MLflow, blank images,
resuming and fingerprints. Not its outcome: that needs the full-size run (docs/study.md)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml
from PIL import Image

from cheetah.cli import main
from cheetah.config import STUDY_ARMS, ConfigError, WorldConfig, load_params
from cheetah.io import FILE_MARK_SUFFIX
from cheetah.study import ARMS, BACKBONE_METRICS, blank_copy, expectations, needed_arms, summarize
from cheetah.world import write_corpus

TOY = {
    "world": {"out": "source", "n": 24, "image_size": 32},
    "language": {"out": "language", "steps": 2, "batch_size": 4, "warmup_steps": 1, "eval_scenes": 2, "threads": 1},
    "middle": {"out": "middle", "steps": 2, "batch_size": 2, "input_batch": 2, "warmup_steps": 1, "eval_scenes": 2,
               "threads": 1},
    "base": {"vision_steps": 2, "steps": 2, "batch_size": 4, "yes_no_batch": 4, "eval_scenes": 2, "probe_scenes": 16,
             "probe_heldout": 4, "out": "unused-backbone"},
    "synthesize": {"n": 8, "captions": 8, "shard_size": 8},
    "train": {"steps": 2, "synthetic_batch": 2, "caption_batch": 2, "eval_every": 1, "checkpoint_every": 2,
              "warmup_steps": 1, "heldout_fraction": 0.2, "curve_image": "plots/train_curve.png"},
    "evaluate": {"demon_per_task": 2, "mme_per_subtask": 2, "max_new_tokens": 3, "batch_size": 8, "device": "cpu",
                 "heldout_differences": True, "probe_scenes": 16},
    "study": {"seeds": [0], "work": "work", "metrics": "metrics/study.json", "report": "reports/study"},
}


def test_summarize_and_expectations():
    s = summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["values"] == [1.0, 2.0, 3.0]
    assert s["ci95"] == pytest.approx([2 - 4.302653 / 3 ** 0.5, 2 + 4.302653 / 3 ** 0.5], abs=1e-4)  # t(0.975, 2)
    assert summarize([5.0])["ci95"] is None
    hi, lo = summarize([10.0, 11.0, 12.0]), summarize([1.0, 2.0, 3.0])
    arms = {name: {"demon": {"visual_relation_inference": hi if name in ("vpgc_synthetic", "vpgc_random_target")
                             else lo}, "mme": {"detail": lo}} for name in STUDY_ARMS if name != "blind"}
    arms["blind"] = {"demon": {"visual_relation_inference": lo}, "mme": {"detail": lo}}
    out = expectations(arms)
    assert out["c_above_a_on_detail"] == {"demon.visual_relation_inference": True, "mme.detail": False}
    assert out["b_close_to_a"] == {"demon.visual_relation_inference": True, "mme.detail": True}
    assert out["c_at_or_above_d"]["demon.visual_relation_inference"] is True
    assert out["above_blind"]["base"] == {"demon.visual_relation_inference": False, "mme.detail": False}
    assert needed_arms(["blind"]) == ["vpgc_synthetic", "blind"] and ARMS["blind"].weights_of == "vpgc_synthetic"
    with pytest.raises(ConfigError, match="repeats"):
        load_params(None, ["study.seeds=[1, 1]"])


def test_blank_copy(tmp_path):
    src = tmp_path / "src"
    (src / "t").mkdir(parents=True)
    Image.new("RGB", (6, 4), (250, 0, 0)).save(src / "t" / "a.png")
    (src / "t" / "a.txt").write_text("Is it red?\tYes\n")
    out = blank_copy(src, tmp_path / "blank")
    with Image.open(out / "t" / "a.png") as im:
        assert im.size == (6, 4) and len(set(im.getdata())) == 1
    assert (out / "t" / "a.txt").read_text() == "Is it red?\tYes\n"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from cheetah.train.language import pretrain_language
    from cheetah.train.middle_layer import train_middle

    root = tmp_path_factory.mktemp("study")
    write_corpus(WorldConfig(out=str(root / "source"), n=24, image_size=32))
    (root / "params.yaml").write_text(yaml.safe_dump(TOY))
    # The language and middle stages' model, which every seed's base starts from (in the project: committed in
    # data/language-middle).
    pretrain_language(load_params(root / "params.yaml", [f"language.out={root / 'language'}",
                                                         f"language.metrics={root / 'language.json'}"]))
    train_middle(load_params(root / "params.yaml", [f"language.out={root / 'language'}", f"middle.out={root / 'middle'}",
                                                    f"middle.metrics={root / 'middle.json'}"]))
    return root


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in sorted((folder / "work" / "steps").iterdir())}


@pytest.mark.slow
def test_study_end_to_end(project, monkeypatch, one_thread):
    import mlflow

    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    before_files = {p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file()}
    assert main(["study"]) == 0
    # The arms write under study.work only, never where the pipeline's own stages write (e.g. train.curve_image).
    added = {p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file()} - before_files
    assert {a.split("/")[0] for a in added} == {"work", "metrics", "reports", "mlflow.db", "mlartifacts"}, added
    assert {a for a in added if a.startswith("metrics/") and not a.endswith(FILE_MARK_SUFFIX)} == {"metrics/study.json"}
    doc = json.loads((project / "metrics" / "study.json").read_text())
    assert doc["seeds"] == [0] and list(doc["arms"]) == list(STUDY_ARMS)
    for arm, entry in doc["arms"].items():
        assert entry["label"] == ARMS[arm].label
        assert set(entry["mme"]) == {"primary", "detail"} and "average" in entry["demon"]
        assert "visual_relation_inference" in entry["demon"] and "multi_image_reasoning" in entry["demon"]
        for value in [*entry["demon"].values(), *entry["mme"].values()]:
            assert value["ci95"] is None and len(value["values"]) == 1  # one seed: no interval
    assert set(doc["expectations"]) == {"c_above_a_on_content", "c_above_a_on_detail", "b_close_to_a",
                                        "c_at_or_above_d", "above_blind", "does_not_measure_seeing"}
    # Content scores and the probe on what VPG-C adds, per arm; the held-out pairs' for every arm. No probe for the
    # blind arm: the probe renders real scenes, so it would only repeat (c), whose weights the blind arm uses.
    for name, entry in doc["arms"].items():
        assert {"heldout_differences", "World_SpotTheChange", "World_Story"} <= set(entry["content"])
        assert set(entry.get("probe", {})) == (set() if name == "blind" else {"vpgc_large", "vpgc_small"})
    # The backbone's own held-out metrics, per seed, from its base-stage metrics (probes flattened: probe.vit_small).
    base_json = json.loads((project / "work" / "seed0" / "base.json").read_text())
    flat = {**base_json, **{f"probe.{k}": v for k, v in base_json["probe"].items()}}
    assert {k: v["values"] for k, v in doc["arms"]["base"]["backbone"].items()} == {
        k: [round(flat[k], 4)] for k in BACKBONE_METRICS}
    assert doc["inputs"]["params"]["study"]["seeds"] == [0] and doc["inputs"]["corpus_sha256"]
    table = (project / "reports" / "study" / "study.md").read_text()
    assert all(a.label in table for a in ARMS.values()) and "The base backbone itself" in table
    assert "Content (%)" in table and "Do not measure seeing" in table
    with Image.open(project / "reports" / "study" / "study.png") as im:
        assert im.format == "PNG"
    # The blind arm was evaluated on blank images: every image of the copy is one colour.
    blank = sorted((project / "work" / "benchmarks-blank" / "mme").rglob("*.png"))
    assert blank and all(np.unique(np.asarray(Image.open(p).convert("RGB")).reshape(-1, 3), axis=0).shape[0] == 1
                         for p in blank)
    # Caption-only VPG-C trained on captions alone, with as many examples per step.
    card = json.loads((project / "work" / "seed0" / "vpgc_captions" / "vpgc" / "vpgc.json").read_text())
    assert card["training"]["train_examples"]["caption"] > 0
    # MLflow: one parent run, one child per arm and seed.
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["cheetah"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("cheetah.kind") == "study"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["cheetah.study.arm"] for r in children) == sorted(STUDY_ARMS)

    # Rerun: every step is reused, the outputs are the same.
    before, metrics = _mtimes(project), (project / "metrics" / "study.json").read_bytes()
    assert main(["study", "--no-track"]) == 0
    assert _mtimes(project) == before and (project / "metrics" / "study.json").read_bytes() == metrics
    # Another seed reuses seed 0 and adds seed 1 (now with intervals); another evaluation setting redoes the
    # evaluations only.
    assert main(["study", "--no-track", "--seeds", "0", "1", "--set", "evaluate.max_new_tokens=4"]) == 0
    after = _mtimes(project)
    assert {k for k in before if after[k] != before[k]} == {"seed0__eval.json", "seed0__eval-blind.json"}
    doc = json.loads((project / "metrics" / "study.json").read_text())
    ci = doc["arms"]["vpgc_synthetic"]["demon"]["average"]["ci95"]
    assert doc["seeds"] == [0, 1] and ci[0] <= doc["arms"]["vpgc_synthetic"]["demon"]["average"]["mean"] <= ci[1]
