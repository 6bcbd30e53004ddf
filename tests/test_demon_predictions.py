"""PredictionStore for DEMON: durable per-sample appends, resume after a kill, the official pred.json."""

from __future__ import annotations

import json

import pytest

from cheetah.evaluate.demon import load_demon_task, write_demon_task
from cheetah.evaluate.predictions import PredictionStore
from cheetah.evaluate.scoring import score_demon
from cheetah.io import DataError


def test_resume_after_a_kill_and_finalize(tmp_path):
    store = PredictionStore(tmp_path, "demon", "nuscenes")  # casing variant: the folder is the official name
    store.add(0, "yes", "yes")
    store.add(1, "no", "yes")
    journal = tmp_path / "nuScenes" / ".pred.partial.jsonl"
    # The process dies in the middle of writing the third record.
    with open(journal, "a") as f:
        f.write('{"sample_id": 2, "pred_resp')
    store = PredictionStore(tmp_path, "demon", "nuScenes")
    assert store.done_ids() == {"0", "1"}
    assert journal.read_text().count("\n") == 2  # the torn line is gone, the next append starts clean
    store.add(2, "no", "no")
    with pytest.raises(ValueError, match="sample 2 already has a prediction"):
        store.add(2, "yes", "no")
    with pytest.raises(DataError, match=r"1 sample\(s\) without a prediction \['3'\]"):
        store.finalize([0, 1, 2, 3])
    path = store.finalize([2, 1, 0])
    assert path == tmp_path / "nuScenes" / "pred.json" and not journal.exists()
    assert json.loads(path.read_text()) == [
        {"sample_id": 2, "pred_response": "no", "gt_response": "no"},
        {"sample_id": 1, "pred_response": "no", "gt_response": "yes"},
        {"sample_id": 0, "pred_response": "yes", "gt_response": "yes"},
    ]
    assert PredictionStore(tmp_path, "demon", "nuScenes").done_ids() == {"0", "1", "2"}


def test_damage_before_the_last_line_is_an_error(tmp_path):
    journal = tmp_path / "VIST" / ".pred.partial.jsonl"
    journal.parent.mkdir()
    journal.write_text('{"sample_id": 0, "pred_response": "a", "gt_response": "b"}\nnot json\n'
                       '{"sample_id": 1, "pred_response": "a", "gt_response": "b"}\n')
    with pytest.raises(DataError, match=r"\.pred\.partial\.jsonl:2: malformed prediction record"):
        PredictionStore(tmp_path, "demon", "VIST")


def test_resuming_with_another_setup_is_refused(tmp_path):
    PredictionStore(tmp_path, "demon", "VIST", meta={"model": "base", "max_new_tokens": 32}).add(0, "a", "b")
    assert PredictionStore(tmp_path, "demon", "VIST", meta={"model": "base", "max_new_tokens": 32}).done_ids() == {"0"}
    with pytest.raises(DataError, match="existing predictions were made with .*'model': 'base'"):
        PredictionStore(tmp_path, "demon", "VIST", meta={"model": "vpgc", "max_new_tokens": 32})


def test_store_output_is_what_score_demon_reads(tmp_path):
    data, pred = tmp_path / "data", tmp_path / "pred"
    records = [{"sample_id": sid, "task_instruction_id": 0, "response": gt,
                "task_instance": {"context": "{image#1}", "images_path": ["0.png"]}}
               for sid, gt in ((0, "a man walks a dog"), ("x1", "rain"))]
    write_demon_task(data, "VIST", ["Tell the story. "], records, {"0.png": b"png"})
    task = load_demon_task(data, "VIST")
    store = PredictionStore(pred, "demon", "VIST")
    for s, answer in zip(task.samples, ["A man walks a dog.", ""]):
        store.add_sample(s, answer)
    store.finalize([s.sample_id for s in task.samples])
    assert json.loads((pred / "VIST" / "pred.json").read_text())[1]["sample_id"] == "x1"  # the id keeps its type
    assert score_demon(data, pred)["tasks"]["VIST"]["score"] == pytest.approx(50.0, abs=1e-4)
