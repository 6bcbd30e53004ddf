"""The on-disk formats the stages exchange: canonical file names, the image placeholder, and one checker per kind of
record. No heavy imports: the validation suites, the world generator and every loader take them from here, so what
validation accepts is exactly what the stages load (and the loaders refuse what it refuses, with the same message).

Formats (each record one JSON object per line, UTF-8):
    source corpus    captions.jsonl   {"id", "image", "caption"}      `image` relative to the folder   source_problem
                     scenes.jsonl     {"id", "scene"}                 the embedded world's scene graphs (read_scenes)
    synthetic set    synthetic.jsonl  {"id", "images": [original, edited], "instruction", "response", "edit", ...}
                     captions.jsonl   {"id", "images": [original], "instruction", "response"}    instruction_problem
    DEMON            <root>/<Dataset>/core/core.json  {"metadata": {...}, "data": [...]}
                     (a sample is parsed by cheetah.evaluate.demon.build_sample; the suite asks it about every one)
    MME              <root>/<subtask>/<id>.txt: two lines "question<TAB>Yes|No"
                     (parsed by cheetah.evaluate.mme.read_question_file, which the suite calls too)

A checker returns None for a good record, or one message that starts with the field at fault; `read_records`
raises it as a `DataError` naming the file, the line and the record's id (exit 2 in the CLI).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cheetah.io import DataError, jsonl_lines

IMAGE_TOKEN = "<image>"
"""The image placeholder: where an instruction's images go, one per image (in `synthetic.jsonl`, in the world's
DEMON-format instructions, in prompts). No other field may hold it, and it is a special token of every tokenizer."""

SOURCE_CAPTIONS = "captions.jsonl"
"""A source corpus' records (the corpus is a folder: this file and the images it names)."""
SOURCE_SCENES = "scenes.jsonl"
"""The embedded world's scene graph of every source record (needed by `masks: world` and the base stage)."""
SYNTHETIC_PAIRS = "synthetic.jsonl"
"""The synthetic set's discriminative examples: two images, an instruction, the difference as the response."""
SYNTHETIC_CAPTIONS = "captions.jsonl"
"""The synthetic set's caption samples (one image each): the joint caption regulariser."""
DEMON_SPLIT_FILE = "core/core.json"
"""A DEMON task's file under `<root>/<Dataset>/` (`full/full.json` for DEMON-Full)."""

DATASETS = ("source", "synthetic", "demon", "mme")
"""The kinds of data folder above, one validation suite each (`cheetah validate <kind> PATH`)."""

Record = dict[str, Any]
Check = Callable[[Record], "str | None"]


# ---------------------------------------------------------------------------------------------------------------
# Reading JSON lines
# ---------------------------------------------------------------------------------------------------------------


def parse_line(raw: bytes) -> tuple[Any, str | None]:
    """(record, problem) of one line. Strict UTF-8: a line that is not is a problem naming the field that holds the
    bad byte (the record is still returned, decoded with replacement characters, so its id can be named)."""
    try:
        text, problem = raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        text = raw.decode("utf-8", errors="replace")
        problem = f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        return text, problem or f"malformed JSON: {e.msg} (column {e.colno})"
    if not isinstance(rec, dict):
        return rec, problem or f"expected a JSON object, got {type(rec).__name__}"
    if problem is not None:
        fields = [k for k, v in rec.items() if "\ufffd" in json.dumps(v, ensure_ascii=False)]
        problem = f"field {fields[0]}: {problem}" if fields else problem
    return rec, problem


def read_lines(path: str | Path) -> list[tuple[int, Any, str | None]]:
    """(line number, record, problem or None) for every non-blank line of a JSON-lines file: nothing is skipped."""
    return [(lineno, *parse_line(raw)) for lineno, _, raw in jsonl_lines(path)]


def where(path: str | Path, lineno: int | None, rec: Any) -> str:
    """`file:line (id '…')`: how every message names a record."""
    rid = rec.get("id") if isinstance(rec, dict) else None
    return f"{path}{f':{lineno}' if lineno is not None else ''}" + (f" (id {rid!r})" if rid is not None else "")


def read_records(path: str | Path, check: Check) -> list[tuple[int, Record]]:
    """(line number, record) of a JSON-lines file whose every record passes `check`; the first one that does not
    (or a line that is not a UTF-8 JSON object) raises DataError naming the file, line, id and field."""
    out = []
    for lineno, rec in iter_jsonl(path):
        problem = check(rec)
        if problem:
            raise DataError(f"{where(path, lineno, rec)}: {problem}")
        out.append((lineno, rec))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Record checks
# ---------------------------------------------------------------------------------------------------------------


def text_problem(value: Any, field: str) -> str | None:
    """User text (a caption, a response) must not hold the image placeholder: every loader would take it for an
    image slot, and the count of image tokens would no longer match the images."""
    if isinstance(value, str) and IMAGE_TOKEN in value:
        return f"{field} contains the image placeholder {IMAGE_TOKEN} (only instructions may hold it)"
    return None


def _string_problem(rec: Record, fields: tuple[str, ...]) -> str | None:
    for field in fields:
        if not isinstance(rec.get(field), str) or not rec[field].strip():
            return f"field {field} must be a non-empty string, got {rec.get(field)!r}"
    return None


def source_problem(rec: Record) -> str | None:
    """A record of a source corpus' `captions.jsonl`."""
    return _string_problem(rec, ("id", "image", "caption")) or text_problem(rec["caption"], "caption")


def image_list_problem(images: Any, expected: int | None, what: str = "") -> str | None:
    """`images`: `expected` (any number when None) non-empty path strings."""
    if not isinstance(images, list):
        return f"field images must be a list, got {images!r}"
    if expected is not None and len(images) != expected:
        return f"images lists {len(images)} path(s); expected {expected} ({what})"
    bad = [k for k, p in enumerate(images) if not isinstance(p, str) or not p]
    if bad:
        return f"images[{bad[0]}] is not a non-empty path string"
    return None


def placeholder_problem(instruction: Any, images: Any) -> str | None:
    """One `<image>` placeholder per image, or the model would silently drop or misplace images (a literal
    `<image>` in the user's text is one too many)."""
    if not isinstance(instruction, str) or not isinstance(images, list):
        return None
    n = instruction.count(IMAGE_TOKEN)
    if n != len(images):
        return f"instruction has {n} {IMAGE_TOKEN} placeholder(s) for {len(images)} image(s)"
    return None


def instruction_problem(rec: Record, n_images: int | None = None, what: str = "") -> str | None:
    """An instruction example of the synthetic set (`synthetic.jsonl`: 2 images; `captions.jsonl`: 1)."""
    return (_string_problem(rec, ("id", "instruction", "response"))
            or image_list_problem(rec.get("images"), n_images, what)
            or placeholder_problem(rec["instruction"], rec["images"])
            or text_problem(rec["response"], "response"))


def demon_document_problem(doc: Any) -> str | None:
    """A DEMON task file as a whole (its samples: `cheetah.evaluate.demon.build_sample`)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("metadata"), dict) or not isinstance(doc.get("data"), list):
        return 'top level must be {"metadata": {...}, "data": [...]}'
    instructions = doc["metadata"].get("task_instruction")
    if not (isinstance(instructions, list) and instructions
            and all(isinstance(t, str) and t.strip() for t in instructions)):
        return "metadata.task_instruction must be a non-empty list of non-empty strings"
    return None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, record). A malformed line or a non-object record raises DataError naming the line."""
    for lineno, _, rec in iter_jsonl_offsets(path):
        yield lineno, rec


def iter_jsonl_offsets(path: str | Path) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Yield (line_number, byte offset of the line, record), so a record can be read again later with
    `read_jsonl_at` without keeping it in memory. Errors as `iter_jsonl`."""
    for lineno, start, raw in jsonl_lines(path):
        yield lineno, start, _parse_jsonl_line(Path(path), lineno, raw)


def read_jsonl_at(f: Any, path: str | Path, offset: int) -> dict[str, Any]:
    """The record of the line at byte `offset` of the open binary file `f` (of `path`, for messages)."""
    f.seek(offset)
    return _parse_jsonl_line(Path(path), None, f.readline())


def _parse_jsonl_line(path: Path, lineno: int | None, raw: bytes) -> dict[str, Any]:
    rec, problem = parse_line(raw)
    if problem is not None:
        raise DataError(f"{where(path, lineno, rec)}: {problem}")
    return rec
