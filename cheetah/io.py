"""Small I/O helpers shared by every stage: atomic writes, safe paths, JSON/JSONL with clear errors.

Every artifact is written to a temporary sibling and renamed into place, so a killed stage never leaves a
half-written file (or folder) that looks complete, and a failed run never replaces a good output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad input data. The message names the file, and where it applies the record and the field."""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=False) for r in records]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling; on success it replaces `path` in one rename.

    If the body raises, the temporary directory is removed and whatever was at `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


def safe_join(root: str | Path, relative: str, *, what: str = "path") -> Path:
    """`root / relative`, refusing absolute paths and paths that escape `root` (`../`, symlinks)."""
    if not isinstance(relative, str) or relative == "":
        raise DataError(f"{what}: expected a non-empty relative path, got {relative!r}")
    rel = Path(relative)
    if rel.is_absolute():
        raise DataError(f"{what}: {relative!r} is absolute; paths must be relative to {root}")
    root_resolved = Path(root).resolve()
    full = (root_resolved / rel).resolve()
    if full != root_resolved and root_resolved not in full.parents:
        raise DataError(f"{what}: {relative!r} escapes its root folder {root}")
    return full


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, record). A malformed line or a non-object record raises DataError naming the line."""
    for lineno, _, rec in iter_jsonl_offsets(path):
        yield lineno, rec


def iter_jsonl_offsets(path: str | Path) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Yield (line_number, byte offset of the line, record), so a record can be read again later with
    `read_jsonl_at` without keeping it in memory. Errors as `iter_jsonl`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            yield lineno, start, _parse_jsonl_line(path, lineno, raw)


def read_jsonl_at(f: Any, path: str | Path, offset: int) -> dict[str, Any]:
    """The record of the line at byte `offset` of the open binary file `f` (of `path`, for messages)."""
    f.seek(offset)
    return _parse_jsonl_line(Path(path), None, f.readline())


def _parse_jsonl_line(path: Path, lineno: int | None, raw: bytes) -> dict[str, Any]:
    where = f"{path}:{lineno}" if lineno is not None else str(path)
    try:
        rec = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON: {e.msg}") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return rec


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [rec for _, rec in iter_jsonl(path)]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
