"""DEMON: the task table, the loader's prompts and refusals, and the official-semantics scorer."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from cheetah.cli import main
from cheetah.evaluate.demon import (CATEGORIES, CORE_TASKS, OFFICIAL_TASKS, TASKS, list_demon_datasets,
                                    load_demon_task, resolve_dataset)
from cheetah.evaluate.scoring import (category_means, image_choice_correct, multi_choice_correct, normalize_answer,
                                      rouge_l, score_demon)
from cheetah.io import DataError

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16  # the loader checks that images exist, not what they hold


def write_task(root: Path, dataset: str, records: list[dict], *, question_type: str = "multi-choice",
               instructions: list[str] | None = None, images: tuple[str, ...] = ("0.png", "1.png", "2.png"),
               split: str = "core") -> Path:
    folder = root / dataset / split
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name in images:
        (folder / "images" / name).write_bytes(PNG)
    meta = {"dataset": dataset, "split": split, "num_sample": len(records),
            "task_instruction": instructions or ["Answer the question. ", "Look closely. "],
            "question_type": question_type}
    path = folder / f"{split}.json"
    path.write_text(json.dumps({"metadata": meta, "data": records}))
    return path


def record(sid, context: str, response: str, images=("0.png",), choices=None, tid: int = 0) -> dict:
    inst = {"context": context, "images_path": list(images)}
    if choices is not None:
        inst["choice_list"] = choices
    return {"sample_id": sid, "task_instruction_id": tid, "task_instance": inst, "response": response}


def write_preds(pred_dir: Path, dataset: str, pairs: list[tuple[object, str]]) -> None:
    (pred_dir / dataset).mkdir(parents=True, exist_ok=True)
    (pred_dir / dataset / "pred.json").write_text(
        json.dumps([{"sample_id": sid, "pred_response": p} for sid, p in pairs]))


# ---------------------------------------------------------------------------------------------------------------
# task table
# ---------------------------------------------------------------------------------------------------------------


def test_task_table_matches_the_paper():
    assert len(OFFICIAL_TASKS) == 31 and len(CORE_TASKS) == 29
    assert sum(TASKS[t].core_n for t in CORE_TASKS) == 18176  # DEMON-Core's instruction count
    assert {t for t in OFFICIAL_TASKS if TASKS[t].core_n is None} == {"Gibson", "ManyModalQA"}
    assert {t for t in OFFICIAL_TASKS if TASKS[t].image_choice} == {
        "RecipeQA_VisualCloze", "RecipeQA_ImageCoherence", "COMICS_Panel"}
    per_category = {c: sum(TASKS[t].category == c for t in CORE_TASKS) for c in CATEGORIES}
    assert per_category == {"multi_modal_dialogue": 2, "visual_story_telling_list": 5, "visual_relation_inference": 4,
                            "multi_modal_cloze": 4, "knowledge_grounded_qa": 3, "text_rich_images_qa": 3,
                            "multi_image_reasoning": 8}
    assert TASKS["ALFRED"].metric == "rouge_l" and TASKS["NLVR2"].metric == "accuracy"
    assert all(t.startswith("World_") for t in TASKS if TASKS[t].embedded)


def test_dataset_names_casing_and_suggestions():
    assert resolve_dataset("nuscenes").dataset == "nuScenes"  # the official shell script's spelling
    assert resolve_dataset("mmcoqa").dataset == "MMCoQA"
    with pytest.raises(DataError, match=r"unknown DEMON dataset 'NVLR2'; did you mean NLVR2"):
        resolve_dataset("NVLR2")
    with pytest.raises(DataError, match="unknown DEMON dataset 'recipeqa-RecipeQA_VisualCloze'.*RecipeQA_VisualCloze"):
        resolve_dataset("recipeqa-RecipeQA_VisualCloze")


# ---------------------------------------------------------------------------------------------------------------
# loader
# ---------------------------------------------------------------------------------------------------------------


def test_prompt_follows_the_official_inference_script(tmp_path):
    write_task(tmp_path, "MultiModalQA", [
        record(0, "Global Table: {table#1} Context: {image#2} Question: What sport?", "baseball",
               images=("0.png", "1.png"), choices=["soccer", "baseball"], tid=1),
    ])
    task = load_demon_task(tmp_path, "MultiModalQA")
    s = task.samples[0]
    assert s.prompt == ("Look closely. Global Table: <image> Context: <image> Question: What sport?"
                        "Choice list:['soccer', 'baseball']. Your answer is:")
    images = tmp_path.resolve() / "MultiModalQA" / "core" / "images"
    assert s.images == (images / "0.png", images / "1.png")
    assert s.choice_list == ("soccer", "baseball") and s.response == "baseball" and s.sample_id == 0


def test_images_follow_the_placeholders_not_the_list_order(tmp_path):
    # The official script would feed 0.png first; the text shows image #2 (1.png) first.
    write_task(tmp_path, "NLVR2", [
        record(7, "Right: {image#2} Left: {image#1} Choice List:['True', 'False'] Your answer is:", "True",
               images=("0.png", "1.png")),
    ])
    s = load_demon_task(tmp_path, "NLVR2").samples[0]
    assert [p.name for p in s.images] == ["1.png", "0.png"]
    assert s.prompt.count("<image>") == 2
    assert s.choice_list == ("True", "False")  # read from the context when the record has no choice_list
    assert "Choice list:" not in s.prompt  # appended only for a choice_list field, as the official script does


def test_folder_casing_variant_on_disk(tmp_path):
    write_task(tmp_path, "nuscenes", [record(0, "{image#1} Is it day?", "yes", choices=["yes", "no"])])
    assert list_demon_datasets(tmp_path) == ["nuScenes"]
    assert load_demon_task(tmp_path, "nuScenes").folder == "nuscenes"


def test_refuses_missing_image(tmp_path):
    write_task(tmp_path, "NLVR2", [record(3, "{image#1}", "True", images=("nope.png",), choices=["True", "False"])])
    with pytest.raises(DataError, match=r"core\.json: sample_id 3: images_path\[0\]: image 'nope.png' not found"):
        load_demon_task(tmp_path, "NLVR2")


def test_refuses_malformed_json(tmp_path):
    path = write_task(tmp_path, "VIST", [], question_type="open-ended")
    path.write_text('{"metadata": {"task_instruction": ["x"]}, "data": [}')
    with pytest.raises(DataError, match=r"VIST/core/core\.json: malformed JSON at line 1, column 52: Expecting value"):
        load_demon_task(tmp_path, "VIST")


def test_refuses_unknown_dataset_folder(tmp_path):
    write_task(tmp_path, "NLVR3", [record(0, "{image#1}", "True", choices=["True", "False"])])
    with pytest.raises(DataError, match="unknown DEMON dataset 'NLVR3'; did you mean NLVR2"):
        list_demon_datasets(tmp_path)


@pytest.mark.parametrize("bad", ["../../secret.png", "/etc/passwd"])
def test_refuses_paths_that_escape_the_root(tmp_path, bad):
    write_task(tmp_path, "NLVR2", [record(5, "{image#1}", "True", images=(bad,), choices=["True", "False"])])
    with pytest.raises(DataError, match=r"sample_id 5: images_path\[0\]: .*(escapes its root|is absolute)"):
        load_demon_task(tmp_path, "NLVR2")


def test_refuses_placeholder_without_image_and_unreferenced_image(tmp_path):
    write_task(tmp_path, "NLVR2", [record(1, "{image#1} {image#3}", "True", images=("0.png", "1.png"),
                                          choices=["True", "False"])])
    with pytest.raises(DataError, match=r"sample_id 1: placeholder \{image#3\} but images_path has 2 entries"):
        load_demon_task(tmp_path, "NLVR2")
    write_task(tmp_path, "VIST", [record(1, "{image#1}", "a story", images=("0.png", "1.png"))],
               question_type="open-ended")
    with pytest.raises(DataError, match=r"images_path entries \[2\] \(1-based\) have no"):
        load_demon_task(tmp_path, "VIST")


def test_question_type_disagreement_warns_and_the_table_wins(tmp_path, caplog):
    write_task(tmp_path, "VIST", [record(0, "{image#1}", "a story")], question_type="multi-choice")
    with caplog.at_level(logging.WARNING):
        task = load_demon_task(tmp_path, "VIST")
    assert task.info.metric == "rouge_l"
    assert "question_type is 'multi-choice'" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# per-answer metrics
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, normalised", [
    ("Yes.", "yes"),
    ("no\n", "no"),
    ("The red-cube, is (left)!", "the red cube is left"),  # a mark inside a word splits it, next to a space goes
    ("1,000 apples.", "1000 apples"),  # a digit comma anywhere makes every mark vanish
    ("3.5 km. ok.", "3.5 km ok"),  # a period before a digit stays
    ("'Image B'", "image b"),
    ("", ""),
])
def test_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_normalisation_removes_at_most_32_periods():
    assert normalize_answer("a." * 40) == "a" * 32 + "a." * 8


def test_rouge_l():
    assert rouge_l("A red cube.", "a red cube on the left") == pytest.approx(2 / 3, abs=1e-6)  # P=1, R=1/2
    assert rouge_l("the cube on the left", "the cube on the left") == pytest.approx(1.0, abs=1e-6)
    assert rouge_l("", "a red cube") == 0.0
    assert rouge_l(" ...", "a red cube") == 0.0  # empty once normalised
    assert rouge_l("green", "a red cube") == 0.0
    # A 1,100-word answer: the package's recursive LCS passes Python's default limit; the score is still its own
    # (P = 3/1100, R = 3/5: F1), and the limit is restored.
    limit = sys.getrecursionlimit()
    long = " ".join(["a", "red", "cube", *[f"w{i}" for i in range(1097)]])
    p, r = 3 / 1100, 3 / 5
    assert rouge_l(long, "a red cube on top") == pytest.approx(2 * p * r / (p + r), abs=1e-6)
    assert sys.getrecursionlimit() == limit


def test_multi_choice_tfidf():
    opts = ["the red cube is left of the ball", "the blue cube is left of the ball"]
    assert multi_choice_correct("The blue cube is left of the ball.", opts[1], opts) == (True, True)
    assert multi_choice_correct("the red cube is left of the ball", opts[1], opts) == (False, True)
    # Options that differ by one word, the answer a paraphrase with that word: TF-IDF finds it.
    assert multi_choice_correct("I think it is the blue one", opts[1], opts) == (True, True)
    assert multi_choice_correct("Baseball!", "baseball", ["soccer", "baseball", "football"]) == (True, True)


def test_multi_choice_fallbacks():
    # One-letter options: TF-IDF has no vocabulary, so the official exact-match fallback decides (both rules).
    for rule in ("official", "strict"):
        assert multi_choice_correct("B.", "b", ["a", "b"], rule) == (True, False)
        assert multi_choice_correct("b c", "b", ["a", "b"], rule) == (False, False)
    # Empty or unrelated answers share no term with any option: officially the all-zero similarity row's argmax,
    # the first option, is the answer; the strict rule judges them by exact match.
    assert multi_choice_correct("", "soccer", ["soccer", "baseball"]) == (True, False)
    assert multi_choice_correct("", "baseball", ["soccer", "baseball"]) == (False, False)
    assert multi_choice_correct("Yes", "True", ["True", "False"]) == (True, False)
    assert multi_choice_correct("", "soccer", ["soccer", "baseball"], "strict") == (False, False)
    assert multi_choice_correct("Yes", "True", ["True", "False"], "strict") == (False, False)
    with pytest.raises(ValueError, match="not one of the options"):
        multi_choice_correct("x", "tennis", ["soccer", "baseball"])


def _official_judge(pred: str, gt: str, choices: list[str]) -> int:
    """The semantics of the official `Eval.judge_multi_choice` (DEMON Benchmark/scripts/evaluate.py L87-110) on
    normalised text, written from its description: TF-IDF fitted on [pred] + choices, numpy argmax of the cosine
    row (the first index on ties, so the first option for an all-zero row); exact match if the vectoriser fails."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    try:
        matrix = TfidfVectorizer().fit_transform([pred] + choices)
    except ValueError:
        return int(pred == gt)
    return int(choices[int(np.argmax(cosine_similarity(matrix[0:1], matrix[1:]).flatten()))] == gt)


def test_score_demon_equals_the_official_semantics_on_no_term_answers(tmp_path):
    data, pred = tmp_path / "data", tmp_path / "pred"
    options = ["the red cube", "the blue ball", "a green star"]
    gts = ["the red cube", "the blue ball", "a green star", "the red cube", "the blue ball", "the red cube"]
    answers = ["", "I cannot tell.", "zzz", "The red cube.", "maybe x y", "no idea at all"]
    write_task(data, "TQA", [record(i, "{image#1}", gt, choices=options) for i, gt in enumerate(gts)])
    write_preds(pred, "TQA", list(enumerate(answers)))
    official = [_official_judge(normalize_answer(a), normalize_answer(g), [normalize_answer(o) for o in options])
                for a, g in zip(answers, gts)]
    assert official == [1, 0, 0, 1, 0, 1]  # the no-term answers 0 and 5 count: their gt is the first option
    out = score_demon(data, pred)
    assert out["option_rule"] == "official"
    assert out["tasks"]["TQA"]["score"] == pytest.approx(100 * sum(official) / len(official), abs=1e-4)
    assert out["tasks"]["TQA"]["no_option"] == 5  # every answer but "The red cube."
    strict = score_demon(data, pred, option_rule="strict")
    assert strict["tasks"]["TQA"]["score"] == pytest.approx(100 / 6, abs=1e-4) and strict["tasks"]["TQA"]["no_option"] == 5
    assert strict["option_rule"] == "strict"


@pytest.mark.parametrize("pred, correct", [
    ("Image B", True),
    ("image b.", True),
    ("Image B: the one with the red cube", True),
    ("image b and image c", False),  # names two options
    ("Image C", False),
    ("The answer is Image B", False),  # must begin with the answer
    ("", False),
])
def test_image_choice_rule(pred, correct):
    assert image_choice_correct(pred, "Image B") is correct


# ---------------------------------------------------------------------------------------------------------------
# task and category scores
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["RecipeQA_VisualCloze", "RecipeQA_ImageCoherence", "COMICS_Panel"])
def test_all_three_image_choice_tasks_use_the_image_rule(tmp_path, dataset):
    options = ["Image A", "Image B", "Image C", "Image D"]
    write_task(tmp_path / "data", dataset, [
        record(i, "{image#1}", gt, choices=options) for i, gt in enumerate(["Image A", "Image B", "Image C"])])
    # TF-IDF sees only "image" in all of these (one-letter words are dropped) and would pick option A each time:
    # it would count sample 0 right and the hedge in sample 0 would not be caught.
    write_preds(tmp_path / "pred", dataset, [(0, "image a or image b"), (1, "Image B."), (2, "image c")])
    out = score_demon(tmp_path / "data", tmp_path / "pred")
    assert out["tasks"][dataset] == {"metric": "accuracy", "score": pytest.approx(200 / 3, abs=1e-4),
                                     "category": TASKS[dataset].category, "n": 3, "rule": "image_option"}


def test_alfred_is_scored_by_rouge_l_despite_empty_question_type(tmp_path):
    write_task(tmp_path / "data", "ALFRED", [record(0, "{image#1} What next?", "pick up the red cube"),
                                             record(1, "{image#1} And then?", "go left")], question_type="")
    write_preds(tmp_path / "pred", "ALFRED", [(0, "Pick up the red cube."), (1, "")])
    out = score_demon(tmp_path / "data", tmp_path / "pred")
    assert out["tasks"]["ALFRED"]["metric"] == "rouge_l"
    assert out["tasks"]["ALFRED"]["score"] == pytest.approx(50.0, abs=1e-4)  # (1.0 + 0) / 2


def test_each_task_scored_from_its_own_file_and_category_means(tmp_path):
    data, pred = tmp_path / "data", tmp_path / "pred"
    yn = ["True", "False"]
    write_task(data, "NLVR2", [record(i, "{image#1}", "True", choices=yn) for i in range(4)])
    write_task(data, "VizWiz", [record(i, "{image#1}", "False", choices=yn) for i in range(4)])
    write_task(data, "VIST", [record(0, "{image#1}", "a man walks")], question_type="open-ended")
    write_preds(pred, "NLVR2", [(0, "True"), (1, "True"), (2, "True"), (3, "False")])  # 75
    write_preds(pred, "VizWiz", [(0, "True"), (1, "False"), (2, "True"), (3, "True")])  # 25
    write_preds(pred, "VIST", [(0, "a man walks")])  # 100
    out = score_demon(data, pred)
    # The official aggregation read the last task's eval.json for every task: both would have shown 25.
    assert out["tasks"]["NLVR2"]["score"] == 75.0 and out["tasks"]["VizWiz"]["score"] == 25.0
    assert out["categories"] == {"visual_story_telling_list": pytest.approx(100.0),
                                 "multi_image_reasoning": 50.0}
    assert out["average"] == 75.0  # the unweighted mean of the two categories
    assert out["not_predicted"] == []
    assert list(out["tasks"]) == ["VIST", "NLVR2", "VizWiz"]  # table order


def test_category_means_are_unweighted_over_tasks():
    from cheetah.evaluate.scoring import TaskScore

    scores = [TaskScore("NLVR2", "multi_image_reasoning", "accuracy", 60.0, 500, "tfidf_option"),
              TaskScore("VizWiz", "multi_image_reasoning", "accuracy", 40.0, 5, "tfidf_option"),
              TaskScore("VIST", "visual_story_telling_list", "rouge_l", 17.0, 10, "rouge_l")]
    assert category_means(scores) == {"visual_story_telling_list": 17.0, "multi_image_reasoning": 50.0}


def test_prediction_errors_name_the_samples(tmp_path):
    data, pred = tmp_path / "data", tmp_path / "pred"
    write_task(data, "NLVR2", [record(i, "{image#1}", "True", choices=["True", "False"]) for i in range(3)])
    write_task(data, "VizWiz", [record(0, "{image#1}", "True", choices=["True", "False"])])
    write_preds(pred, "NLVR2", [(0, "True"), (1, "True")])
    with pytest.raises(DataError, match=r"NLVR2/pred\.json: no prediction for 1 sample\(s\) of .*: '2'"):
        score_demon(data, pred)
    write_preds(pred, "NLVR2", [(0, "True"), (1, "True"), (2, "x"), (9, "True")])
    with pytest.raises(DataError, match=r"predictions for sample ids not in .*core\.json: '9'"):
        score_demon(data, pred)
    (pred / "NLVR2" / "pred.json").write_text(json.dumps(
        [{"sample_id": i, "pred_response": "True", "gt_response": "False" if i == 1 else "True"} for i in range(3)]))
    with pytest.raises(DataError, match="sample_id 1: gt_response 'False' differs"):
        score_demon(data, pred)
    write_preds(pred, "NLVR2", [(i, "True") for i in range(3)])
    write_preds(pred, "CLEVR-Change", [(0, "x")])
    with pytest.raises(DataError, match=r"predictions for CLEVR-Change, which .* does not hold"):
        score_demon(data, pred)


def test_cli_score_demon(tmp_path, capsys):
    data, pred = tmp_path / "data", tmp_path / "pred"
    write_task(data, "NLVR2", [record(i, "{image#1}", "True", choices=["True", "False"]) for i in range(2)])
    write_task(data, "VizWiz", [record(0, "{image#1}", "True", choices=["True", "False"])])
    write_preds(pred, "NLVR2", [(0, "true"), (1, "The answer is False")])
    assert main(["score", "demon", "--data-dir", str(data), "--predictions", str(pred),
                 "--out", str(tmp_path / "s.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tasks"] == {"NLVR2": {"metric": "accuracy", "score": 50.0, "category": "multi_image_reasoning",
                                      "n": 2, "rule": "tfidf_option", "no_option": 0}}
    assert out["categories"] == {"multi_image_reasoning": 50.0}
    assert out["not_predicted"] == ["VizWiz"] and out["option_rule"] == "official"
    assert json.loads((tmp_path / "s.json").read_text()) == out
    # An answer with no term of any option: the first option ("True", right here) officially, wrong when strict.
    write_preds(pred, "NLVR2", [(0, "true"), (1, "Hmm.")])
    for rule, score in (("official", 100.0), ("strict", 50.0)):
        assert main(["score", "demon", "--data-dir", str(data), "--predictions", str(pred),
                     "--option-rule", rule]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["tasks"]["NLVR2"]["score"] == score and out["tasks"]["NLVR2"]["no_option"] == 1
    assert main(["score", "demon", "--data-dir", str(data), "--predictions", str(tmp_path / "none")]) == 2
    assert "predictions folder not found" in capsys.readouterr().err
