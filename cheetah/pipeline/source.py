"""The source corpus, data/source: data, not a stage, versioned by data.dvc.

Before DVC runs, `ensure_source` brings it in line with data.dvc and params.yaml (from DVC's cache or remote; for
the embedded world, which is deterministic, by regenerating it; and when it changed, by recording it in data.dvc
with `dvc add`), so a fresh clone runs offline and a change of `world.*` reruns everything downstream through DVC's
own hash check.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cheetah.io import DataError
from cheetah.pipeline.dag import SOURCE, path_inside
from cheetah.pipeline.dvc import dvc_quiet, output_tail

DATA_DVC = "data.dvc"  # the DVC file that versions data/source


WORLD_MARKER = "world.json"  # written by cheetah.world.write_corpus: {"generator": "cheetah.world", n, seed, ...}
_WORLD_KEYS = ("n", "seed", "image_size")
DATA_DVC_HEADER = """\
# data/source, the source image-caption corpus, versioned with DVC: `dvc add data/source` updates this file (commit
# it, and `dvc push` the data). `cheetah pipeline run` (make run) and the Prefect flow first bring data/source in line
# with it (cheetah.pipeline.ensure_source): from DVC's cache or remote, or, for the embedded world, by regenerating
# it (same world.* params, same bytes, same hash). `meta.world`: the world.* params that generated the corpus whose
# md5 it names; none for your own corpus, which is never regenerated. See README.md, "A real image-caption corpus".
"""


def world_manifest(folder: str | Path) -> dict[str, Any] | None:
    """{n, seed, image_size} of an embedded-world corpus (its world.json), or None for any other folder."""
    try:
        manifest = json.loads((Path(folder) / WORLD_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("generator") != "cheetah.world":
        return None
    return {k: manifest.get(k) for k in _WORLD_KEYS}


def read_data_dvc(root: str | Path = ".") -> dict[str, Any]:
    """What data.dvc records: {"md5": DVC's hash of data/source or None, "world": the world.* params that generated
    that corpus or None (your own corpus, not recorded by ensure_source, or a `meta.world` for another md5)}."""
    import yaml

    path = Path(root) / DATA_DVC
    spec = (yaml.safe_load(path.read_text()) if path.is_file() else None) or {}
    md5 = next((o.get("md5") for o in spec.get("outs") or [] if isinstance(o, Mapping) and
                str(o.get("path", "")).rstrip("/") == SOURCE), None)
    world = (spec.get("meta") or {}).get("world") if isinstance(spec.get("meta"), Mapping) else None
    if not isinstance(world, Mapping) or md5 is None or world.get("md5") != md5:
        world = None
    return {"md5": md5, "world": {k: world.get(k) for k in _WORLD_KEYS} if world else None}


def _write_world_meta(root: Path, world: Mapping[str, Any] | None) -> None:
    """Set (or, for a corpus that is not the embedded world, remove) data.dvc's `meta.world`, keeping the rest of
    the file (DVC's own fields, comments) as it is; DVC keeps `meta` when it rewrites the file."""
    from ruamel.yaml import YAML

    path = root / DATA_DVC
    yaml = YAML()
    doc = yaml.load(path.read_text())
    md5 = read_data_dvc(root)["md5"]
    meta = doc.get("meta")
    wanted = {**{k: world[k] for k in _WORLD_KEYS}, "md5": md5} if world else None
    current = dict(meta["world"]) if isinstance(meta, Mapping) and isinstance(meta.get("world"), Mapping) else None
    if current == wanted:
        return
    if wanted is None:
        del meta["world"]
        if not meta:
            del doc["meta"]
    elif isinstance(meta, Mapping):
        meta["world"] = wanted
    else:
        doc.insert(0, "meta", {"world": wanted})
    with path.open("w") as f:
        yaml.dump(doc, f)


def _source_matches(root: Path) -> bool:
    """Whether data/source is exactly what data.dvc records (DVC's hash check, `dvc data status data.dvc`). A match
    DVC's cache lacks (a regenerated corpus in a fresh clone) is committed to the cache, so `dvc status` is clean
    and `dvc push` has it."""
    if not (root / DATA_DVC).is_file() or not (root / SOURCE).is_dir():
        return False
    done = dvc_quiet(root, "data", "status", "--json", SOURCE)  # (a .dvc file as target finds nothing)
    if done.returncode != 0:
        raise RuntimeError(f"`dvc data status {DATA_DVC}` failed:\n{output_tail(done)}")
    try:
        status = json.loads(done.stdout or "{}")
    except ValueError as e:
        raise RuntimeError(f"`dvc data status {DATA_DVC}`: unexpected output {done.stdout[:500]!r}") from e

    def listed(paths: Any) -> bool:
        return any(path_inside(str(p).rstrip("/"), SOURCE) for p in paths or [])

    if listed(p for paths in (status.get("uncommitted") or {}).values() for p in paths):
        return False  # data/source differs from data.dvc (modified, deleted, ...)
    if listed(status.get("not_in_cache")):
        done = dvc_quiet(root, "commit", "--quiet", DATA_DVC)
        if done.returncode != 0:
            raise RuntimeError(f"`dvc commit {DATA_DVC}` failed:\n{output_tail(done)}")
    return True


def _record_source(root: Path, world: Mapping[str, Any] | None) -> str:
    """`dvc add data/source` (into data.dvc, written first when there is none) and data.dvc's `meta.world`."""
    path = root / DATA_DVC
    if not path.is_file():
        path.write_text(DATA_DVC_HEADER + f"outs:\n- path: {SOURCE}\n")
    done = dvc_quiet(root, "add", SOURCE)
    if done.returncode != 0:
        raise RuntimeError(f"`dvc add {SOURCE}` failed:\n{output_tail(done)}")
    _write_world_meta(root, world)
    return str(read_data_dvc(root)["md5"])


def _describe(world: Mapping[str, Any]) -> str:
    return ", ".join(f"world.{k}={world[k]}" for k in _WORLD_KEYS)


def ensure_source(params: Any, root: str | Path = ".", echo: Callable[[str], None] = print) -> str:
    """Bring data/source in line with data.dvc and params.yaml, before `dvc repro`; returns what it did:

    - "up to date": data/source is what data.dvc records (and, for the embedded world, what `world.*` asks for);
    - "restored": `dvc checkout` / `dvc pull data.dvc` brought it from DVC's cache or the default remote (never over
      a corpus DVC has not cached: DVC refuses to delete that, and it is recorded instead);
    - "regenerated": the embedded world, written again by `cheetah.world.write_corpus(params.world)`, is
      byte-identical to what data.dvc records (a fresh clone without remote data);
    - "recorded": data/source differs from data.dvc — the embedded world of other `world.*` params (or of changed
      world code), or a corpus someone put there — so `dvc add data/source` records it in data.dvc (commit it);
      every stage reading data/source then reruns through DVC's hash check.

    A corpus that is not the embedded world (no world.json, or `world.out` is not data/source) is never
    regenerated: when it is missing and DVC cannot restore it, this raises DataError saying what to do. DVC failures
    (a lock held by another process, ...) raise RuntimeError.
    """
    import dataclasses

    root = Path(root).resolve()
    source = root / SOURCE
    feeds = (root / params.world.out).resolve() == source  # does `cheetah world` write data/source?
    wanted = {k: getattr(params.world, k) for k in _WORLD_KEYS} if feeds else None
    has_record = (root / DATA_DVC).is_file()

    def agrees() -> bool:  # not the embedded world, or the one params.yaml asks for
        present = world_manifest(source)
        return wanted is None or present is None or present == wanted

    if has_record:
        matches = _source_matches(root)
        if not matches:
            for args in (("checkout", DATA_DVC), ("pull", DATA_DVC)):
                dvc_quiet(root, *args)  # failures are expected here: no cache, no remote, unsaved data
                if _source_matches(root):
                    matches = True
                    break
            if matches and agrees():
                echo(f"{SOURCE}: restored from DVC's cache or remote, as {DATA_DVC} records it")
                _write_world_meta(root, world_manifest(source))
                return "restored"
        elif agrees():
            _write_world_meta(root, world_manifest(source))  # a no-op unless `dvc add` was run by hand
            echo(f"{SOURCE}: up to date with {DATA_DVC}")
            return "up to date"

    present = world_manifest(source) if source.is_dir() else None
    if source.is_dir() and (present is None or wanted is None or present == wanted):
        # A corpus put there by hand (yours, or `cheetah world`) that DVC has not cached: record it.
        _record_source(root, present)
        what = f"the embedded world, {_describe(present)}" if present else "not the embedded world"
        echo(f"{SOURCE}: recorded in {DATA_DVC} ({what}): commit {DATA_DVC}, and `dvc push` the data")
        return "recorded"
    if wanted is None:
        raise DataError(f"{SOURCE} is missing and DVC could not restore it from its cache or the default remote "
                        f"(`dvc pull {DATA_DVC}`); world.out is {params.world.out!r}, so it is not the embedded world "
                        f"and is not regenerated. Configure the remote that holds it (`dvc remote add -d ...`), or put "
                        f"the corpus in {SOURCE} and run `dvc add {SOURCE}`.")

    # The embedded world: missing, or generated with other world.* params than params.yaml's. Write it again.
    from cheetah.world import write_corpus

    recorded = read_data_dvc(root)
    existed = source.is_dir()
    write_corpus(dataclasses.replace(params.world, out=str(source)))
    if has_record and _source_matches(root):
        echo(f"{SOURCE}: regenerated the embedded world ({_describe(wanted)}), identical to what {DATA_DVC} records")
        _write_world_meta(root, wanted)
        return "regenerated"
    if recorded["md5"] and recorded["world"] is None and not existed:
        shutil.rmtree(source, ignore_errors=True)
        raise DataError(f"{SOURCE} is missing: {DATA_DVC} records a corpus (md5 {recorded['md5']}) that DVC finds "
                        f"neither in its cache nor on the default remote (`dvc pull {DATA_DVC}`), and that is not the "
                        f"embedded world of params.yaml ({_describe(wanted)} generates another one), so it is your "
                        f"own corpus. Configure the remote that holds it (`dvc remote add -d ...`, then "
                        f"`dvc pull {DATA_DVC}`), or, to replace it, put a corpus in {SOURCE} (or run `cheetah world`) "
                        f"and `dvc add {SOURCE}`.")
    _record_source(root, wanted)
    if not recorded["md5"]:
        why = f"{DATA_DVC} recorded none"
    elif recorded["world"] and recorded["world"] != wanted:
        why = f"{DATA_DVC} recorded the world of {_describe(recorded['world'])}"
    elif recorded["world"]:
        why = f"cheetah/world now generates another corpus than the one {DATA_DVC} recorded"
    else:
        why = f"{DATA_DVC} recorded another corpus"
    echo(f"{SOURCE}: regenerated the embedded world ({_describe(wanted)}); {why}, so {DATA_DVC} now records this "
         f"one: commit {DATA_DVC}, and `dvc push` the data. Every stage that reads it runs again.")
    return "recorded"
