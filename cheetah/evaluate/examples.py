"""Qualitative examples for the evaluation report: a few samples of every task, with each model's answer.

For every DEMON task and MME subtask evaluated, `write_examples` draws the first `per_task` samples (in the order
of the data, not a selection of good ones) on one sheet, `<out>/examples/<benchmark>-<task>.png`: the images, the
prompt as the model saw it, the ground truth, and each model's answer side by side (base and VPG-C by default), as
read back from the official prediction files the scores were computed from. It returns the markdown section that
`report.write_report` appends to `report.md`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cheetah.io import atomic_write_bytes
from cheetah.pictures import SheetRow, render_sheet, shorten

EXAMPLES_DIR = "examples"
PER_TASK = 3
MAX_IMAGES = 8  # real DEMON samples can hold a dozen images; the sheet shows the first ones
PROMPT_CHARS = 600

if TYPE_CHECKING:
    from cheetah.evaluate.demon import DemonTask
    from cheetah.evaluate.mme import MMESample


def _demon_answers(predictions: Mapping[str, Path], dataset: str) -> dict[str, dict[str, str]]:
    """{model: {sample key: answer}} for the models that have a pred.json for `dataset`."""
    from cheetah.evaluate.scoring import read_demon_predictions

    out = {}
    for model, folder in predictions.items():
        path = folder / "demon" / dataset / "pred.json"
        if path.is_file():
            out[model] = {str(r["sample_id"]): r["pred_response"] for r in read_demon_predictions(path)}
    return out


def _mme_answers(predictions: Mapping[str, Path], subtask: str) -> dict[str, dict[tuple[str, str], str]]:
    """{model: {(image, question): answer}} for the models that have a results file for `subtask`."""
    from cheetah.evaluate.mme import read_results_file

    out = {}
    for model, folder in predictions.items():
        path = folder / "mme" / f"{subtask}.txt"
        if path.is_file():
            out[model] = {(r.image, r.question): r.pred for r in read_results_file(path)}
    return out


def _images(paths: tuple[Path, ...]) -> tuple[tuple[Path, ...], tuple[str, ...]]:
    shown = paths[:MAX_IMAGES]
    captions = [f"image {k + 1}" for k in range(len(shown))]
    if len(paths) > len(shown):
        captions[-1] += f" (+{len(paths) - len(shown)} more)"
    return shown, tuple(captions)


def demon_rows(task: "DemonTask", answers: Mapping[str, Mapping[str, str]], per_task: int) -> list[SheetRow]:
    """The first `per_task` samples of `task`: images, prompt, truth, then each model's answer."""
    rows = []
    for sample in task.samples[:per_task]:
        images, captions = _images(sample.images)
        text = [("Prompt", shorten(sample.prompt, PROMPT_CHARS)), ("Truth", sample.response)]
        text += [(model, got.get(sample.key, "(no answer)")) for model, got in answers.items()]
        rows.append(SheetRow(images=images, captions=captions, text=tuple(text)))
    return rows


def mme_rows(samples: Sequence["MMESample"], answers: Mapping[str, Mapping[tuple[str, str], str]],
             per_task: int) -> list[SheetRow]:
    """The first `per_task` images of a subtask, each with its two questions, truths and each model's answers."""
    by_image: dict[str, list["MMESample"]] = {}
    for s in samples:
        by_image.setdefault(s.image, []).append(s)
    rows = []
    for image, questions in list(by_image.items())[:per_task]:
        text = []
        for q in questions:
            text.append((f"Q{q.index + 1} (truth: {q.answer})", q.question))
            text += [(model, got.get((q.image, q.question), "(no answer)")) for model, got in answers.items()]
        rows.append(SheetRow(images=(questions[0].image_path,), captions=(image,), text=tuple(text)))
    return rows


def write_examples(out_dir: str | Path, predictions: Mapping[str, str | Path], demon_dir: str | Path | None = None,
                   mme_dir: str | Path | None = None, per_task: int = PER_TASK) -> tuple[dict[str, Path], str]:
    """Sheets of examples for the tasks under `demon_dir` / `mme_dir`, answered by the models whose prediction
    folders (`<folder>/demon/<Dataset>/pred.json`, `<folder>/mme/<subtask>.txt`) `predictions` names. Returns
    {name: path} of the sheets and the report's markdown section for them."""
    from cheetah.evaluate.demon import load_demon
    from cheetah.evaluate.mme import load_mme

    out_dir = Path(out_dir)
    folders = {model: Path(folder) for model, folder in predictions.items()}
    sheets: list[tuple[str, str, list[SheetRow], str]] = []  # (file stem, title, rows, note)
    if demon_dir is not None:
        for task in load_demon(demon_dir):
            answers = _demon_answers(folders, task.dataset)
            if answers:
                rows = demon_rows(task, answers, per_task)
                sheets.append((f"demon-{task.dataset}", f"DEMON {task.dataset}", rows,
                               f"first {len(rows)} of {len(task.samples)} samples; answers as scored "
                               f"({', '.join(answers)})"))
    if mme_dir is not None:
        for subtask, samples in load_mme(mme_dir).items():
            answers = _mme_answers(folders, subtask)
            if answers:
                rows = mme_rows(samples, answers, per_task)
                sheets.append((f"mme-{subtask}", f"MME {subtask}", rows,
                               f"first {len(rows)} images, each asked one Yes and one No question; answers as "
                               f"scored ({', '.join(answers)})"))
    written: dict[str, Path] = {}
    links: list[str] = []
    for stem, title, rows, note in sheets:
        name = f"{stem}.png"
        written[f"example:{name}"] = atomic_write_bytes(out_dir / EXAMPLES_DIR / name,
                                                        render_sheet(title, rows, note=note))
        links.append(f"#### {title}\n\n![{title}]({EXAMPLES_DIR}/{name})")
    if not links:
        return written, ""
    head = (f"### Examples\n\nThe first {per_task} samples of every task (in the order of the data, not chosen), "
            f"with the images, the prompt, the truth and each model's answer as scored.\n")
    return written, "\n\n".join([head, *links]) + "\n"
