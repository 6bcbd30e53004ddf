"""MME: the loader's two layouts and refusals, the official answer parse, the score, the results files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cheetah.cli import main
from cheetah.evaluate.mme import COGNITION, PERCEPTION, SUBTASKS, load_mme, read_results_file, results_line
from cheetah.evaluate.predictions import PredictionStore
from cheetah.evaluate.scoring import parse_yes_no, score_mme, score_mme_subtask
from cheetah.io import DataError

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
QA = "Is there a red cube? Please answer yes or no.\tYes\nIs there a blue cube? Please answer yes or no.\tNo\n"


def flat(root: Path, subtask: str, ids=("0001", "0002"), ext=".png", text=QA) -> Path:
    d = root / subtask
    d.mkdir(parents=True, exist_ok=True)
    for i in ids:
        (d / f"{i}{ext}").write_bytes(PNG)
        (d / f"{i}.txt").write_text(text)
    return d


def split(root: Path, subtask: str, ids=("a", "b")) -> Path:
    d = root / subtask
    (d / "images").mkdir(parents=True, exist_ok=True)
    (d / "questions_answers_YN").mkdir(parents=True, exist_ok=True)
    for i in ids:
        (d / "images" / f"{i}.jpg").write_bytes(PNG)
        (d / "questions_answers_YN" / f"{i}.txt").write_text(QA)
    return d


def test_subtask_table():
    assert len(PERCEPTION) == 10 and len(COGNITION) == 4
    assert SUBTASKS[:4] == ("existence", "count", "position", "color") and "OCR" in PERCEPTION


# ---------------------------------------------------------------------------------------------------------------
# loader
# ---------------------------------------------------------------------------------------------------------------


def test_loads_both_layouts_and_the_extra_level(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version" / "MME_Benchmark"
    flat(root, "existence")
    split(root, "artwork")
    data = load_mme(tmp_path / "MME_Benchmark_release_version")
    assert list(data) == ["existence", "artwork"]  # official order
    ex = data["existence"]
    assert [(s.image, s.index, s.answer) for s in ex] == [("0001.png", 0, "Yes"), ("0001.png", 1, "No"),
                                                         ("0002.png", 0, "Yes"), ("0002.png", 1, "No")]
    assert ex[0].question == "Is there a red cube? Please answer yes or no."
    assert ex[0].prompt == "<image> Is there a red cube? Please answer yes or no."
    assert ex[0].key == "0001.png#0"
    assert ex[0].image_path == (root / "existence" / "0001.png").resolve()
    assert data["artwork"][2].image_path == (root / "artwork" / "images" / "b.jpg").resolve()
    assert list(load_mme(root, ["ARTWORK"])) == ["artwork"]


@pytest.mark.parametrize("text, message", [
    ("Is it red?\tYes\n", r"0001\.txt: expected exactly two lines .* found 1"),
    ("Is it red?\tYes\nIs it blue?\tNo\nIs it green?\tNo\n", r"found 3"),
    ("Is it red? Yes\nIs it blue?\tNo\n", r"0001\.txt:1: expected 'question<TAB>Yes\|No'"),
    ("Is it red?\tYes\nIs it blue?\tMaybe\n", r"0001\.txt:2: the answer must be Yes or No, got 'Maybe'"),
    ("Is it red?\tYes\nIs it round?\tYes\n", r"0001\.txt: .* must be one Yes and one No, got 'Yes' and 'Yes'"),
])
def test_refuses_malformed_question_files(tmp_path, text, message):
    flat(tmp_path, "count", ids=("0001",), text=text)
    with pytest.raises(DataError, match=message):
        load_mme(tmp_path)


def test_refuses_missing_image_and_image_without_questions(tmp_path):
    d = flat(tmp_path, "color", ids=("0001",))
    (d / "0001.png").unlink()
    with pytest.raises(DataError, match=r"color/0001\.txt: no image 0001\.jpg/\.png"):
        load_mme(tmp_path)
    (d / "0001.png").write_bytes(PNG)
    (d / "0002.jpg").write_bytes(PNG)
    with pytest.raises(DataError, match=r"image\(s\) 0002\.jpg have no question file"):
        load_mme(tmp_path)


def test_refuses_unknown_or_absent_subtask(tmp_path):
    flat(tmp_path, "color")
    with pytest.raises(DataError, match="unknown MME subtask 'colour'"):
        load_mme(tmp_path, ["colour"])
    with pytest.raises(DataError, match="subtask folder\\(s\\) not found: count"):
        load_mme(tmp_path, ["count"])
    with pytest.raises(DataError, match="no MME subtask folder"):
        load_mme(tmp_path / "color")


# ---------------------------------------------------------------------------------------------------------------
# answer parsing and scores
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pred, label", [
    ("yes", "yes"), ("No", "no"), ("Yes.", "yes"), ("no\n", "no"), ("YES, there is", "yes"),
    (" yes", "yes"),  # no strip, but " yes" still has "yes" in its first four characters
    ("  yes", "other"),  # ... "  ye" does not
    ("Not sure", "no"),  # "not " contains "no": the official parse reads it as a no
    ("None of them", "no"), ("I don't know", "other"),
    ("The answer is yes", "other"),  # verbose answers are wrong
    ("", "other"), ("y", "other"), ("nyes", "yes"),  # "yes" is looked for before "no"
])
def test_official_answer_parse(pred, label):
    assert parse_yes_no(pred) == label


def rows(lines: list[str], tmp_path: Path, name: str = "existence.txt") -> Path:
    path = tmp_path / name
    path.write_text("".join(lines))
    return path


def test_subtask_score_pairs_by_image_not_by_line(tmp_path):
    # Four images; the lines are shuffled, so consecutive-line pairing would mix images up.
    lines = [
        results_line("1.png", "q yes", "Yes", "Yes"),
        results_line("2.png", "q yes", "Yes", "yes."),
        results_line("1.png", "q no", "No", "No"),       # image 1: both right
        results_line("3.png", "q yes", "Yes", "The answer is yes"),  # other -> wrong
        results_line("2.png", "q no", "No", "Yes"),      # image 2: one right
        results_line("3.png", "q no", "No", "no\n"),     # written as "no " by results_line
        results_line("4.png", "q no", "No", "Not sure"),  # parses as no: right
        results_line("4.png", "q yes", "Yes", "yes"),    # image 4: both right
    ]
    out = score_mme_subtask(read_results_file(rows(lines, tmp_path)))
    # 6 of 8 questions right -> acc 75; images 1 and 4 fully right -> acc+ 50.
    assert out == {"score": 125.0, "acc": 75.0, "acc_plus": 50.0, "n_questions": 8, "n_images": 4, "other": 1,
                   "tp": 3, "fn": 0, "tn": 3, "fp": 1, "precision": 0.75, "recall": 1.0}


def test_image_without_its_pair_is_an_error(tmp_path):
    one = [results_line("1.png", "q", "Yes", "yes"), results_line("1.png", "q2", "No", "no"),
           results_line("2.png", "q", "Yes", "yes")]
    with pytest.raises(DataError, match=r"existence\.txt: image '2\.png' has 1 question\(s\) \(line\(s\) 3\)"):
        score_mme(rows(one, tmp_path).parent)
    three = one + [results_line("2.png", "q2", "No", "no"), results_line("2.png", "q3", "No", "no")]
    with pytest.raises(DataError, match=r"image '2\.png' has 3 question\(s\) \(line\(s\) 3, 4, 5\)"):
        score_mme(rows(three, tmp_path).parent)


def test_pair_whose_ground_truths_are_not_one_yes_and_one_no_is_refused(tmp_path):
    """Both questions of an image answered Yes would be scored 87.5 instead of 50 for a constant "yes"."""
    same = [results_line("1.png", "q", "Yes", "yes"), results_line("1.png", "q2", "Yes", "yes")]
    with pytest.raises(DataError, match=r"image '1\.png' \(lines 1, 2\): .* one Yes and one No, got 'Yes' and 'Yes'"):
        score_mme(rows(same, tmp_path).parent)


def test_results_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"x\.txt:2: expected 'image<TAB>question<TAB>ground truth<TAB>prediction'"):
        read_results_file(rows(["1.png\tq\tYes\tyes\n", "1.png\tq\tNo\n"], tmp_path, "x.txt"))
    with pytest.raises(DataError, match=r"x\.txt:1: the ground truth must be Yes or No, got 'maybe'"):
        read_results_file(rows(["1.png\tq\tmaybe\tyes\n"], tmp_path, "x.txt"))
    # A prediction containing a tab stays one field (the official split would crash).
    assert read_results_file(rows(["1.png\tq\tYes\tyes\tand more\n"], tmp_path, "x.txt"))[0].pred == "yes\tand more"


def pair(image: str, yes_pred: str, no_pred: str) -> list[str]:
    return [results_line(image, "q1", "Yes", yes_pred), results_line(image, "q2", "No", no_pred)]


def test_totals_hand_computed(tmp_path):
    # existence: 4 images, 7/8 right, 3/4 both -> 87.5 + 75 = 162.5
    rows(pair("a", "yes", "no") + pair("b", "yes", "no") + pair("c", "yes", "no") + pair("d", "yes", "yes"),
         tmp_path, "existence.txt")
    # count: 2 images, 2/4 right (both "yes"), 0 both -> 50 + 0 = 50
    rows(pair("a", "yes", "yes") + pair("b", "Yes", "Yes"), tmp_path, "count.txt")
    # code_reasoning: 2 images, all right -> 200
    rows(pair("a", "Yes", "No") + pair("b", "yes", "no"), tmp_path, "code_reasoning.txt")
    (tmp_path / "notes.txt").write_text("not a subtask")
    out = score_mme(tmp_path)
    assert out["subtasks"] == {"existence": 162.5, "count": 50.0, "code_reasoning": 200.0}
    assert out["perception"] == 212.5 and out["cognition"] == 200.0
    assert out["perception_max"] == 400 and out["cognition_max"] == 200
    assert out["details"]["count"]["fp"] == 2 and out["details"]["count"]["other"] == 0
    assert "posters" in out["missing"] and out["ignored_files"] == ["notes.txt"]


def test_full_benchmark_totals_are_out_of_2000_and_800(tmp_path):
    for s in SUBTASKS:
        rows(pair("a", "yes", "no") + pair("b", "yes", "yes"), tmp_path, f"{s}.txt")  # 75 + 50 = 125 each
    out = score_mme(tmp_path)
    assert out["perception"] == 1250.0 and out["perception_max"] == 2000
    assert out["cognition"] == 500.0 and out["cognition_max"] == 800
    assert out["missing"] == []


def test_cli_score_mme(tmp_path, capsys):
    rows(pair("a", "yes", "no") + pair("b", "no", "no"), tmp_path, "existence.txt")  # 75 + 50
    assert main(["score", "mme", "--results-dir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["subtasks"] == {"existence": 125.0}
    assert out["perception"] == 125.0 and out["cognition"] is None
    assert main(["score", "mme", "--results-dir", str(tmp_path / "missing")]) == 2
    assert "results folder not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# writing results files as the evaluation goes
# ---------------------------------------------------------------------------------------------------------------


def test_prediction_store_writes_official_results_and_resumes(tmp_path):
    flat(tmp_path / "data", "existence", ids=("0001", "0002"))
    samples = load_mme(tmp_path / "data")["existence"]
    out = tmp_path / "results"
    store = PredictionStore(out, "mme", "existence")
    store.add_sample(samples[1], "No")
    store.add_sample(samples[0], "Yes, there is.")
    store.add_sample(samples[2], "yes\nit is")
    # Killed here: a new store (a new process) sees three answers and is asked for the fourth only.
    store = PredictionStore(out, "mme", "existence")
    assert store.done_ids() == {"0001.png#0", "0001.png#1", "0002.png#0"}
    todo = [s for s in samples if s.key not in store.done_ids()]
    assert [s.key for s in todo] == ["0002.png#1"]
    store.add_sample(todo[0], "no")
    path = store.finalize([s.key for s in samples])
    assert path == out / "existence.txt"
    assert path.read_text().splitlines() == [
        "0001.png\tIs there a red cube? Please answer yes or no.\tYes\tYes, there is.",
        "0001.png\tIs there a blue cube? Please answer yes or no.\tNo\tNo",
        "0002.png\tIs there a red cube? Please answer yes or no.\tYes\tyes it is",
        "0002.png\tIs there a blue cube? Please answer yes or no.\tNo\tno",
    ]
    assert not list(out.glob(".*partial*"))
    assert score_mme(out)["subtasks"] == {"existence": 200.0}
    # Re-opened after finalize: everything is done, nothing is asked again.
    assert PredictionStore(out, "mme", "existence").done_ids() == {s.key for s in samples}
    with pytest.raises(ValueError, match="'<image>#0' or '<image>#1'"):
        PredictionStore(out, "mme", "count").add("x", "yes", "Yes", image="1.png", question="q")
