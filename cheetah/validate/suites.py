"""The four suites: the tables of records each one validates.

A suite turns files into one or more `Table`s: a pandas frame with one row per record (every column of object
dtype, so types are checked per value), the locator columns `_where` (file:line) and `id`, and derived `*_problem`
columns for checks GX cannot express. The expectations on each table are not code: they are the Great Expectations
suite `expectations/<suite>-<table>.json` (`Table.suite_name`), read by the runner, so a reviewer sees and diffs
exactly what is asserted. Bounds that come from `params.yaml` (`validate.max_text_chars`,
`validate.balance_tolerance`) appear there as GX suite parameters, `{"$PARAMETER": "max_text_chars"}`.

The benchmark suites also ask the evaluation's own loaders (`cheetah.evaluate.demon`, `cheetah.evaluate.mme`)
about every record, so whatever validation accepts, evaluation loads.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from cheetah.config import ValidateConfig
from cheetah.evaluate import demon, mme
from cheetah.io import DataError
from cheetah.formats import (
    DATASETS,
    DEMON_SPLIT_FILE,
    SOURCE_CAPTIONS,
    SYNTHETIC_CAPTIONS,
    SYNTHETIC_PAIRS,
    demon_document_problem,
    image_list_problem,
    placeholder_problem,
    read_lines,
    text_problem,
)
from cheetah.validate.checks import Images, common_size, demon_placeholder_problem, edit_problem, joined
from cheetah.world.language import EDIT_TYPES

SUITES = DATASETS
INLINE_CHOICES = re.compile(r"choice list\s*:\s*\[", re.IGNORECASE)


@dataclasses.dataclass
class Table:
    """Rows of one kind of record, and what to quarantine a bad row as. The expectations on it are the GX suite
    named `suite_name(suite)`."""

    name: str
    frame: pd.DataFrame
    records: list[Any] | None = None
    """The raw record behind each row (same order), written to the quarantine; None for aggregate tables."""
    index_columns: tuple[str, ...] = ("_where", "id")

    def suite_name(self, suite: str) -> str:
        """`<suite>-<table>` in plain characters (GX turns dots in suite names into data-docs folders)."""
        return re.sub(r"[^A-Za-z0-9_-]+", "_", f"{suite}-{self.name}")


def _frame(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    data = {c: [r.get(c) for r in rows] for c in columns}
    return pd.DataFrame(data, columns=columns, dtype=object)


# ---------------------------------------------------------------------------------------------------------------
# source: captions.jsonl + images (the corpus a user brings, or `cheetah world` writes)
# ---------------------------------------------------------------------------------------------------------------


def source_tables(root: Path, cfg: ValidateConfig) -> list[Table]:
    rows_in = read_lines(root / SOURCE_CAPTIONS)
    images = Images(root, cfg.image_size)
    size = common_size(images, [rec.get("image") for _, rec, p in rows_in if p is None])
    rows, records = [], []
    for lineno, rec, problem in rows_in:
        r = rec if isinstance(rec, dict) else {}  # (a line that is not UTF-8 still names its id)
        image = r.get("image")
        rows.append({
            "_where": f"{SOURCE_CAPTIONS}:{lineno}", "id": r.get("id"), "image": image, "caption": r.get("caption"),
            "record_problem": problem,
            "text_problem": text_problem(r.get("caption"), "caption"),
            "path_problem": images.path_problem(image, "image"),
            "image_problem": images.file_problem(image, "image", size),
        })
        records.append(rec)
    frame = _frame(rows, ["_where", "id", "image", "caption", "record_problem", "text_problem", "path_problem",
                          "image_problem"])
    return [Table(SOURCE_CAPTIONS, frame, records)]


# ---------------------------------------------------------------------------------------------------------------
# synthetic: synthetic.jsonl + captions.jsonl + images (the output of `cheetah synthesize`)
# ---------------------------------------------------------------------------------------------------------------


def _instruction_rows(file: str, rows_in: list[tuple[int, Any, str | None]], images: Images,
                      size: tuple[int, int] | None, n_images: int, what: str,
                      with_edit: bool) -> tuple[list[dict[str, Any]], list[Any]]:
    rows, records = [], []
    for lineno, rec, problem in rows_in:
        r = rec if isinstance(rec, dict) else {}
        paths = r.get("images")
        refs = list(enumerate(paths)) if isinstance(paths, list) else []
        edit = r.get("edit")
        row = {
            "_where": f"{file}:{lineno}", "id": r.get("id"), "images": paths,
            "instruction": r.get("instruction"), "response": r.get("response"),
            "record_problem": problem,
            "images_problem": image_list_problem(paths, n_images, what) if isinstance(paths, list) else None,
            "placeholder_problem": placeholder_problem(r.get("instruction"), paths),
            "text_problem": text_problem(r.get("response"), "response"),
            "path_problem": joined([images.path_problem(p, f"images[{k}]") for k, p in refs]),
            "image_problem": joined([images.file_problem(p, f"images[{k}]", size) for k, p in refs]),
        }
        if with_edit:
            row.update({
                "edit": edit, "source_id": r.get("source_id"),
                "edit_type": edit.get("type") if isinstance(edit, dict) else None,
                "edit_problem": edit_problem(edit, size),
            })
        rows.append(row)
        records.append(rec)
    return rows, records


def _balance_table(pairs: list[dict[str, Any]], requested: list[str] | None) -> Table:
    """Each edit type's share of the valid pairs, against the uniform share (the requested types, when known)."""
    counts = Counter(p["edit_type"] for p in pairs if p.get("edit_type") in EDIT_TYPES)
    types = [t for t in requested if t in EDIT_TYPES] if requested else sorted(counts)
    total = sum(counts[t] for t in types)
    rows = []
    for t in types:
        share = counts[t] / total if total else 0.0
        rows.append({"edit_type": t, "count": counts[t], "share": round(share, 4),
                     "deviation": round(abs(share - 1 / len(types)), 4)})
    frame = pd.DataFrame(rows, columns=["edit_type", "count", "share", "deviation"])
    frame = frame.astype({"count": "int64", "share": "float64", "deviation": "float64"})
    return Table("edit balance", frame, None, index_columns=("edit_type", "share"))


def synthetic_tables(root: Path, cfg: ValidateConfig) -> list[Table]:
    pairs_in = read_lines(root / SYNTHETIC_PAIRS)
    captions_in = read_lines(root / SYNTHETIC_CAPTIONS)
    images = Images(root, cfg.image_size)
    refs = [p for rows in (pairs_in, captions_in) for _, rec, prob in rows if prob is None
            for p in (rec.get("images") if isinstance(rec.get("images"), list) else [])]
    size = common_size(images, refs)

    pair_rows, pair_records = _instruction_rows(SYNTHETIC_PAIRS, pairs_in, images, size, 2,
                                                "original, edited", with_edit=True)
    caption_rows, caption_records = _instruction_rows(SYNTHETIC_CAPTIONS, captions_in, images, size, 1,
                                                      "one image per caption sample", with_edit=False)
    common = ["_where", "id", "images", "instruction", "response", "record_problem", "images_problem",
              "placeholder_problem", "text_problem", "path_problem", "image_problem"]
    requested = None
    stats = root / "stats.json"
    if stats.is_file():
        try:
            requested = json.loads(stats.read_text(encoding="utf-8")).get("settings", {}).get("edit_types")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            requested = None  # stats.json is informative only; balance then uses the types present
    return [
        Table(SYNTHETIC_PAIRS, _frame(pair_rows, common + ["edit", "source_id", "edit_type", "edit_problem"]),
              pair_records),
        Table(SYNTHETIC_CAPTIONS, _frame(caption_rows, common), caption_records),
        _balance_table(pair_rows, requested if isinstance(requested, list) else None),
    ]


# ---------------------------------------------------------------------------------------------------------------
# demon: <root>/<Dataset>/core/core.json, images in <root>/<Dataset>/core/images/
# ---------------------------------------------------------------------------------------------------------------


def _demon_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if (path / DEMON_SPLIT_FILE).is_file():
        return [path / DEMON_SPLIT_FILE]
    found = sorted(path.glob(f"*/{DEMON_SPLIT_FILE}"))
    if not found:
        raise DataError(f"{path}: no DEMON core.json found (expected <root>/<Dataset>/core/core.json)")
    return found


def choice_problem(question_type: Any, context: Any, choices: Any) -> str | None:
    """A multi-choice sample lists its options in task_instance.choice_list or inline in the context
    ("Choice List:[...]", as the README examples and image-option tasks do); a choice_list, if given, holds text."""
    if choices is not None:
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c.strip() for c in choices)):
            return "task_instance.choice_list must be a non-empty list of non-empty strings"
        return None
    if question_type == "multi-choice" and not (isinstance(context, str) and INLINE_CHOICES.search(context)):
        return "a multi-choice sample needs task_instance.choice_list or a 'Choice List:[...]' in its context"
    return None


def _loader_problem(error: DataError, where: Path) -> str:
    """A loader's message without the path it starts with (the row already names the file and record)."""
    text = str(error)
    if not text.startswith(str(where)):
        return text
    rest = text[len(str(where)):]
    line = re.match(r":(\d+): ", rest)
    return f"line {line.group(1)}: {rest[line.end():]}" if line else rest.lstrip(": ")


def demon_tables(path: Path, cfg: ValidateConfig) -> list[Table]:
    meta_rows, meta_records, data_rows, data_records = [], [], [], []
    base = path if path.is_dir() else path.parent.parent.parent
    for file in _demon_files(path):
        rel = file.relative_to(base).as_posix() if file.is_relative_to(base) else str(file)
        problem, doc = None, None
        try:
            doc = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problem = f"not valid JSON ({e})"
        document_problem = demon_document_problem(doc) if problem is None else None
        good_instructions = problem is None and document_problem is None
        if document_problem and not document_problem.startswith("metadata.task_instruction"):
            problem = document_problem
        meta = doc["metadata"] if problem is None else {}
        data = doc["data"] if problem is None else []
        instructions = meta.get("task_instruction")
        dataset = meta.get("dataset")
        # Evaluation finds a task by its folder name in the task table (it decides the metric): an unknown
        # folder would be refused there.
        try:
            info, dataset_problem = demon.resolve_dataset(file.parent.parent.name), None
        except DataError as e:
            info, dataset_problem = None, f"folder {file.parent.parent.name}: {e}"
        count_problem = None
        if problem is None and meta.get("num_sample") != len(data):
            count_problem = f"metadata.num_sample is {meta.get('num_sample')!r} but data has {len(data)} samples"
        elif problem is None and not data:
            count_problem = "data is empty"
        meta_rows.append({
            "_where": rel, "id": dataset, "split": meta.get("split"), "num_sample": meta.get("num_sample"),
            "question_type": meta.get("question_type"), "record_problem": problem,
            "dataset_problem": dataset_problem,
            "instruction_problem": None if problem or good_instructions else document_problem,
            "count_problem": count_problem,
        })
        meta_records.append(meta)
        # The official loader joins images_path to <split>/images; copies without that level keep them beside
        # the json (the evaluation loader accepts both).
        roots = demon.image_roots(file.parent)
        images = Images(roots[0], cfg.image_size)
        size = (cfg.image_size, cfg.image_size) if cfg.image_size else None  # real benchmark images vary in size
        for k, item in enumerate(data):
            it = item if isinstance(item, dict) else {}
            inst = it.get("task_instance") if isinstance(it.get("task_instance"), dict) else {}
            paths = inst.get("images_path")
            refs = list(enumerate(paths)) if isinstance(paths, list) else []
            choices = inst.get("choice_list")
            tid = it.get("task_instruction_id")
            response = it.get("response")
            row_problem = None
            if not isinstance(item, dict) or not isinstance(it.get("task_instance"), dict):
                row_problem = "sample must be an object with a task_instance object"
            row = {
                "_where": f"{rel}:data[{k}]",
                "id": f"{dataset}/{it.get('sample_id')}",
                "sample_id": it.get("sample_id"),
                "context": inst.get("context"),
                "images_path": paths,
                "response": str(response) if isinstance(response, (str, int, float)) and
                not isinstance(response, bool) else response,
                "record_problem": row_problem,
                "instruction_id_problem": None if (isinstance(tid, int) and not isinstance(tid, bool)
                                                   and good_instructions and 0 <= tid < len(instructions))
                else f"task_instruction_id {tid!r} is not an index into metadata.task_instruction",
                "choice_problem": choice_problem(meta.get("question_type"), inst.get("context"), choices),
                "placeholder_problem": demon_placeholder_problem(inst.get("context"), choices, paths),
                "path_problem": joined([images.path_problem(p, f"images_path[{j}]") for j, p in refs]),
                "image_problem": joined([images.file_problem(p, f"images_path[{j}]", size) for j, p in refs]),
                "load_problem": None,
            }
            # What the evaluation's loader refuses and no check above named (so nothing is reported twice).
            if info is not None and good_instructions and not any(v for c, v in row.items() if c.endswith("_problem")):
                try:
                    demon.build_sample(info, item, k, instructions, roots, file)
                except DataError as e:
                    row["load_problem"] = _loader_problem(e, file)
            data_rows.append(row)
            data_records.append(item)
    meta_frame = _frame(meta_rows, ["_where", "id", "split", "num_sample", "question_type", "record_problem",
                                    "dataset_problem", "instruction_problem", "count_problem"])
    data_frame = _frame(data_rows, ["_where", "id", "sample_id", "context", "images_path", "response",
                                    "record_problem", "instruction_id_problem", "choice_problem",
                                    "placeholder_problem", "path_problem", "image_problem", "load_problem"])
    return [Table("core.json metadata", meta_frame, meta_records),
            Table("core.json data", data_frame, data_records)]


# ---------------------------------------------------------------------------------------------------------------
# mme: <task>/<id>.png|jpg + <task>/<id>.txt, or <task>/images/ + <task>/questions_answers_YN/ (found and read by
# cheetah.evaluate.mme, the evaluation's loader)
# ---------------------------------------------------------------------------------------------------------------


def mme_tables(path: Path, cfg: ValidateConfig) -> list[Table]:
    """One row per question of every question file the evaluation would read; a file it refuses is one row with
    its message (and no question or answer), and so is an image without a question file."""
    if not path.is_dir():
        raise DataError(f"{path}: not a folder (expected an MME root with one folder per subtask)")
    root = mme.find_root(path)
    size = (cfg.image_size, cfg.image_size) if cfg.image_size else None
    rows, records = [], []
    for subtask, folder in mme.subtask_dirs(root).items():
        files = mme.subtask_files(folder)
        images = Images(files.image_dir, cfg.image_size)
        for stem, txt in files.texts.items():
            rel = f"{folder.name}/{txt.relative_to(folder).as_posix()}"
            image = files.images.get(stem)
            image_problem = (f"no image {stem}.png/.jpg for {rel}" if image is None
                             else images.file_problem(image.name, "image", size))
            try:
                questions, file_problem = mme.read_question_file(txt), None
            except DataError as e:
                questions, file_problem = [], _loader_problem(e, txt)
            raw = txt.read_bytes().decode("utf-8", errors="replace")
            for k, (question, answer) in enumerate(questions or [(None, None)], start=1):
                rows.append({"_where": f"{rel}:{k}" if questions else rel, "id": f"{subtask}/{stem}",
                             "key": f"{rel}:{k}", "question": question, "answer": answer,
                             "file_problem": file_problem, "image_problem": image_problem})
                records.append(f"{question}\t{answer}" if questions else raw)
        for stem in sorted(set(files.images) - set(files.texts)):
            rel = f"{folder.name}/{files.images[stem].relative_to(folder).as_posix()}"
            rows.append({"_where": rel, "id": f"{subtask}/{stem}", "key": rel, "question": None, "answer": None,
                         "file_problem": f"image {rel} has no question file {stem}.txt (every MME image is asked "
                                         "a pair of questions)", "image_problem": None})
            records.append(rel)
    frame = _frame(rows, ["_where", "id", "key", "question", "answer", "file_problem", "image_problem"])
    return [Table("questions", frame, records)]


BUILDERS = {"source": source_tables, "synthetic": synthetic_tables, "demon": demon_tables, "mme": mme_tables}
