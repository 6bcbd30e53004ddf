"""Telling models apart: answer statistics, the no-vision reference, flags, and the report sections built on them."""

from __future__ import annotations

import json

import pytest

from cheetah.config import EvaluateConfig, WorldConfig
from cheetah.evaluate.demon import load_demon
from cheetah.evaluate.diagnostics import (IMAGE_OPTION_TASKS_NOTE, NO_OPTION, constant_reference, demon_answers,
                                          flags, mme_answers)
from cheetah.evaluate.embedded import read_mme_splits, write_embedded_benchmarks
from cheetah.evaluate.mme import load_mme
from cheetah.evaluate.predictions import PredictionStore
from cheetah.evaluate.report import write_report
from cheetah.evaluate.scoring import score_demon, score_mme, score_mme_splits

PER_TASK, PER_SUBTASK = 6, 4


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return write_embedded_benchmarks(WorldConfig(image_size=32), EvaluateConfig(
        demon_dir=str(root / "demon"), mme_dir=str(root / "mme"), demon_per_task=PER_TASK,
        mme_per_subtask=PER_SUBTASK))


def _predict(bench, out, demon_answer, mme_answer):
    """Prediction files of a model answering `demon_answer(sample)` / `mme_answer(sample)`."""
    for task in load_demon(bench["demon"]):
        store = PredictionStore(out / "demon", "demon", task.dataset)
        for s in task.samples:
            store.add_sample(s, demon_answer(s))
        store.finalize([s.key for s in task.samples])
    for subtask, samples in load_mme(bench["mme"]).items():
        store = PredictionStore(out / "mme", "mme", subtask)
        for s in samples:
            store.add_sample(s, mme_answer(s))
        store.finalize([s.key for s in samples])
    tasks = [t.dataset for t in load_demon(bench["demon"])]
    return {"demon": score_demon(bench["demon"], out / "demon"),
            "mme": {**score_mme(out / "mme"), "splits": score_mme_splits(out / "mme", read_mme_splits(bench["mme"]))},
            "answers": {"demon": demon_answers(bench["demon"], out / "demon", tasks),
                        "mme": mme_answers(out / "mme", list(load_mme(bench["mme"])))}}


@pytest.fixture(scope="module")
def results(bench, tmp_path_factory):
    root = tmp_path_factory.mktemp("preds")
    # "oracle" answers right; "blind" says the same thing whatever it is shown.
    oracle = _predict(bench, root / "oracle", lambda s: s.response, lambda s: s.answer)
    blind = _predict(bench, root / "blind", lambda s: "Yes", lambda s: "Yes")
    return {"blind": blind, "oracle": oracle}


def test_answer_statistics(results):
    blind, oracle = results["blind"]["answers"], results["oracle"]["answers"]
    for task, s in blind["demon"].items():
        assert s["n"] == PER_TASK and s["distinct"] == 1 and s["top_share"] == 100.0 and s["top_answer"] == "yes"
    assert blind["mme"]["existence"]["distribution"] == {"yes": 2 * PER_SUBTASK}
    assert oracle["mme"]["existence"]["distribution"] == {"yes": PER_SUBTASK, "no": PER_SUBTASK}
    assert oracle["mme"]["existence"]["truth"] == {"yes": PER_SUBTASK, "no": PER_SUBTASK}
    # Closed questions: the option the scorer reads, beside the right ones; "yes" matches no option of WhichImage.
    which = oracle["demon"]["World_WhichImage"]
    assert which["distribution"] == which["truth"] and sum(which["distribution"].values()) == PER_TASK
    assert blind["demon"]["World_WhichImage"]["distribution"] == {NO_OPTION: PER_TASK}
    assert blind["demon"]["World_ImageCloze"]["distribution"] == {NO_OPTION: PER_TASK}
    assert set(oracle["demon"]["World_ImageCloze"]["distribution"]) <= {"image a", "image b", "image c", "image d"}
    assert "distribution" not in oracle["demon"]["World_SpotTheChange"]  # open-ended
    ex = oracle["demon"]["World_SpotTheChange"]["examples"]
    assert len(ex) == 3 and all(e["truth"] == e["answer"] for e in ex)


def test_constant_reference(bench):
    ref = constant_reference(bench["demon"], ["World_PropertyCoherence", "World_WhichImage", "World_SpotTheChange"])
    task = load_demon(bench["demon"], ["World_WhichImage"])[0]
    majority = max(sum(s.response == r for s in task.samples) for r in task.samples[0].choice_list)
    assert ref["World_WhichImage"]["score"] == pytest.approx(100.0 * majority / PER_TASK, abs=1e-4)
    assert 0 < ref["World_SpotTheChange"]["score"] < 100  # a template sentence earns ROUGE-L without looking
    assert ref["World_SpotTheChange"]["answer"].startswith("In the second image")


def test_flags(results):
    found = flags(results)
    assert any("blind gave one answer to all" in r for r in found["mme/existence"])
    assert "demon/World_SpotTheChange" in found
    assert not any("oracle" in r for reasons in found.values() for r in reasons)
    zero = flags({"a": {"demon": {"tasks": {"X": {"score": 0.0}}}}, "b": {"demon": {"tasks": {"X": {"score": 0.0}}}}})
    assert zero == {"demon/X": ["every model scores 0 (2 models)"]}
    assert flags({"a": {"demon": {"tasks": {"X": {"score": 0.0}}}}, "b": {"demon": {"tasks": {"X": {"score": 1.0}}}}}) \
        == {}


def test_report_sections(results, tmp_path):
    provenance = {"lineage": {"git_commit": "abc123", "git_dirty": "false", "dvc_lock_hash": "f00"},
                  "models": {"oracle": {"spec": "checkpoints/vpgc", "identity": {"vpgc_sha256": "beef"},
                                        "decoding": {"decoding": "greedy"}, "training": {"steps": 3}}},
                  "params": {"evaluate": {"batch_size": 4}}}
    written = write_report(tmp_path, results, metrics_path=tmp_path / "m.json", reference={
        "demon": {"World_WhichImage": {"score": 33.33, "answer": "the first image"}}, "mme": 50.0},
        provenance=provenance)
    md = written["report"].read_text()
    assert md.index("### Flags") < md.index("### DEMON by category")
    assert "- **mme/existence**: blind gave one answer to all 8 samples ('yes')" in md
    assert "World_ImageCloze †" in md and IMAGE_OPTION_TASKS_NOTE in md
    assert "| primary | existence | 50.00 | 200.00 |" in md and "| **detail** | total (/800) | 200.00 | 800.00 |" in md
    assert "| World_SpotTheChange | 6 |" in md and "oracle − blind" in md  # deltas with sample counts
    assert "| World_WhichImage | 6 | 33.33 |" in md  # the no-vision reference beside the answers
    assert "| MME existence | 8 | 50.00 | yes 4, no 4 | 12% / 100%; yes 8 | 25% / 50%; yes 4, no 4 |" in md
    assert "git commit `abc123`" in md and "VPG-C weights sha256 `beef`" in md
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["mme"]["primary"] == {"total": 800.0, "acc": 100.0} and metrics["mme"]["detail"]["acc"] == 100.0
