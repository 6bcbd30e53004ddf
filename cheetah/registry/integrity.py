"""What is served is what was registered: every file of a registered model, hashed at registration, is checked
before the model is loaded, served or made champion.

At registration (`record`), every file of the logged MLflow model is hashed (SHA-256): its code (`served_model.py`
and the `cheetah` package in `code/`), `MLmodel`, the environment files, and the VPG-C weights and card. The list
(`artifact_files`, relative path -> SHA-256) and its digest (`artifact_sha256`) are tags of the model version.
Tags live in the registry's database, not in the artifact store: whoever can rewrite the stored files (and the
card's hash with them) still cannot make them match what the version says it holds.

Before a version is loaded (`cheetah predict`, `cheetah.registry.load`), served (`cheetah serve`) or made champion
(`cheetah registry promote`, `demote`), `verified_copy` downloads its files into a fresh local folder and checks
that copy: every file recorded, none changed, none added or missing (Python's bytecode caches are removed from the
copy, not checked), and the model a "models from code" one (no pickled Python object in it, ever). MLflow then loads that very copy, so nothing can change between the check and
the load. A mismatch is a `DataError` naming the version and the file. A version registered before these tags
existed is refused too: register it again. (`mlflow.pyfunc.load_model` called directly checks nothing: serve through
`cheetah predict`, `cheetah serve` or `cheetah.registry.load`.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cheetah.io import DataError, sha256_file

FILES_TAG = "artifact_files"  # JSON {relative path: SHA-256} of every file of the logged model
DIGEST_TAG = "artifact_sha256"  # SHA-256 of FILES_TAG's canonical JSON
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"  # MLflow's loader of a model from code (no pickle)
PICKLE_SUFFIXES = (".pkl", ".pickle", ".cloudpickle", ".joblib", ".pt", ".pth", ".bin", ".ckpt")
"""Files that would be unpickled by whatever reads them; a served model holds safetensors, JSON and code only."""
_MAX_TAG = 100_000  # MLflow's longest model-version tag value
DOWNLOAD_NOTE = "registered_model_meta"
"""Written by MLflow into every download of a registered model (its name and version, overwriting any stored
copy): the one file of a downloaded model that is not the stored model's, so neither recorded nor checked."""


BYTECODE_CACHE = "__pycache__"
"""Python's bytecode caches: written into the store when the model is loaded in place (`mlflow.pyfunc.load_model` on
a local store), so not part of the model: neither recorded nor checked, and removed from a verified copy before it
is loaded, so that a planted one is never run."""


def file_hashes(folder: str | Path) -> dict[str, str]:
    """{relative path: SHA-256} of every file under `folder` but Python's bytecode caches. A symbolic link is
    refused: what it points to is not part of the model, and could change without the model changing."""
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            raise DataError(f"{rel}: a symbolic link in the model's files; a registered model holds only files")
        if p.is_file() and rel != DOWNLOAD_NOTE and BYTECODE_CACHE not in p.relative_to(folder).parts:
            out[rel] = sha256_file(p)
    return out


def files_digest(files_json: str) -> str:
    return hashlib.sha256(files_json.encode("utf-8")).hexdigest()


def _canonical(files: Mapping[str, str]) -> str:
    return json.dumps(dict(sorted(files.items())), separators=(",", ":"))


def check_models_from_code(folder: str | Path, where: str) -> None:
    """Refuse a model that MLflow would load by unpickling: its `MLmodel` must name the models-from-code loader and no
    pickled Python model, and no file may be of a pickled kind (`PICKLE_SUFFIXES`)."""
    import yaml

    folder = Path(folder)
    mlmodel = folder / "MLmodel"
    try:
        spec = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
        flavor = spec["flavors"]["python_function"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise DataError(f"{where}: MLmodel is missing or not an MLflow python_function model ({e})") from None
    if flavor.get("loader_module") != CODE_LOADER or "python_model" in flavor:
        raise DataError(f"{where}: MLmodel loads the model with {flavor.get('loader_module')!r} from "
                        f"{flavor.get('python_model')!r}, not from code ({CODE_LOADER}); a pickled model is never "
                        "loaded")
    pickled = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                     if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise DataError(f"{where}: {pickled[0]}: a pickled file in the model"
                        f"{f' (and {len(pickled) - 1} more)' if len(pickled) > 1 else ''}; a served model holds "
                        "code, JSON and safetensors only")


def record(folder: str | Path, weights_sha256: str, where: str = "the logged model") -> dict[str, str]:
    """The tags that pin a logged model's files (`FILES_TAG`, `DIGEST_TAG`), after checking that it is a model from
    code and that the VPG-C weights it holds are `weights_sha256` (the ones verified before logging)."""
    check_models_from_code(folder, where)
    files = file_hashes(folder)
    weights = sorted(rel for rel in files if rel.endswith("/vpgc.safetensors"))
    if [files[rel] for rel in weights] != [weights_sha256]:
        raise DataError(f"{where}: the logged VPG-C weights ({', '.join(weights) or 'none'}) are not the verified "
                        f"ones (SHA-256 {weights_sha256[:12]}…); were they replaced while registering?")
    files_json = _canonical(files)
    if len(files_json) > _MAX_TAG:
        raise DataError(f"{where}: {len(files)} files are too many to record on the model version")
    return {FILES_TAG: files_json, DIGEST_TAG: files_digest(files_json)}


def verify(folder: str | Path, tags: Mapping[str, str], where: str) -> None:
    """Refuse (DataError, naming the file) a model folder whose files are not exactly those recorded in `tags`."""
    files_json, digest = tags.get(FILES_TAG), tags.get(DIGEST_TAG)
    if not files_json or not digest:
        raise DataError(f"{where}: no record of its files ({FILES_TAG}, {DIGEST_TAG}); it was registered before "
                        "models were checked, or the record was removed; register the model again")
    if files_digest(files_json) != digest:
        raise DataError(f"{where}: its record of files ({FILES_TAG}) does not match its digest ({DIGEST_TAG}); "
                        "the version's tags were edited")
    recorded = json.loads(files_json)
    actual = file_hashes(folder)
    problems = [f"{rel} " + ("is missing" if rel not in actual else "was added" if rel not in recorded else "changed")
                for rel in sorted(set(recorded) | set(actual)) if recorded.get(rel) != actual.get(rel)]
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise DataError(f"{where}: its stored files are not those registered ({'; '.join(problems[:5])}{more}); "
                        "refusing it")
    check_models_from_code(folder, where)


def resolve_version(model_uri: str) -> tuple[str, Any]:
    """(model name, MLflow ModelVersion) of `models:/<name>/<version>` or `models:/<name>@<alias>`. Other URIs (a run,
    a path) name nothing registered to check against and are refused."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    import mlflow

    rest = model_uri[len("models:/"):] if model_uri.startswith("models:/") else ""
    if "@" in rest:
        name, alias = rest.split("@", 1)
        version = None
    else:
        name, _, version = rest.rpartition("/")
        alias = None
    if not name or not (alias or (version or "").isdigit()):
        raise DataError(f"{model_uri}: only registered versions are loaded (models:/<name>/<version> or "
                        "models:/<name>@<alias>): their files are checked against what was registered")
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as e:  # no such model, version or alias (e.g. no champion yet)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{model_uri}: cannot load it from the tracking store {mlflow.get_tracking_uri()} "
                        f"({first})") from None
    return name, mv


def verified_copy(model_uri: str, dst: str | Path) -> Path:
    """The registered model `model_uri`, downloaded into the folder `dst` and checked file by file against its
    registration (`verify`); the path of the model in `dst`. On a mismatch `dst` is removed and DataError raised.
    Load from the returned folder, never from `model_uri` again."""
    import mlflow

    name, mv = resolve_version(model_uri)
    where = f"{name} version {mv.version}"
    folder = Path(dst)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}",
                                                             dst_path=str(folder)))
        except mlflow.exceptions.MlflowException as e:
            raise DataError(f"{where}: cannot download its files from the tracking store ({e})") from None
        for cache in sorted(local.rglob(BYTECODE_CACHE), reverse=True):
            shutil.rmtree(cache)
        verify(local, mv.tags or {}, where)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return local


@contextlib.contextmanager
def checked(name: str, version: int | str) -> Iterator[Path]:
    """Verify a version (as `verified_copy`) for as long as the block runs; the copy is removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=f"cheetah-check-{version}-"))
    try:
        yield verified_copy(f"models:/{name}/{version}", folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def verify_version(name: str, version: int | str) -> None:
    """Refuse (DataError, naming the file) a registered version whose stored files are not those registered."""
    with checked(name, version):
        pass
