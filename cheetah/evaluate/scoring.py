"""Scoring with the official semantics, and the official scripts' bugs fixed.

DEMON follows `DEMON Benchmark/scripts/evaluate.py` + `i4_score.py`:
  - answers are normalised the VQA way (punctuation, periods, quotes, lower case) before any comparison;
  - open-ended tasks: ROUGE-L F of the `rouge` package (1.0.1, the one the official script uses), 0 for an empty
    prediction;
  - multi-choice tasks: the option nearest to the prediction by TF-IDF cosine similarity (vectoriser fitted on the
    prediction and the options, `evaluate.py` L96-110) must be the ground truth; a prediction that shares no term
    with any option has an all-zero similarity row, whose argmax is the first option; exact match where TF-IDF has
    no vocabulary at all (one-letter options: the vectoriser raises and the script falls back);
  - image-option tasks: the answer must begin like the ground truth ("image b") and name no other option;
  - a category is the unweighted mean of its tasks; scores are percentages.
Fixed: the metric comes from our task table (ALFRED's empty question_type made the script skip it; its
image-choice list misspelt RecipeQA_VisualCloze so that task fell to TF-IDF), and every task is scored from its
own `pred.json` (the aggregation read the last task's file for all of them).
Answers that match no option (no shared term, or no vocabulary) are counted per task (`no_option`): under the
official rule the first option takes the no-term ones, which favours tasks whose answer is often listed first. The
`strict` rule (`option_rule="strict"`, `cheetah score demon --option-rule strict`, `evaluate.demon_option_rule`)
judges them by exact match instead; the default is the official rule, so scores compare with the paper's tables.

MME follows `eval_tool/calculation.py`: lower-case the answer; exactly "yes"/"no", else the first four characters
decide ("yes" in them -> yes, elif "no" -> no, else "other", which is wrong); per subtask acc*100 + acc+*100.
Fixed: the two questions of an image are paired by the image name, not by being on consecutive lines.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from cheetah.evaluate.demon import (CATEGORIES, TASKS, DemonTask, DemonTaskInfo, Split, list_demon_datasets,
                                    load_demon_task, resolve_dataset)
from cheetah.evaluate.mme import COGNITION, PERCEPTION, SUBTASKS, MMEResult, check_yes_no_pair, read_results_file
from cheetah.io import DataError, read_json

# ---------------------------------------------------------------------------------------------------------------
# DEMON: answer normalisation and per-answer metrics
# ---------------------------------------------------------------------------------------------------------------

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
# The official pattern (its `(?!<=\d)` was meant as a look-behind but is a look-ahead that always holds, so every
# period not followed by a digit goes).
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# The official call passes re.UNICODE where `sub` takes `count`, so at most 32 periods are removed. Kept, because
# the remaining periods split sentences for ROUGE-L and so change scores of long answers.
_PERIOD_COUNT = 32


def normalize_answer(text: str) -> str:
    """The official answer normalisation (`Eval.process`)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    has_digit_comma = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # A mark next to a space (or anywhere, once the text has a 1,000-style number) is deleted; a mark inside a
        # word becomes a space, so "red-cube" stays two words.
        deleted = has_digit_comma or f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if deleted else " ")
    out = _PERIOD.sub("", out, count=_PERIOD_COUNT)
    return out.strip("'").strip('"').strip().lower()


def rouge_l(pred: str, gt: str) -> float:
    """ROUGE-L F (0..1) of the normalised answers; 0 for an empty prediction."""
    from rouge import Rouge

    p, g = normalize_answer(pred), normalize_answer(gt)
    if not g:
        raise ValueError(f"empty ground truth {gt!r}")
    if not p:
        return 0.0
    # The package rebuilds the longest common subsequence recursively, one call per word of both texts: a
    # 1,000-word answer passes Python's default limit. Raised for the call (pure-Python recursion costs no C stack
    # from 3.11 on), so a long answer gets the package's own score.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, len(p.split()) + len(g.split()) + 1_000))
    try:
        return float(Rouge(metrics=["rouge-l"]).get_scores(p, g)[0]["rouge-l"]["f"])
    except ValueError:
        # The package splits sentences on the periods normalisation left (it removes only 32): an answer made of
        # periods alone has no sentence. Empty in substance, so 0 as for an empty prediction.
        return 0.0
    finally:
        sys.setrecursionlimit(limit)


OptionRule = Literal["official", "strict"]
OPTION_RULES: tuple[str, ...] = ("official", "strict")


def option_similarities(pred: str, options: Sequence[str]) -> list[float] | None:
    """TF-IDF cosine similarity of `pred` to each option, the vectoriser fitted on [pred] + options as the official
    script does; None when TF-IDF has no vocabulary (e.g. one-letter options: the official script's `except`)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    try:
        matrix = TfidfVectorizer().fit_transform([pred, *options])
    except ValueError:
        return None
    return [float(x) for x in cosine_similarity(matrix[0:1], matrix[1:]).ravel()]


def _nearest(sims: list[float] | None) -> int | None:
    """The argmax of a similarity row (the first on ties); None for no row or an all-zero one (no option matched)."""
    if sims is None or not any(sims):
        return None
    return max(range(len(sims)), key=lambda i: (sims[i], -i))


def nearest_option(pred: str, options: Sequence[str]) -> int | None:
    """Index of the option nearest to `pred` by TF-IDF cosine (the first on ties), both normalised; None when the
    answer matches no option: it shares no term with any, or TF-IDF has no vocabulary at all."""
    return _nearest(option_similarities(normalize_answer(pred), [normalize_answer(o) for o in options]))


def multi_choice_correct(pred: str, gt: str, options: Sequence[str], rule: OptionRule = "official"
                         ) -> tuple[bool, bool]:
    """(correct, matched an option) for a text multi-choice answer.

    The nearest option (first on ties) must be the ground truth. An answer that shares no term with any option
    matches none: `official` takes the first option (numpy's argmax of the all-zero row), `strict` exact match.
    Without any TF-IDF vocabulary both use exact match, as the official fallback does."""
    if rule not in OPTION_RULES:
        raise ValueError(f"option rule must be one of {OPTION_RULES}, got {rule!r}")
    p, g = normalize_answer(pred), normalize_answer(gt)
    opts = [normalize_answer(o) for o in options]
    if g not in opts:
        raise ValueError(f"the ground truth {gt!r} is not one of the options {list(options)!r}")
    sims = option_similarities(p, opts)
    if sims is None:
        return p == g, False
    chosen = _nearest(sims)
    if chosen is None:
        return (opts[0] == g if rule == "official" else p == g), False
    return opts[chosen] == g, True


def image_choice_correct(pred: str, gt: str, n_options: int = 4) -> bool:
    """The image-option rule: the answer begins with the right "image x" and names no other option."""
    p, g = normalize_answer(pred), normalize_answer(gt)
    labels = [f"image {chr(ord('a') + i)}" for i in range(max(4, n_options))]
    named = sum(label in p for label in labels)
    return p[:7] == g[:7] and named <= 1


# ---------------------------------------------------------------------------------------------------------------
# DEMON: tasks, categories, the scoring entry point
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskScore:
    dataset: str
    category: str
    metric: str
    score: float
    """Percent: mean ROUGE-L F x 100, or accuracy x 100."""
    n: int
    rule: str
    """How answers were judged: rouge_l, tfidf_option or image_option."""
    no_option: int = 0
    """Multi-choice answers that matched no option (no shared term, or no TF-IDF vocabulary at all); how they were
    judged is the option rule's."""
    per_sample: dict[str, float] = dataclasses.field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        out = {"metric": self.metric, "score": round(self.score, 4), "category": self.category, "n": self.n,
               "rule": self.rule}
        if self.rule == "tfidf_option":
            out["no_option"] = self.no_option
        return out


def read_demon_predictions(path: str | Path) -> list[dict[str, Any]]:
    """An official `pred.json`: a list of `{sample_id, pred_response[, gt_response]}`."""
    path = Path(path)
    preds = read_json(path)
    if not isinstance(preds, list):
        raise DataError(f"{path}: expected a list of {{sample_id, pred_response, gt_response}} objects")
    for i, rec in enumerate(preds):
        if not isinstance(rec, dict) or "sample_id" not in rec or "pred_response" not in rec:
            raise DataError(f"{path}: record {i}: expected an object with sample_id and pred_response")
        if not isinstance(rec["pred_response"], str):
            raise DataError(f"{path}: sample_id {rec['sample_id']!r}: pred_response must be a string, "
                            f"got {rec['pred_response']!r}")
    return preds


def _ids(keys: Sequence[str]) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def score_demon_task(task: DemonTask, predictions: list[dict[str, Any]], source: str | Path = "pred.json",
                     option_rule: OptionRule = "official") -> TaskScore:
    """Score one task from its own predictions; every sample needs exactly one prediction."""
    info: DemonTaskInfo = task.info
    by_id: dict[str, dict[str, Any]] = {}
    for rec in predictions:
        key = str(rec["sample_id"])
        if key in by_id:
            raise DataError(f"{source}: sample_id {rec['sample_id']!r} is predicted twice")
        by_id[key] = rec
    known = {s.key for s in task.samples}
    unknown = [k for k in by_id if k not in known]
    if unknown:
        raise DataError(f"{source}: predictions for sample ids not in {task.path}: {_ids(unknown)}")
    missing = [s.key for s in task.samples if s.key not in by_id]
    if missing:
        raise DataError(f"{source}: no prediction for {len(missing)} sample(s) of {task.path}: {_ids(missing)}")

    rule = "rouge_l" if info.metric == "rouge_l" else "image_option" if info.image_choice else "tfidf_option"
    per_sample: dict[str, float] = {}
    no_option = 0
    for s in task.samples:
        rec = by_id[s.key]
        if "gt_response" in rec and str(rec["gt_response"]).strip() != s.response.strip():
            raise DataError(f"{source}: sample_id {s.sample_id!r}: gt_response {rec['gt_response']!r} differs from "
                            f"the response in {task.path} ({s.response!r}); were the predictions made on other data?")
        pred = rec["pred_response"]
        try:
            if rule == "rouge_l":
                value = rouge_l(pred, s.response)
            elif rule == "image_option":
                value = float(image_choice_correct(pred, s.response, len(s.choice_list or ())))
            else:
                correct, matched = multi_choice_correct(pred, s.response, s.choice_list or (), option_rule)
                value = float(correct)
                no_option += not matched
        except ValueError as e:
            raise DataError(f"{task.path}: sample_id {s.sample_id!r}: {e}") from None
        per_sample[s.key] = value
    score = 100.0 * sum(per_sample.values()) / len(per_sample)
    return TaskScore(info.dataset, info.category, info.metric, score, len(per_sample), rule, no_option, per_sample)


def category_means(tasks: Sequence[TaskScore]) -> dict[str, float]:
    """Unweighted mean of the task scores in each category (categories without a scored task are left out)."""
    out: dict[str, float] = {}
    for key in CATEGORIES:
        scores = [t.score for t in tasks if t.category == key]
        if scores:
            out[key] = sum(scores) / len(scores)
    return out


def prediction_file(pred_dir: Path, info: DemonTaskInfo) -> Path | None:
    """`<pred_dir>/<Dataset>/pred.json` of a task, the folder matched case-insensitively; None when there is none."""
    for folder in [info.dataset] + sorted(p.name for p in pred_dir.iterdir()
                                          if p.is_dir() and p.name.lower() == info.dataset.lower()):
        if (pred_dir / folder / "pred.json").is_file():
            return pred_dir / folder / "pred.json"
    return None


def score_demon(data_dir: str | Path, predictions_dir: str | Path, split: Split = "core",
                datasets: Sequence[str] | None = None, option_rule: OptionRule = "official") -> dict[str, Any]:
    """Score `<predictions_dir>/<Dataset>/pred.json` against `<data_dir>/<Dataset>/<split>/<split>.json`.

    Without `datasets`, every dataset folder of `predictions_dir` holding a `pred.json` is scored (each must exist
    in `data_dir`); data folders without predictions are listed under `not_predicted`. Returns
    `{"tasks": {dataset: {metric, score, ..., no_option}}, "categories": {key: score}, "average": mean of the
    categories, "option_rule": rule}`.
    """
    if option_rule not in OPTION_RULES:
        raise ValueError(f"option rule must be one of {OPTION_RULES}, got {option_rule!r}")
    data_dir, pred_dir = Path(data_dir), Path(predictions_dir)
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: predictions folder not found")
    if datasets is None:
        names = []
        for p in sorted(pred_dir.iterdir()):
            if p.is_dir() and (p / "pred.json").is_file():
                names.append(resolve_dataset(p.name).dataset)
        if not names:
            raise DataError(f"{pred_dir}: no <Dataset>/pred.json files")
    else:
        names = [resolve_dataset(d).dataset for d in datasets]
    available = list_demon_datasets(data_dir, split)
    scores: list[TaskScore] = []
    for name in [d for d in TASKS if d in set(names)]:  # table order, each once
        if name not in available:
            raise DataError(f"{pred_dir / name / 'pred.json'}: predictions for {name}, which {data_dir} does not hold "
                            f"(it has {', '.join(available)})")
        task = load_demon_task(data_dir, name, split)
        source = prediction_file(pred_dir, task.info)
        if source is None:
            raise DataError(f"{pred_dir / name / 'pred.json'}: file not found")
        scores.append(score_demon_task(task, read_demon_predictions(source), source, option_rule))
    categories = category_means(scores)
    return {
        "split": split,
        "tasks": {t.dataset: t.as_dict() for t in scores},
        "categories": {k: round(v, 4) for k, v in categories.items()},
        "average": round(sum(categories.values()) / len(categories), 4),
        "option_rule": option_rule,
        "not_predicted": [d for d in available if d not in {t.dataset for t in scores}],
    }


# ---------------------------------------------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------------------------------------------


def parse_yes_no(pred: str) -> str:
    """The official answer parse: "yes", "no" or "other". No stripping, no punctuation removal."""
    p = pred.lower()
    if p in ("yes", "no"):
        return p
    head = p[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def score_mme_subtask(rows: Sequence[MMEResult], source: str | Path = "results") -> dict[str, Any]:
    """acc, acc+ (both in percent), their sum (the subtask score, at most 200) and the official side counts."""
    by_image: dict[str, list[MMEResult]] = {}
    for r in rows:
        by_image.setdefault(r.image, []).append(r)
    for image, items in by_image.items():
        if len(items) != 2:
            lines = ", ".join(str(r.line) for r in items)
            raise DataError(f"{source}: image {image!r} has {len(items)} question(s) (line(s) {lines}); "
                            f"MME scores every image on exactly two")
        check_yes_no_pair([r.gt for r in items], f"{source}: image {image!r} (lines {items[0].line}, {items[1].line})")
    correct = both = other = tp = fn = tn = fp = 0
    for items in by_image.values():
        right = 0
        for r in items:
            gt, pred = r.gt.lower(), parse_yes_no(r.pred)
            right += gt == pred
            if pred == "other":
                other += 1
            elif gt == "yes":
                tp += pred == "yes"
                fn += pred == "no"
            else:
                tn += pred == "no"
                fp += pred == "yes"
        correct += right
        both += right == 2
    n_q, n_img = len(rows), len(by_image)
    acc, acc_plus = 100.0 * correct / n_q, 100.0 * both / n_img
    return {
        "score": round(acc + acc_plus, 4), "acc": round(acc, 4), "acc_plus": round(acc_plus, 4),
        "n_questions": n_q, "n_images": n_img, "other": other, "tp": tp, "fn": fn, "tn": tn, "fp": fp,
        # As the official tool: over the answers that parsed to yes/no; 0 where undefined.
        "precision": round(tp / (tp + fp), 4) if tp + fp else 0.0,
        "recall": round(tp / (tp + fn), 4) if tp + fn else 0.0,
    }


def score_mme(results_dir: str | Path) -> dict[str, Any]:
    """Score a folder of official results files (`<subtask>.txt`).

    Returns `{"subtasks": {name: score}, "perception": sum, "cognition": sum, ...}`. A total covers the subtasks
    present (`perception_max`/`cognition_max` say out of how much; the full benchmark gives 2000 and 800) and is
    None when none of its subtasks is present; `missing` lists absent subtasks, `details` the per-subtask counts.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise DataError(f"{results_dir}: results folder not found")
    files: dict[str, Path] = {}
    ignored = []
    for p in sorted(results_dir.glob("*.txt")):
        match = [s for s in SUBTASKS if s.lower() == p.stem.lower()]
        if not match:
            ignored.append(p.name)
            continue
        if match[0] in files:
            raise DataError(f"{results_dir}: {files[match[0]].name} and {p.name} both hold subtask {match[0]}")
        files[match[0]] = p
    if not files:
        raise DataError(f"{results_dir}: no results file named after an MME subtask ({', '.join(SUBTASKS)}).txt")
    details = {s: score_mme_subtask(read_results_file(files[s]), files[s]) for s in SUBTASKS if s in files}

    def total(group: tuple[str, ...]) -> float | None:
        present = [details[s]["score"] for s in group if s in details]
        return round(math.fsum(present), 4) if present else None

    return {
        "subtasks": {s: d["score"] for s, d in details.items()},
        "perception": total(PERCEPTION),
        "cognition": total(COGNITION),
        "perception_max": 200 * sum(s in details for s in PERCEPTION),
        "cognition_max": 200 * sum(s in details for s in COGNITION),
        "details": details,
        "missing": [s for s in SUBTASKS if s not in details],
        "ignored_files": ignored,
    }


def score_mme_splits(results_dir: str | Path, splits: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """MME scores per split of the images (e.g. the embedded benchmark's primary / detail): for every split, each
    subtask's score over that split's images only (acc + acc+, at most 200), their sum (`total`, out of `max`) and
    the accuracy over all its questions. `splits` is {subtask: {image file name: split}}; every image of a scored
    subtask must be in it."""
    results_dir = Path(results_dir)
    out: dict[str, dict[str, Any]] = {}
    for subtask, images in splits.items():
        path = results_dir / f"{subtask}.txt"
        if not path.is_file():
            continue
        rows = read_results_file(path)
        unknown = sorted({r.image for r in rows} - set(images))
        if unknown:
            raise DataError(f"{path}: image(s) {_ids(unknown)} are in no split")
        for split in sorted(set(images.values())):
            mine = [r for r in rows if images.get(r.image) == split]
            if mine:
                entry = out.setdefault(split, {"subtasks": {}, "correct": 0, "n_questions": 0})
                scored = score_mme_subtask(mine, path)
                entry["subtasks"][subtask] = scored["score"]
                entry["correct"] += round(scored["acc"] * scored["n_questions"] / 100)
                entry["n_questions"] += scored["n_questions"]
    for entry in out.values():
        entry["total"] = round(math.fsum(entry["subtasks"].values()), 4)
        entry["max"] = 200 * len(entry["subtasks"])
        entry["acc"] = round(100.0 * entry.pop("correct") / entry["n_questions"], 4)
    return out
