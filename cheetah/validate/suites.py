"""The four suites: what each validates, as tables of records plus the expectations on them.

A suite turns files into one or more `Table`s: a pandas frame with one row per record (every column of object
dtype, so types are checked per value), the locator columns `_where` (file:line) and `id`, derived `*_problem`
columns for checks GX cannot express, and the list of GX expectations for that table.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import great_expectations.expectations as gxe
import pandas as pd

from cheetah.config import ValidateConfig
from cheetah.io import DataError
from cheetah.validate.checks import (
    Images,
    common_size,
    demon_placeholder_problem,
    edit_problem,
    image_list_problem,
    joined,
    placeholder_problem,
    read_jsonl_rows,
)
from cheetah.world.language import EDIT_TYPES

SUITES = ("source", "synthetic", "demon", "mme")
DEMON_QUESTION_TYPES = ["multi-choice", "open-ended", ""]  # the official ALFRED core.json ships "" (ROUGE-L task)
DEMON_SPLITS = ["core", "full"]
INLINE_CHOICES = re.compile(r"choice list\s*:\s*\[", re.IGNORECASE)


@dataclasses.dataclass
class Table:
    """Rows of one kind of record, the expectations on them, and what to quarantine a bad row as."""

    name: str
    frame: pd.DataFrame
    expectations: list[Any]
    records: list[Any] | None = None
    """The raw record behind each row (same order), written to the quarantine; None for aggregate tables."""
    index_columns: tuple[str, ...] = ("_where", "id")


def _frame(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    data = {c: [r.get(c) for r in rows] for c in columns}
    return pd.DataFrame(data, columns=columns, dtype=object)


def _problems_null(*columns: str) -> list[Any]:
    return [gxe.ExpectColumnValuesToBeNull(column=c) for c in columns]


def _text(column: str, max_chars: int) -> list[Any]:
    """Present, a string, not blank, and within the length bound."""
    return [
        gxe.ExpectColumnValuesToNotBeNull(column=column),
        gxe.ExpectColumnValuesToBeOfType(column=column, type_="str"),
        gxe.ExpectColumnValuesToMatchRegex(column=column, regex=r"\S"),
        gxe.ExpectColumnValueLengthsToBeBetween(column=column, min_value=1, max_value=max_chars),
    ]


def _id(column: str = "id") -> list[Any]:
    return [gxe.ExpectColumnValuesToNotBeNull(column=column),
            gxe.ExpectColumnValuesToBeOfType(column=column, type_="str"),
            gxe.ExpectColumnValuesToBeUnique(column=column)]


def _jsonl(path: Path) -> list[tuple[int, Any, str | None]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return read_jsonl_rows(path)


# ---------------------------------------------------------------------------------------------------------------
# source: captions.jsonl + images (the corpus a user brings, or `cheetah world` writes)
# ---------------------------------------------------------------------------------------------------------------


def source_tables(root: Path, cfg: ValidateConfig) -> list[Table]:
    rows_in = _jsonl(root / "captions.jsonl")
    images = Images(root, cfg.image_size)
    size = common_size(images, [rec.get("image") for _, rec, p in rows_in if p is None])
    rows, records = [], []
    for lineno, rec, problem in rows_in:
        r = rec if problem is None else {}
        image = r.get("image")
        rows.append({
            "_where": f"captions.jsonl:{lineno}", "id": r.get("id"), "image": image, "caption": r.get("caption"),
            "record_problem": problem,
            "path_problem": images.path_problem(image, "image"),
            "image_problem": images.file_problem(image, "image", size),
        })
        records.append(rec)
    frame = _frame(rows, ["_where", "id", "image", "caption", "record_problem", "path_problem", "image_problem"])
    expectations = [
        *_problems_null("record_problem"),
        *_id(),
        gxe.ExpectColumnValuesToNotBeNull(column="image"),
        gxe.ExpectColumnValuesToBeOfType(column="image", type_="str"),
        *_text("caption", cfg.max_text_chars),
        *_problems_null("path_problem", "image_problem"),
    ]
    return [Table("captions.jsonl", frame, expectations, records)]


# ---------------------------------------------------------------------------------------------------------------
# synthetic: synthetic.jsonl + captions.jsonl + images (the output of `cheetah synthesize`)
# ---------------------------------------------------------------------------------------------------------------


def _instruction_rows(file: str, rows_in: list[tuple[int, Any, str | None]], images: Images,
                      size: tuple[int, int] | None, n_images: int, what: str,
                      with_edit: bool) -> tuple[list[dict[str, Any]], list[Any]]:
    rows, records = [], []
    for lineno, rec, problem in rows_in:
        r = rec if problem is None else {}
        paths = r.get("images")
        refs = list(enumerate(paths)) if isinstance(paths, list) else []
        edit = r.get("edit")
        row = {
            "_where": f"{file}:{lineno}", "id": r.get("id"), "images": paths,
            "instruction": r.get("instruction"), "response": r.get("response"),
            "record_problem": problem,
            "images_problem": image_list_problem(paths, n_images, what),
            "placeholder_problem": placeholder_problem(r.get("instruction"), paths),
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


def _balance_table(pairs: list[dict[str, Any]], requested: list[str] | None, tolerance: float) -> Table:
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
    expectations = [gxe.ExpectColumnValuesToBeBetween(column="deviation", min_value=0, max_value=tolerance)]
    return Table("edit balance", frame, expectations, None, index_columns=("edit_type", "share"))


def synthetic_tables(root: Path, cfg: ValidateConfig) -> list[Table]:
    pairs_in = _jsonl(root / "synthetic.jsonl")
    captions_in = _jsonl(root / "captions.jsonl")
    images = Images(root, cfg.image_size)
    refs = [p for rows in (pairs_in, captions_in) for _, rec, prob in rows if prob is None
            for p in (rec.get("images") if isinstance(rec.get("images"), list) else [])]
    size = common_size(images, refs)

    pair_rows, pair_records = _instruction_rows("synthetic.jsonl", pairs_in, images, size, 2,
                                                "original, edited", with_edit=True)
    caption_rows, caption_records = _instruction_rows("captions.jsonl", captions_in, images, size, 1,
                                                      "one image per caption sample", with_edit=False)
    common = ["_where", "id", "images", "instruction", "response", "record_problem", "images_problem",
              "placeholder_problem", "path_problem", "image_problem"]
    def sample_expectations() -> list[Any]:  # fresh objects per table: a GX expectation belongs to one suite
        return [
            *_problems_null("record_problem"),
            *_id(),
            gxe.ExpectColumnValuesToNotBeNull(column="images"),
            gxe.ExpectColumnValuesToBeOfType(column="images", type_="list"),
            *_text("instruction", cfg.max_text_chars),
            *_text("response", cfg.max_text_chars),
            *_problems_null("images_problem", "placeholder_problem", "path_problem", "image_problem"),
        ]

    pair_expectations = [
        *sample_expectations(),
        gxe.ExpectColumnValuesToNotBeNull(column="edit"),
        gxe.ExpectColumnValuesToBeOfType(column="edit", type_="dict"),
        gxe.ExpectColumnValuesToBeInSet(column="edit_type", value_set=list(EDIT_TYPES)),
        *_problems_null("edit_problem"),
        gxe.ExpectColumnValuesToNotBeNull(column="source_id"),
        gxe.ExpectColumnValuesToBeOfType(column="source_id", type_="str"),
    ]
    requested = None
    stats = root / "stats.json"
    if stats.is_file():
        try:
            requested = json.loads(stats.read_text(encoding="utf-8")).get("settings", {}).get("edit_types")
        except (json.JSONDecodeError, AttributeError):
            requested = None  # stats.json is informative only; balance then uses the types present
    return [
        Table("synthetic.jsonl", _frame(pair_rows, common + ["edit", "source_id", "edit_type", "edit_problem"]),
              pair_expectations, pair_records),
        Table("captions.jsonl", _frame(caption_rows, common), sample_expectations(), caption_records),
        _balance_table(pair_rows, requested if isinstance(requested, list) else None, cfg.balance_tolerance),
    ]


# ---------------------------------------------------------------------------------------------------------------
# demon: <root>/<Dataset>/core/core.json, images in <root>/<Dataset>/core/images/
# ---------------------------------------------------------------------------------------------------------------


def _demon_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if (path / "core" / "core.json").is_file():
        return [path / "core" / "core.json"]
    found = sorted(path.glob("*/core/core.json"))
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
        if problem is None and (not isinstance(doc, dict) or not isinstance(doc.get("metadata"), dict)
                                or not isinstance(doc.get("data"), list)):
            problem = "top level must be {\"metadata\": {...}, \"data\": [...]}"
        meta = doc["metadata"] if problem is None else {}
        data = doc["data"] if problem is None else []
        instructions = meta.get("task_instruction")
        good_instructions = (isinstance(instructions, list) and instructions
                             and all(isinstance(t, str) and t.strip() for t in instructions))
        dataset = meta.get("dataset")
        meta_rows.append({
            "_where": rel, "id": dataset, "split": meta.get("split"), "num_sample": meta.get("num_sample"),
            "question_type": meta.get("question_type"), "record_problem": problem,
            "instruction_problem": None if problem or good_instructions else
            "metadata.task_instruction must be a non-empty list of non-empty strings",
            "count_problem": None if problem or meta.get("num_sample") == len(data) else
            f"metadata.num_sample is {meta.get('num_sample')!r} but data has {len(data)} samples",
        })
        meta_records.append(meta)
        # The official loader joins images_path to <split>/images; copies without that level keep them beside
        # the json (the evaluation loader accepts both).
        images = Images(file.parent / "images" if (file.parent / "images").is_dir() else file.parent,
                        cfg.image_size)
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
            data_rows.append({
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
            })
            data_records.append(item)
    meta_frame = _frame(meta_rows, ["_where", "id", "split", "num_sample", "question_type", "record_problem",
                                    "instruction_problem", "count_problem"])
    meta_expectations = [
        *_problems_null("record_problem"),
        *_id(),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=DEMON_SPLITS),
        gxe.ExpectColumnValuesToNotBeNull(column="question_type"),
        gxe.ExpectColumnValuesToBeInSet(column="question_type", value_set=DEMON_QUESTION_TYPES),
        gxe.ExpectColumnValuesToBeOfType(column="num_sample", type_="int"),
        *_problems_null("instruction_problem", "count_problem"),
    ]
    data_frame = _frame(data_rows, ["_where", "id", "sample_id", "context", "images_path", "response",
                                    "record_problem", "instruction_id_problem", "choice_problem",
                                    "placeholder_problem", "path_problem", "image_problem"])
    data_expectations = [
        *_problems_null("record_problem"),
        gxe.ExpectColumnValuesToNotBeNull(column="sample_id"),
        gxe.ExpectColumnValuesToBeInTypeList(column="sample_id", type_list=["int", "str"]),
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        *_text("context", cfg.max_text_chars),
        gxe.ExpectColumnValuesToNotBeNull(column="images_path"),
        gxe.ExpectColumnValuesToBeOfType(column="images_path", type_="list"),
        *_text("response", cfg.max_text_chars),
        *_problems_null("instruction_id_problem", "choice_problem", "placeholder_problem", "path_problem",
                        "image_problem"),
    ]
    return [Table("core.json metadata", meta_frame, meta_expectations, meta_records),
            Table("core.json data", data_frame, data_expectations, data_records)]


# ---------------------------------------------------------------------------------------------------------------
# mme: <task>/<id>.png|jpg + <task>/<id>.txt, or <task>/images/ + <task>/questions_answers_YN/
# ---------------------------------------------------------------------------------------------------------------

MME_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _mme_tasks(path: Path) -> list[tuple[Path, Path, Path]]:
    """(task folder, folder of .txt files, folder of images) for each task under `path` (or `path` itself)."""

    def layout(task: Path) -> tuple[Path, Path, Path] | None:
        if (task / "questions_answers_YN").is_dir():
            return task, task / "questions_answers_YN", task / "images"
        if any(task.glob("*.txt")):
            return task, task, task
        return None

    if not path.is_dir():
        raise DataError(f"{path}: not a folder (expected an MME root with one folder per subtask)")
    own = layout(path)
    tasks = [own] if own else [t for t in (layout(d) for d in sorted(path.iterdir()) if d.is_dir()) if t]
    if not tasks:
        raise DataError(f"{path}: no MME subtask folders found (<task>/<id>.txt or <task>/questions_answers_YN/)")
    return tasks


def mme_tables(path: Path, cfg: ValidateConfig) -> list[Table]:
    rows, records = [], []
    for task, txt_dir, img_dir in _mme_tasks(path):
        images = Images(img_dir, cfg.image_size)
        size = (cfg.image_size, cfg.image_size) if cfg.image_size else None
        for txt in sorted(txt_dir.glob("*.txt")):
            rel = f"{task.name}/{txt.relative_to(task).as_posix()}"
            candidates = [txt.stem + s for s in MME_IMAGE_SUFFIXES]
            image = next((c for c in candidates if (img_dir / c).is_file()), None)
            image_problem = (f"no image {txt.stem}.png/.jpg for {rel}" if image is None
                             else images.file_problem(image, "image", size))
            lines = [ln for ln in txt.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
            parsed = [ln.split("\t") for ln in lines]
            answers = [p[1].strip() if len(p) == 2 else None for p in parsed]
            file_problem = None
            if len(lines) != 2:
                file_problem = f"{rel} has {len(lines)} question line(s); expected exactly 2"
            elif sorted(a or "" for a in answers) != ["No", "Yes"]:
                file_problem = f"{rel} answers are {answers}; expected one Yes and one No"
            # An empty file still gets one row, so its file_problem is reported against it.
            entries = list(enumerate(zip(lines, parsed), start=1)) or [(0, ("", []))]
            for k, (line, parts) in entries:
                ok = len(parts) == 2
                rows.append({
                    "_where": f"{rel}:{k}", "id": f"{task.name}/{txt.stem}", "key": f"{rel}:{k}",
                    "question": parts[0].strip() if ok else None, "answer": parts[1].strip() if ok else None,
                    "format_problem": None if ok or k == 0 else "line must be 'question<TAB>Yes|No'",
                    "file_problem": file_problem, "image_problem": image_problem,
                })
                records.append(line)
    frame = _frame(rows, ["_where", "id", "key", "question", "answer", "format_problem", "file_problem",
                          "image_problem"])
    expectations = [
        *_problems_null("format_problem", "file_problem"),
        gxe.ExpectColumnValuesToBeUnique(column="key"),
        *_text("question", cfg.max_text_chars),
        gxe.ExpectColumnValuesToNotBeNull(column="answer"),
        gxe.ExpectColumnValuesToBeInSet(column="answer", value_set=["Yes", "No"]),
        *_problems_null("image_problem"),
    ]
    return [Table("questions", frame, expectations, records)]


BUILDERS = {"source": source_tables, "synthetic": synthetic_tables, "demon": demon_tables, "mme": mme_tables}
