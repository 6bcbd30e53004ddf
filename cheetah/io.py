"""Small I/O helpers shared by every stage: atomic writes, safe paths, JSON/JSONL with clear errors.

Every artifact is written to a temporary sibling and renamed into place, so a killed stage never leaves a
half-written file (or folder) that looks complete, and a failed run never replaces a good output. On top of that:

- output folders replace only what a stage wrote itself (`MANIFEST`, `check_output`, `atomic_dir`, `claim_dir`), and
  never with weights that hold a NaN or infinite value (`check_finite_weights`);
- single-file outputs likewise (a mark beside each file, `write_output_file`);
- one writer at a time: a second run on an output or state folder is refused by name (`lock_output`).
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
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


def check_parent_folders(path: str | Path) -> None:
    """Refuse (DataError) an output path below a regular file (`--out notes.txt/sub`): mkdir would fail with a bare
    FileExistsError or NotADirectoryError that names neither the output nor the file in its way."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists():  # the nearest existing ancestor: what the missing folders would be made in
            if not parent.is_dir():
                raise DataError(f"{path}: cannot be written: {parent} is a file, not a folder")
            return


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    check_parent_folders(path)
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
    NaN or infinite, so a failed run never leaves results that look like measurements; and, like every single-file
    output, never written over a file the project did not write (`write_output_file`)."""
    bad = nonfinite_paths(metrics)
    if bad:
        raise DataError(f"{path}: refusing to write non-finite metrics: {', '.join(bad[:10])}")
    text = json.dumps(metrics, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    return write_output_file(path, text.encode("utf-8"), METRICS_KIND)


# ---------------------------------------------------------------------------------------------------------------
# Single-file outputs: a stage replaces only a file it wrote itself
# ---------------------------------------------------------------------------------------------------------------

METRICS_KIND = "metrics"
FILE_MARK_SUFFIX = ".cheetah-output.json"
"""`<folder>/.<file name>.cheetah-output.json`: written beside every single-file output (metrics, `score --out`, the
learning curve): which kind of output it is and the SHA-256 of what was written. It is what lets the next run
replace the file (the folder outputs' `MANIFEST`, for one file). Ignored by git."""


def _file_mark(path: Path) -> Path:
    return path.with_name(f".{path.name}{FILE_MARK_SUFFIX}")


def _committed(path: Path) -> bool:
    """Whether git holds exactly this file's content (tracked and unchanged): replacing it loses nothing that
    `git checkout` cannot bring back (e.g. metrics/*.json in a fresh clone, written by the project elsewhere)."""
    import subprocess

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args, "--", path.name], cwd=path.parent, capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    staged = (git("ls-files", "--stage") or "").split()
    return len(staged) >= 2 and staged[1] == git("hash-object")


def check_output_file(path: str | Path, kind: str) -> None:
    """Refuse (DataError) to write the `kind` output file `path` over something the project did not write. `path` may
    be missing, an earlier `kind` output unchanged since (its mark says so), or a file git holds as it is; never a
    folder or a symbolic link. Under `allow_overwrite()` (`--overwrite`) any regular file is replaced (logged)."""
    path = Path(path)
    check_parent_folders(path)
    if path.is_symlink():
        raise DataError(f"{path}: is a symbolic link; refusing to write a {kind} output through it")
    if path.exists() and not path.is_file():
        raise DataError(f"{path}: exists and is not a regular file; refusing to replace it with a {kind} output")
    if not path.exists():
        return
    try:
        mark = json.loads(_file_mark(path).read_text(encoding="utf-8"))
        if mark.get("kind") == kind and mark.get("sha256") == sha256_file(path):
            return
    except (OSError, ValueError, AttributeError):
        pass
    if _committed(path):
        return
    if _overwrite.get():
        log.warning("%s: --overwrite replaces a file no earlier %s output wrote", path, kind)
        return
    raise DataError(f"{path}: refusing to replace this file: no earlier {kind} output wrote it (or it was changed "
                    "since); choose another file, or pass --overwrite to replace it")


def write_output_file(path: str | Path, data: bytes, kind: str) -> Path:
    """Write the `kind` output file `path` atomically after `check_output_file`, and mark it as written (the mark
    beside it) so that the next run may replace it."""
    path = Path(path)
    check_output_file(path, kind)
    atomic_write_bytes(path, data)
    atomic_write_json(_file_mark(path), {"written_by": "cheetah", "kind": kind, "sha256": sha256_bytes(data)})
    return path


def nonfinite_tensors(path: str | Path) -> tuple[list[str], int]:
    """(names of the tensors holding NaN or infinite values, number of tensors) of a safetensors file, read one
    tensor at a time. A file that is not readable safetensors (truncated, another format) is a DataError."""
    import torch
    from safetensors import SafetensorError, safe_open

    bad, total = [], 0
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                total += 1
                tensor = f.get_tensor(name)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    bad.append(name)
    except (SafetensorError, OSError) as e:
        raise DataError(f"{path}: not a readable safetensors file ({e})") from None
    return bad, total


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
"""Weight files that are pickles: loading one can run any code written into it."""


def check_finite_weights(directory: str | Path, what: str = "weights") -> None:
    """Refuse (DataError naming the file and tensors) a folder whose `*.safetensors` files hold a NaN or infinite
    value: a diverged or corrupted model is never evaluated, registered, served, nor written over a good one. A
    folder with pickled weights and no safetensors is refused too: the loaders would unpickle them (many Hugging
    Face snapshots hold both formats; the loaders then read the safetensors)."""
    tensors = sorted(Path(directory).rglob("*.safetensors"))
    pickled = sorted(p for pattern in PICKLED_WEIGHTS for p in Path(directory).rglob(pattern))
    if pickled and not tensors:
        raise DataError(f"{pickled[0]}: pickled {what} are never loaded (unpickling can run code); convert them to "
                        "safetensors (e.g. save_pretrained(..., safe_serialization=True)) and remove the pickle")
    for path in tensors:
        bad, total = nonfinite_tensors(path)
        if bad:
            raise DataError(f"{path}: {len(bad)} of {total} tensors hold NaN or infinite values ({', '.join(bad[:3])}"
                            f"{', ...' if len(bad) > 3 else ''}); non-finite {what} are never used")


def atomic_write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=False) for r in records]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------------------------------------------
# Output folders: a stage replaces only what it wrote itself
# ---------------------------------------------------------------------------------------------------------------

MANIFEST = ".cheetah-output.json"
"""Written into every output folder a stage builds: which kind of output it is and every file it holds (relative
path -> {"bytes", "sha256"}), so any edit of a file, even one that keeps its size, marks it as not the stage's.
Deterministic (no time, no host), so DVC hashes of regenerated outputs do not change. (Manifests written before
content hashes hold the size alone, and are compared on it.)"""

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


def _file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _unchanged(path: Path, recorded: Any) -> bool:
    """Whether the file `path` is what the manifest entry `recorded` says (size first: no hashing of a file whose
    size already differs)."""
    size = path.stat().st_size
    if isinstance(recorded, int) and not isinstance(recorded, bool):  # a manifest from before content hashes
        return size == recorded
    if not isinstance(recorded, dict) or recorded.get("bytes") != size:
        return False
    return sha256_file(path) == recorded.get("sha256")


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
        if rel not in owned or f.is_symlink() or not _unchanged(f, owned[rel]):
            foreign.append(rel)
    return foreign


def _check_location(path: Path, protect: Iterable[str | Path]) -> None:
    check_parent_folders(path)
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
    files = {p.relative_to(tmp).as_posix(): _file_record(p)
             for p in sorted(tmp.rglob("*")) if p.is_file() and p != tmp / MANIFEST}
    manifest: dict[str, Any] = {"written_by": "cheetah", "kind": kind, "files": files}
    if overwrote:
        manifest["overwrote"] = overwrote
    return manifest


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, kind: str, protect: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Build the `kind` output folder `path` in a temporary sibling; on success it replaces `path` in one rename.

    `check_output` runs before anything is written and again before the rename, so a folder holding anything
    the stage did not write (or its inputs, or the project) is never replaced; nor is any folder replaced by one
    whose safetensors weights hold a NaN or infinite value (`check_finite_weights`). If the body raises, the
    temporary folder is removed and whatever was at `path` is left untouched. The folder gets a manifest
    (`MANIFEST`) listing its files, which is what lets the next run replace it. The folder is locked from the
    first check to the rename (`lock_output`): a concurrent run writing it is refused by name.
    """
    path = Path(path)
    protect = list(protect)
    _check_location(path, protect)
    with lock_scope():
        lock_output(path)
        check_output(path, kind, protect=protect)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            yield tmp
            # Good over good only: weights that diverged never replace the previous output (e.g. a base stage whose
            # learning rate blew up, over the backbone that every later stage reads).
            check_finite_weights(tmp, f"{kind} weights (the previous {path} is left as it was)")
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


# ---------------------------------------------------------------------------------------------------------------
# One writer at a time: an advisory lock per output or state folder
# ---------------------------------------------------------------------------------------------------------------

LOCK_SUFFIX = ".cheetah-lock"
"""`<parent>/.<folder name>.cheetah-lock`: the lock file of an output or state folder, beside it (the folder itself is
replaced by a rename). Removed when the lock is released; one left by a killed run holds no lock (the kernel drops a
flock with its process) and is reused."""

_held: dict[str, tuple[int, Path]] = {}  # lock file (absolute) -> (open descriptor, folder): what this process holds
_held_guard = threading.Lock()


def _lock_file(path: Path) -> Path:
    return path.parent.resolve() / f".{path.name}{LOCK_SUFFIX}"


def lock_output(path: str | Path) -> None:
    """Hold the lock of the output or state folder `path` until `release_locks` (at the end of the `lock_scope` it
    was taken in: the CLI command, the stage) or the end of the process. Another process holding it is refused:
    DataError naming the folder and the holder. Taken by `claim_dir` (create=True) and `atomic_dir`; taking it
    again in the same process does nothing. An `fcntl.flock` on a file beside the folder: advisory (it stops
    cheetah runs, not other programs), released by the kernel when a run dies, so a killed run never blocks the
    next. A file system without locks (rare network mounts) is warned about, not refused."""
    path = Path(path)
    lock = _lock_file(path)
    with _held_guard:
        if str(lock) in _held:
            return
        lock.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise DataError(f"{path}: another cheetah run ({holder}) is writing this folder; wait for it to end, "
                                "or choose another folder") from None
            except OSError as e:
                os.close(fd)
                log.warning("%s: cannot lock this folder (%s); not protected against a concurrent run", path, e)
                return
            try:  # the file we locked may have been removed by its previous holder in between: lock the new one
                current = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        _held[str(lock)] = (fd, path)


def release_locks(locks: Iterable[str] | None = None) -> None:
    """Release the folder locks this process holds (all, or the given lock files), removing their files."""
    with _held_guard:
        for key in list(_held if locks is None else locks):
            fd, _ = _held.pop(key, (None, None))
            if fd is None:
                continue
            with contextlib.suppress(OSError):
                os.unlink(key)  # before the unlock: whoever opened this file meanwhile sees it gone and retries
            os.close(fd)


@contextlib.contextmanager
def lock_scope() -> Iterator[None]:
    """Folder locks taken inside the block (`lock_output`, `claim_dir`, `atomic_dir`) are released when it ends;
    those held before are kept. The CLI runs every command in one, and so does each stage's entry point."""
    with _held_guard:
        before = set(_held)
    try:
        yield
    finally:
        with _held_guard:
            taken = [k for k in _held if k not in before]
        release_locks(taken)


def _manifest_kind(path: Path) -> str | None:
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def claim_dir(path: str | Path, kind: str, *, protect: Iterable[str | Path] = (), create: bool = True) -> Path:
    """Make `path` a folder that a stage fills in place (resumable state, incremental reports): created with a
    manifest when missing or empty; accepted when an earlier `kind` claimed it; otherwise refused like
    `check_output` (a folder of someone else's files is never written into, nor cleaned up). `create=False` only
    checks (every rank of a distributed stage checks; one creates). With `create`, the folder is locked for this
    process (`lock_output`: a second run on it is refused by name) until the end of the `lock_scope`."""
    path = Path(path)
    _check_location(path, protect)
    if create:  # one writer at a time (every rank of a distributed stage checks; the one that creates locks)
        lock_output(path)
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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
