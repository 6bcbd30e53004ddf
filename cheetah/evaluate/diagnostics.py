"""What a score alone does not say: how a model answered, and what answering without looking would score.

For one model's prediction files (the official `pred.json` / `<subtask>.txt`), per DEMON task and MME subtask:

- `n`, the number of samples, and `distinct_share`, the share of distinct (normalised) answers among them: 1/n
  (shown as one answer) means the model said the same thing whatever the images were;
- `top_share`, how often its most frequent answer came (a template answer shows here even when its words vary);
- for closed questions (multi-choice, image options, MME's Yes/No), `distribution`: how often each option was
  chosen — as the scorer reads the answer, so "the first image" and "It is the first image" count alike — beside
  `truth`, the distribution of the right answers;
- `examples`: the first few answers beside the truth.

`flags` turns these into warnings for the report: a model that gave one constant answer (or chose one option for
every sample) and a task on which every model scores 0; `paper_note` says where the paper itself reports
near-zero scores for every model (the image-option tasks). `constant_reference` is the no-vision reference: the
best score a single answer, repeated for every sample, gets on a task (the right answer most often listed, the
template sentence closest to all references), computed from the data alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cheetah.evaluate.demon import TASKS, DemonTask, load_demon_task
from cheetah.evaluate.mme import read_results_file
from cheetah.evaluate.scoring import (OptionRule, image_choice_correct, multi_choice_correct, nearest_option,
                                      normalize_answer, parse_yes_no, prediction_file, read_demon_predictions,
                                      rouge_l)

EXAMPLES = 3
"""Answers shown beside the truth per task."""
NO_OPTION = "(no option)"
"""A closed answer that matched none of the options (how the score judged it is the option rule's)."""
IMAGE_OPTION_TASKS_NOTE = ("the paper reports near-zero scores for every model on image-option tasks (answers must "
                           "begin with the right \"Image X\"; COMICS_Panel 0-8.2, RecipeQA_VisualCloze 0-18.4, "
                           "RecipeQA_ImageCoherence 0-11.6 over 11 models, Tables 11 and 12)")


def _share(count: int, n: int) -> float:
    return round(100.0 * count / n, 2) if n else 0.0


def _summary(answers: Sequence[str], labels: Sequence[str] | None, truths: Sequence[str],
             truth_labels: Sequence[str] | None, ids: Sequence[str]) -> dict[str, Any]:
    normalised = [normalize_answer(a) for a in answers]
    n = len(answers)
    top, top_count = Counter(normalised).most_common(1)[0] if n else ("", 0)
    out: dict[str, Any] = {"n": n, "distinct": len(set(normalised)), "distinct_share": _share(len(set(normalised)), n),
                           "top_answer": top, "top_share": _share(top_count, n)}
    if labels is not None:
        out["distribution"] = dict(Counter(labels).most_common())
        out["truth"] = dict(Counter(truth_labels or truths).most_common())
    out["examples"] = [{"id": i, "truth": t, "answer": a} for i, t, a in list(zip(ids, truths, answers))[:EXAMPLES]]
    return out


def _demon_label(task: DemonTask, answer: str) -> str | None:
    """The option a closed answer chose, as the scorer reads it; None for open-ended tasks."""
    if task.info.metric == "rouge_l":
        return None
    if task.info.image_choice:
        p = normalize_answer(answer)
        return p[:7] if p.startswith("image ") and len(p) >= 7 else NO_OPTION
    return None  # resolved per sample (options differ between samples)


def demon_answers(data_dir: str | Path, pred_dir: str | Path, datasets: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Answer statistics of one model's `<pred_dir>/<Dataset>/pred.json` for `datasets` (see the module doc)."""
    out: dict[str, dict[str, Any]] = {}
    for name in datasets:
        task = load_demon_task(data_dir, name)
        source = prediction_file(Path(pred_dir), task.info)
        if source is None:
            continue
        by_id = {str(r["sample_id"]): r["pred_response"] for r in read_demon_predictions(source)}
        samples = [s for s in task.samples if s.key in by_id]
        answers = [by_id[s.key] for s in samples]
        labels: list[str] | None = None
        truth_labels: list[str] | None = None
        if task.info.image_choice:
            labels = [_demon_label(task, a) or NO_OPTION for a in answers]
            truth_labels = [normalize_answer(s.response)[:7] for s in samples]
        elif task.info.metric != "rouge_l":
            labels = []
            for s, a in zip(samples, answers):
                chosen = nearest_option(a, s.choice_list or ())
                labels.append(NO_OPTION if chosen is None else normalize_answer(s.choice_list[chosen]))
            truth_labels = [normalize_answer(s.response) for s in samples]
        out[task.dataset] = _summary(answers, labels, [s.response for s in samples], truth_labels,
                                     [s.key for s in samples])
    return out


def mme_answers(pred_dir: str | Path, subtasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Answer statistics of one model's MME results files `<pred_dir>/<subtask>.txt` (yes / no / other)."""
    out: dict[str, dict[str, Any]] = {}
    for subtask in subtasks:
        path = Path(pred_dir) / f"{subtask}.txt"
        if not path.is_file():
            continue
        rows = read_results_file(path)
        out[subtask] = _summary([r.pred for r in rows], [parse_yes_no(r.pred) for r in rows], [r.gt for r in rows],
                                [r.gt.lower() for r in rows], [f"{r.image}#{k % 2}" for k, r in enumerate(rows)])
    return out


# ---------------------------------------------------------------------------------------------------------------
# No-vision reference and flags
# ---------------------------------------------------------------------------------------------------------------


def _constant_score(task: DemonTask, answer: str, option_rule: OptionRule) -> float:
    if task.info.metric == "rouge_l":
        values = [rouge_l(answer, s.response) for s in task.samples]
    elif task.info.image_choice:
        values = [float(image_choice_correct(answer, s.response, len(s.choice_list or ()))) for s in task.samples]
    else:
        values = [float(multi_choice_correct(answer, s.response, s.choice_list or (), option_rule)[0])
                  for s in task.samples]
    return 100.0 * sum(values) / len(values)


def constant_reference(data_dir: str | Path, datasets: Sequence[str], option_rule: OptionRule = "official",
                       candidates: int = 40) -> dict[str, dict[str, Any]]:
    """Per DEMON task: the best score of one answer given to every sample, among the task's most frequent right
    answers (up to `candidates`), scored as the task is ({"score", "answer"}). What a model earns without looking."""
    out: dict[str, dict[str, Any]] = {}
    for name in datasets:
        task = load_demon_task(data_dir, name)
        pool = [t for t, _ in Counter(s.response for s in task.samples).most_common(candidates)]
        scored = [(_constant_score(task, answer, option_rule), answer) for answer in pool]
        best = max(scored, key=lambda x: x[0])
        out[task.dataset] = {"score": round(best[0], 4), "answer": best[1]}
    return out


MME_CONSTANT_SCORE = 50.0
"""MME's acc + acc+ for one constant answer: every image has one Yes- and one No-question, so acc is 50 % and acc+
0 whatever the answer is."""


def paper_note(task: str) -> str | None:
    """What the paper says beside this task's number, if anything (the image-option tasks)."""
    info = TASKS.get(task)
    return IMAGE_OPTION_TASKS_NOTE if info is not None and info.image_choice else None


def flags(results: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """{"<benchmark>/<task>": [reasons]} for every task that cannot tell the models apart as it stands: a model
    that gave one constant answer, or chose the same option for every sample, and a task every model scores 0 on.
    `results` is the report's input ({model: {"demon": scores, "mme": scores, "answers": {"demon": …, "mme": …}}})."""
    out: dict[str, list[str]] = {}
    for model, entry in results.items():
        for bench, stats in (entry.get("answers") or {}).items():
            for task, s in stats.items():
                reasons = out.setdefault(f"{bench}/{task}", [])
                if s["n"] > 1 and s["distinct"] == 1:
                    reasons.append(f"{model} gave one answer to all {s['n']} samples ({s['top_answer']!r})")
                elif s.get("distribution") and len(s["distribution"]) == 1 and s["n"] > 1:
                    (label, _), = s["distribution"].items()
                    reasons.append(f"{model} chose {label!r} for all {s['n']} samples")
    for bench, key in (("demon", "tasks"), ("mme", "subtasks")):
        scores: dict[str, list[float]] = {}
        for entry in results.values():
            for task, value in ((entry.get(bench) or {}).get(key) or {}).items():
                scores.setdefault(task, []).append(value["score"] if isinstance(value, Mapping) else value)
        for task, values in scores.items():
            if values and all(v == 0 for v in values):
                out.setdefault(f"{bench}/{task}", []).append(f"every model scores 0 ({len(values)} models)")
    return {k: v for k, v in out.items() if v}
