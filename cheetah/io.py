"""Small I/O helpers shared by every stage: atomic writes, safe paths, JSON/JSONL with clear errors.

Every artifact is written to a temporary sibling and renamed into place, so a killed stage never leaves a
half-written file (or folder) that looks complete, and a failed run never replaces a good output.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cheetah.errors import CheetahError

log = logging.getLogger(__name__)


class DataError(CheetahError, ValueError):
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


def nonfinite_paths(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in nonfinite_paths(v, f"{prefix}{k}.")]
    if isinstance(tree, (list, tuple)):
        return [p for i, v in enumerate(tree) for p in nonfinite_paths(v, f"{prefix}{i}.")]
    if isinstance(tree, float) and not math.isfinite(tree):
        return [f"{prefix[:-1]} = {tree}"]
    return []


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> Path:
    """A metrics file (what DVC, the report and the registry read): refused, naming the key, if a number in it is
    NaN or infinite, so a failed run never leaves results that look like measurements."""
    bad = nonfinite_paths(metrics)
    if bad:
        raise DataError(f"{path}: refusing to write non-finite metrics: {', '.join(bad[:10])}")
    return atomic_write_json(path, metrics)


def atomic_write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=False) for r in records]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------------------------------------------
# Output folders: a stage replaces only what it wrote itself
# ---------------------------------------------------------------------------------------------------------------

MANIFEST = ".cheetah-output.json"
"""Written into every output folder a stage builds: which kind of output it is and every file it holds (relative
path -> size). Deterministic (no time, no host), so DVC hashes of regenerated outputs do not change."""

_overwrite: contextvars.ContextVar[bool] = contextvars.ContextVar("cheetah_overwrite", default=False)


@contextlib.contextmanager
def allow_overwrite(enabled: bool = True) -> Iterator[None]:
    """Let output folders replace what they did not write (the CLI's `--overwrite`). The replaced files are
    listed in the new folder's manifest (`overwrote`) and logged."""
    token = _overwrite.set(enabled)
    try:
        yield
    finally:
        _overwrite.reset(token)


def _project_roots() -> list[Path]:
    """Folders no output may be or contain: the working directory and the checkout holding this package."""
    roots = [Path.cwd().resolve()]
    package_root = Path(__file__).resolve().parents[1]
    if (package_root / "pyproject.toml").is_file():
        roots.append(package_root)
    return roots


def _foreign_files(path: Path, kind: str) -> list[str]:
    """Files in the existing folder `path` that an earlier `kind` output did not write (empty: safe to replace)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        owned = (manifest["files"] if manifest.get("kind") == kind else None) or {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        owned = {}
    if not isinstance(owned, dict):
        owned = {}
    foreign = []
    for f in sorted(p for p in path.rglob("*") if not p.is_dir() or p.is_symlink()):
        rel = f.relative_to(path).as_posix()
        if rel == MANIFEST and owned:
            continue
        if rel not in owned or f.is_symlink() or f.stat().st_size != owned[rel]:
            foreign.append(rel)
    return foreign


def _check_location(path: Path, protect: Iterable[str | Path]) -> None:
    if path.is_symlink():
        raise DataError(f"{path}: output folder is a symbolic link; give the real folder")
    full = path.resolve()
    for root in _project_roots():
        if full == root or full in root.parents:
            what = "the working directory" if root == Path.cwd().resolve() else "the project"
            raise DataError(f"{path}: refusing to use {full} as an output folder: it is (or contains) {what} {root}")
    for p in protect:
        inner = Path(p).resolve()
        if inner == full or full in inner.parents:
            raise DataError(f"{path}: refusing to use this output folder: it contains {p}, which this stage reads "
                            "or keeps its state in; choose another output folder")
    if path.exists() and not path.is_dir():
        raise DataError(f"{path}: exists and is not a folder; refusing to replace it")


def _refuse_foreign(path: Path, kind: str, foreign: list[str]) -> None:
    if foreign and not _overwrite.get():
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise DataError(f"{path}: refusing to replace this folder: it holds files that no earlier {kind} output "
                        f"wrote ({shown}); choose another folder, or pass --overwrite to replace them")


def check_output(path: str | Path, kind: str, *, protect: Iterable[str | Path] = ()) -> list[str]:
    """Refuse (DataError) to build the `kind` output folder `path` where that would destroy something it did not
    write. `path` may be missing, an empty folder, or an earlier `kind` output with nothing added or changed;
    it may never be a file, a symbolic link, the working directory or a folder that contains it or the project,
    or a folder containing one of `protect` (the stage's own inputs and state). Under `allow_overwrite()`, a
    folder holding other files is allowed: returns the files that will be replaced."""
    path = Path(path)
    _check_location(path, protect)
    if not path.exists():
        return []
    foreign = _foreign_files(path, kind)
    _refuse_foreign(path, kind, foreign)
    return foreign


def _manifest(tmp: Path, kind: str, overwrote: list[str]) -> dict[str, Any]:
    files = {p.relative_to(tmp).as_posix(): p.stat().st_size
             for p in sorted(tmp.rglob("*")) if p.is_file() and p != tmp / MANIFEST}
    manifest: dict[str, Any] = {"written_by": "cheetah", "kind": kind, "files": files}
    if overwrote:
        manifest["overwrote"] = overwrote
    return manifest


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, kind: str, protect: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Build the `kind` output folder `path` in a temporary sibling; on success it replaces `path` in one rename.

    `check_output` runs before anything is written and again before the rename, so a folder holding anything
    the stage did not write (or its inputs, or the project) is never replaced. If the body raises, the
    temporary folder is removed and whatever was at `path` is left untouched. The folder gets a manifest
    (`MANIFEST`) listing its files, which is what lets the next run replace it.
    """
    path = Path(path)
    protect = list(protect)
    check_output(path, kind, protect=protect)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        overwrote = check_output(path, kind, protect=protect)
        if overwrote:
            log.warning("%s: --overwrite replaces %d file(s) no earlier %s output wrote: %s", path, len(overwrote),
                        kind, ", ".join(overwrote[:20]))
        (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp, kind, overwrote), indent=1, sort_keys=True) + "\n",
                                    encoding="utf-8")
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


def _manifest_kind(path: Path) -> str | None:
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def claim_dir(path: str | Path, kind: str, *, protect: Iterable[str | Path] = (), create: bool = True) -> Path:
    """Make `path` a folder that a stage fills in place (resumable state, incremental reports): created with a
    manifest when missing or empty; accepted when an earlier `kind` claimed it; otherwise refused like
    `check_output` (a folder of someone else's files is never written into, nor cleaned up). `create=False` only
    checks (every rank of a distributed stage checks; one creates)."""
    path = Path(path)
    _check_location(path, protect)
    if _manifest_kind(path) == kind:
        return path
    if path.exists():
        _refuse_foreign(path, kind, sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                                           if not p.is_dir()))
    if not create:
        return path
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / MANIFEST, {"written_by": "cheetah", "kind": kind, "files": None})
    return path


def remove_output(path: str | Path, kind: str) -> None:
    """Delete a folder only if it is a `kind` folder: an output that nothing was added to (e.g. a stale failure
    report), or a folder claimed by `claim_dir` (a finished stage's work area)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir() or _manifest_kind(path) != kind:
        return
    try:
        claimed = json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("files") is None
    except (OSError, ValueError, AttributeError):
        return
    if claimed or not _foreign_files(path, kind):
        shutil.rmtree(path)


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
    for lineno, start, raw in jsonl_lines(path):
        yield lineno, start, _parse_jsonl_line(Path(path), lineno, raw)


def jsonl_lines(path: str | Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, raw bytes without its newline) of every non-blank line of a JSON-lines file, read
    as it goes: the one place such a file is split into lines (each is parsed by `cheetah.formats.parse_line`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if raw.strip():
                yield lineno, start, raw.removesuffix(b"\n")


def read_jsonl_at(f: Any, path: str | Path, offset: int) -> dict[str, Any]:
    """The record of the line at byte `offset` of the open binary file `f` (of `path`, for messages)."""
    f.seek(offset)
    return _parse_jsonl_line(Path(path), None, f.readline())


def _parse_jsonl_line(path: Path, lineno: int | None, raw: bytes) -> dict[str, Any]:
    from cheetah.formats import parse_line, where  # (formats reads DataError from here)

    rec, problem = parse_line(raw)
    if problem is not None:
        raise DataError(f"{where(path, lineno, rec)}: {problem}")
    return rec


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
