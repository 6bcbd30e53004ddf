"""Running the DVC pipeline under one parent MLflow run (`cheetah pipeline run`, `make run`, the Prefect flow).

`dvc.yaml` is the one definition of the DAG: its stages, their order and what each depends on. This module reads
it (`stage_order`), runs it (`dvc repro`, whole or one stage at a time), and wraps a pipeline run in a parent
MLflow run: the run's id travels to every stage process in `CHEETAH_PARENT_RUN_ID`, so each stage's own
`cheetah.tracking.stage_run` becomes a child of it. At the end the parent run gets the pipeline's record:
`dvc.lock`, `params.yaml`, the evaluation report and metrics, the GX data docs and the registration receipt.

The source corpus, `data/source`, is data, not a stage: `data.dvc` versions it. Before DVC runs, `ensure_source`
brings it in line with data.dvc and params.yaml (from DVC's cache or remote; for the embedded world, which is
deterministic, by regenerating it; and when it changed, by recording it in data.dvc with `dvc add`), so a fresh
clone runs offline and a change of `world.*` reruns everything downstream through DVC's own hash check.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cheetah.io import DataError
from cheetah.tracking import PARENT_ENV

DVC_YAML = "dvc.yaml"
SOURCE = "data/source"  # the source image-caption corpus ...
DATA_DVC = "data.dvc"  # ... and the DVC file that versions it
RECEIPT = "metrics/register.json"


def record_paths(params: Any) -> tuple[list[str], dict[str, str]]:
    """What the parent run keeps, where `params` puts it: files, and folders with their artifact names (paths
    relative to the repository root; missing ones are skipped)."""
    files = ["dvc.lock", "dvc.yaml", "params.yaml", params.base.metrics, params.train.metrics,
             params.evaluate.metrics, RECEIPT, params.train.curve, params.train.curve_image]
    return files, {params.evaluate.out: "eval", params.validate.docs_dir: "data_docs"}


# ---------------------------------------------------------------------------------------------------------------
# The DAG, from dvc.yaml
# ---------------------------------------------------------------------------------------------------------------


def _inside(path: str, other: str) -> bool:
    return path == other or path.startswith(other + "/") or other.startswith(path + "/")


def read_stages(root: str | Path = ".") -> dict[str, dict[str, Any]]:
    """The stages of `root`/dvc.yaml as DVC resolves them — `${...}` filled in from params.yaml, foreach/matrix
    stages expanded — in the file's order: {name: {"cmd", "deps", "outs"}}, with the paths DVC tracks (relative to
    the repository; absolute outside it) and `outs` holding every output, metrics and plots included. Reading it
    through DVC, not as YAML, keeps the order and the paths right whatever the parameters file says."""
    from dvc.dependency.param import ParamsDependency
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    path = (Path(root) / DVC_YAML).resolve()
    if not path.is_file():
        raise DataError(f"{path}: not found (run from the repository root, or pass its path)")
    try:
        with Repo(str(path.parent), uninitialized=True) as repo:
            found = [s for s in repo.index.stages if isinstance(s, PipelineStage) and Path(s.path) == path]
    except DvcException as e:
        raise DataError(f"{path}: {e}") from None
    if not found:
        raise DataError(f"{path}: no `stages:`")
    stages: dict[str, dict[str, Any]] = {}
    for stage in found:
        cmd = stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd)
        stages[stage.name] = {"cmd": cmd,
                              "deps": [str(d.def_path).rstrip("/") for d in stage.deps
                                       if not isinstance(d, ParamsDependency)],
                              "outs": [str(o.def_path).rstrip("/") for o in stage.outs]}
    return stages


def _needs(stages: Mapping[str, Mapping[str, Any]]) -> dict[str, set[str]]:
    """{stage: the stages producing one of its dependencies}."""
    return {n: {m for m in stages if m != n for d in s["deps"] for o in stages[m]["outs"] if _inside(d, o)}
            for n, s in stages.items()}


def stage_order(root: str | Path = ".") -> list[str]:
    """The stages of dvc.yaml in an order that runs every stage after the stages it depends on: the order of the
    file, except that a stage is moved after any stage producing one of its dependencies."""
    stages = read_stages(root)
    needs = _needs(stages)
    order: list[str] = []
    pending = list(stages)
    while pending:
        ready = next((n for n in pending if needs[n] <= set(order)), None)
        if ready is None:
            raise DataError(f"{Path(root) / DVC_YAML}: the stages {pending} depend on each other in a cycle")
        order.append(ready)
        pending.remove(ready)
    return order


def reads_source(root: str | Path = ".", stages: Sequence[str] | None = None) -> bool:
    """Whether `dvc repro [stages]` (all by default; else these stages and the stages they need) reads data/source."""
    all_stages = read_stages(root)
    needs = _needs(all_stages)
    todo, seen = [s for s in (stages or all_stages) if s in all_stages], set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(needs[name])
    if stages and any(s not in all_stages for s in stages):
        return True  # not a stage of dvc.yaml (a path, a .dvc file): let DVC decide, with the corpus in place
    return any(_inside(d, SOURCE) for n in seen for d in all_stages[n]["deps"])


# ---------------------------------------------------------------------------------------------------------------
# The parameters: params.yaml, at any scale
# ---------------------------------------------------------------------------------------------------------------

PARAMS = "params.yaml"
DEFAULT_DEEPSPEED_CONFIG = "configs/deepspeed.json"  # {}: the generated DeepSpeed config unchanged
_PARAMS_HEADER = """\
# The pipeline's parameters, written by `cheetah pipeline use {source}` from that file, with every field spelled out
# (preset defaults applied): DVC tracks, and dvc.yaml templates, only what this file says. Edit it for runs
# (`dvc exp run -S section.key=value` sets one), or edit {source} and run the command again. Typed and documented in
# cheetah/config.py.
"""


def use_params(config: str | Path, root: str | Path = ".") -> str:
    """Make the parameters file `config` (e.g. configs/vicuna-7b.yaml) the pipeline's params.yaml, every field written
    out; refuses a file whose stages would not chain (the backbone the base stage writes must be the one the others
    read, the data synthesis writes the data training reads). Returns what it did."""
    import json

    import yaml

    from cheetah.config import ConfigError, load_params, to_dict
    from cheetah.io import atomic_write_text

    params = load_params(config)
    chain = [("model.backbone_dir", params.model.backbone_dir, "base.out", params.base.out),
             ("train.data", params.train.data, "synthesize.out", params.synthesize.out)]
    problems = [f"{a} is {va!r} but {b} is {vb!r}" for a, va, b, vb in chain if va != vb]
    if problems:
        raise ConfigError(f"{config}: the pipeline's stages would not chain: {'; '.join(problems)} (make them equal)")
    if params.train.deepspeed_config is None:  # a dependency of the train stage: it must name a file
        params.train.deepspeed_config = DEFAULT_DEEPSPEED_CONFIG
    tree = json.loads(json.dumps(to_dict(params)))  # plain lists and numbers for YAML
    text = _PARAMS_HEADER.format(source=config) + "\n" + yaml.safe_dump(tree, sort_keys=False, width=120)
    atomic_write_text(Path(root) / PARAMS, text)
    return (f"{Path(root) / PARAMS}: written from {config} (preset {params.model.preset}); `dvc status` shows what "
            "reruns, `cheetah pipeline run` or `dvc repro` runs it")


# ---------------------------------------------------------------------------------------------------------------
# Running DVC
# ---------------------------------------------------------------------------------------------------------------


def stage_env(parent_run_id: str | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a stage process: this interpreter's bin directory first on PATH (so `cheetah` in
    dvc.yaml is this installation's) and the parent run id. (`cheetah.tracking.configure`, called by
    `parent_run`, has already put the absolute tracking URI into the environment.)"""
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    if parent_run_id:
        env[PARENT_ENV] = parent_run_id
    return env


def dvc(*args: str, root: str | Path = ".", env: Mapping[str, str] | None = None, capture: bool = False,
        check: bool = False) -> subprocess.CompletedProcess:
    """Run `dvc <args>` with this interpreter (no PATH lookup)."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=dict(env or stage_env()),
                          capture_output=capture, text=True, check=check)


def repro_command(stage: str | None = None, force: bool = False, dry: bool = False) -> list[str]:
    args = ["repro"]
    if stage:
        args += ["--single-item", stage]
    if force:
        args.append("--force")
    if dry:
        args.append("--dry")
    return args


# ---------------------------------------------------------------------------------------------------------------
# The source corpus: data/source, versioned by data.dvc
# ---------------------------------------------------------------------------------------------------------------

WORLD_MARKER = "world.json"  # written by cheetah.world.write_corpus: {"generator": "cheetah.world", n, seed, ...}
_WORLD_KEYS = ("n", "seed", "image_size")
DATA_DVC_HEADER = """\
# data/source, the source image-caption corpus, versioned with DVC: `dvc add data/source` updates this file (commit
# it, and `dvc push` the data). `cheetah pipeline run` (make run) and the Prefect flow first bring data/source in line
# with it (cheetah.pipeline.ensure_source): from DVC's cache or remote, or, for the embedded world, by regenerating
# it (same world.* params, same bytes, same hash). `meta.world`: the world.* params that generated the corpus whose
# md5 it names; none for your own corpus, which is never regenerated. See README.md, "A real image-caption corpus".
"""


def _dvc_quiet(root: Path, *args: str) -> subprocess.CompletedProcess:
    """`dvc <args>` with its output captured and no terminal to ask on: DVC then refuses (rather than asks) to
    delete workspace data it has not cached, so a corpus it does not know is never lost."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=stage_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)


def _tail(done: subprocess.CompletedProcess, lines: int = 15) -> str:
    return "\n".join((done.stdout + done.stderr).strip().splitlines()[-lines:])


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
    done = _dvc_quiet(root, "data", "status", "--json", SOURCE)  # (a .dvc file as target finds nothing)
    if done.returncode != 0:
        raise RuntimeError(f"`dvc data status {DATA_DVC}` failed:\n{_tail(done)}")
    try:
        status = json.loads(done.stdout or "{}")
    except ValueError as e:
        raise RuntimeError(f"`dvc data status {DATA_DVC}`: unexpected output {done.stdout[:500]!r}") from e

    def listed(paths: Any) -> bool:
        return any(_inside(str(p).rstrip("/"), SOURCE) for p in paths or [])

    if listed(p for paths in (status.get("uncommitted") or {}).values() for p in paths):
        return False  # data/source differs from data.dvc (modified, deleted, ...)
    if listed(status.get("not_in_cache")):
        done = _dvc_quiet(root, "commit", "--quiet", DATA_DVC)
        if done.returncode != 0:
            raise RuntimeError(f"`dvc commit {DATA_DVC}` failed:\n{_tail(done)}")
    return True


def _record_source(root: Path, world: Mapping[str, Any] | None) -> str:
    """`dvc add data/source` (into data.dvc, written first when there is none) and data.dvc's `meta.world`."""
    path = root / DATA_DVC
    if not path.is_file():
        path.write_text(DATA_DVC_HEADER + f"outs:\n- path: {SOURCE}\n")
    done = _dvc_quiet(root, "add", SOURCE)
    if done.returncode != 0:
        raise RuntimeError(f"`dvc add {SOURCE}` failed:\n{_tail(done)}")
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
                _dvc_quiet(root, *args)  # failures are expected here: no cache, no remote, unsaved data
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


# ---------------------------------------------------------------------------------------------------------------
# The parent run
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def parent_run(root: str | Path = ".", experiment: str = "cheetah", run_name: str = "pipeline",
               tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """A parent MLflow run for one pipeline run; its id is exported in CHEETAH_PARENT_RUN_ID while it is open."""
    import mlflow

    from cheetah.registry import lineage
    from cheetah.tracking import configure

    root = Path(root).resolve()
    configure(experiment, root=root)
    info = lineage(root)
    all_tags = {"cheetah.kind": "pipeline", "git_commit": info["git_commit"], "git_dirty": info["git_dirty"],
                **(tags or {})}
    previous = os.environ.get(PARENT_ENV)
    with mlflow.start_run(run_name=run_name, tags=all_tags) as run:
        os.environ[PARENT_ENV] = run.info.run_id
        try:
            yield run
        finally:
            if previous is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = previous


def log_record(run_id: str, root: str | Path = ".", params: Any = None,
               stages_run: Sequence[str] | None = None) -> dict[str, Any]:
    """Log the pipeline's record on the parent run: files and folders (`record_paths`; `params`: params.yaml by
    default), the evaluation (and training, base) metrics as run metrics, the params, the lineage tags, and
    `stages_run` (the stages DVC ran; by default those that logged a child run). Returns what was logged."""
    import time

    import mlflow
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from cheetah.config import flatten
    from cheetah.io import read_json
    from cheetah.registry import lineage
    from cheetah.tracking import flat_metrics

    from cheetah.config import load_params

    root = Path(root)
    if params is None:
        params = load_params(root / "params.yaml")
    client = MlflowClient()
    logged: dict[str, Any] = {"files": [], "dirs": [], "metrics": 0}
    record_files, record_dirs = record_paths(params)
    for rel in record_files:
        if (root / rel).is_file():
            parent = Path(rel).parent.as_posix()
            client.log_artifact(run_id, str(root / rel), artifact_path="pipeline" if parent == "." else
                                f"pipeline/{parent}")
            logged["files"].append(rel)
    for rel, dest in record_dirs.items():
        if (root / rel).is_dir() and any((root / rel).iterdir()):
            client.log_artifacts(run_id, str(root / rel), artifact_path=dest)
            logged["dirs"].append(rel)
    numbers: dict[str, float] = {}
    for rel, prefix in ((params.evaluate.metrics, ""), (params.train.metrics, "train."),
                        (params.base.metrics, "base.")):
        if (root / rel).is_file():
            try:
                numbers.update({prefix + k: v for k, v in flat_metrics(read_json(root / rel)).items()})
            except (DataError, AttributeError):
                pass  # a metrics file that is not a JSON object is the stage's problem, reported there
    now = int(time.time() * 1000)
    batch = [Metric(k.replace("/", "_"), v, now, 0) for k, v in numbers.items()]
    for i in range(0, len(batch), 900):  # the REST API takes at most 1000 metrics per call
        client.log_batch(run_id, metrics=batch[i:i + 900], synchronous=True)
    logged["metrics"] = len(batch)
    existing = client.get_run(run_id).data.params
    items = [(k, str(v)[:500]) for k, v in flatten(params).items() if k not in existing]
    for i in range(0, len(items), 90):  # ... and at most 100 params
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 90]], synchronous=True)
    for key, value in lineage(root).items():
        client.set_tag(run_id, key, value)
    if stages_run is None:
        children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{run_id}'", output_format="list",
                                      experiment_ids=[client.get_run(run_id).info.experiment_id])
        stages_run = sorted({c.data.tags.get("cheetah.stage", c.info.run_name) for c in children})
    client.set_tag(run_id, "stages_run", ",".join(stages_run) if stages_run else "(none: up to date)")
    logged["stages_run"] = list(stages_run)
    return logged


def run_and_echo(cmd: Sequence[str], root: str | Path, env: Mapping[str, str]) -> tuple[int, str]:
    """Run `cmd`, passing its output through to this process' stdout as it comes (progress bars included), and
    return (exit status, the output as text)."""
    chunks: list[bytes] = []
    with subprocess.Popen(list(cmd), cwd=root, env=dict(env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            chunks.append(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
    return proc.returncode, b"".join(chunks).decode("utf-8", errors="replace")


def stages_in_output(text: str) -> list[str]:
    """The stages `dvc repro` ran, from its output ("Running stage 'x':")."""
    import re

    return re.findall(r"Running stage '([^']+)'", text)


def forget_stale_receipt(root: str | Path = ".", experiment: str = "cheetah") -> bool:
    """Delete the registration receipt when the tracking store no longer holds the version it names (a fresh
    clone, a deleted mlflow.db, another MLFLOW_TRACKING_URI), so that `dvc repro` registers the model again.
    Returns True when it deleted one."""
    from cheetah.registry import receipt_is_current

    receipt = Path(root) / RECEIPT
    if receipt.is_file() and not receipt_is_current(receipt, experiment, root=root):
        receipt.unlink()
        return True
    return False


def is_up_to_date(root: str | Path = ".", stages: Sequence[str] | None = None) -> bool:
    """Whether `dvc status` finds nothing to run (for `stages` and what they need, or the whole pipeline). A status
    that cannot be computed counts as "not up to date", so that `dvc repro` reports the problem."""
    import json

    done = dvc("status", "--json", *(["--with-deps", *stages] if stages else []), root=root, capture=True)
    if done.returncode != 0:
        return False
    try:
        return json.loads(done.stdout or "{}") == {}
    except ValueError:
        return False


def run_pipeline(root: str | Path = ".", stages: Sequence[str] | None = None, force: bool = False,
                 params_path: str = "params.yaml") -> int:
    """`cheetah pipeline run`: data/source in line with data.dvc (`ensure_source`), then dvc repro (all, or
    `stages` and what they need) under a parent MLflow run. Returns dvc's exit status. When everything is up to
    date nothing runs and no MLflow run is created."""
    from cheetah.config import load_params

    root = Path(root).resolve()
    params = load_params(root / params_path)
    experiment = params.register.experiment
    source = "not needed"
    if reads_source(root, stages):
        source = ensure_source(params, root, echo=lambda line: print(line, flush=True))
    if forget_stale_receipt(root, experiment):
        print(f"{RECEIPT}: the tracking store does not hold that version; registering again", flush=True)
    if not force and is_up_to_date(root, stages):
        print("Data and pipelines are up to date: nothing to run (no MLflow run created).", flush=True)
        return 0
    with parent_run(root, experiment, tags={"cheetah.source": source}) as run:
        args = ["repro", *(stages or [])] + (["--force"] if force else [])
        print(f"MLflow parent run {run.info.run_id}: dvc {' '.join(args)}", flush=True)
        returncode, output = run_and_echo([sys.executable, "-m", "dvc", *args], root, stage_env(run.info.run_id))
        log_record(run.info.run_id, root, params, stages_run=stages_in_output(output))
        if returncode != 0:
            import mlflow

            mlflow.set_tag("failed", f"dvc repro exited with {returncode}")
            mlflow.end_run(status="FAILED")
    return returncode
