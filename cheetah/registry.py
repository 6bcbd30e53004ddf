"""MLflow registration, promotion and serving of VPG-C (`cheetah register`, `cheetah predict`).

Registration (`register`) logs the trained VPG-C weights and their card as an MLflow model: a pyfunc
(`VPGCPyfunc`) whose artifacts are only `vpgc.safetensors` + `vpgc.json`. The backbone is never logged: the card
records where it lives (`backbone`, as trained, and `backbone_abspath`), and loading finds it there, or where
`CHEETAH_BACKBONE_DIR` / `model_config={"backbone_dir": ...}` says. A version of `register.model_name` is created
and tagged with its lineage:

    git_commit, git_dirty     the code (the commit `dvc exp run` or `make run` ran on; dirty: uncommitted edits,
                              listed in git_uncommitted); dvc_experiment: the `dvc exp run` experiment, if any
    dvc_lock_hash             sha256 of the dvc.lock entries of every stage upstream of `register` (canonical JSON),
                              i.e. of the exact data, parameters and code hashes that produced this model; the
                              dvc.lock read is logged with the run (`lineage/dvc.lock`)
    data_hash                 DVC's md5 of data/source (data.dvc if there is one, else the `world` stage in dvc.lock)
    backbone_hash             DVC's md5 of the backbone directory (the `base` stage), when DVC produced it
    config.*                  the configuration it was trained in (preset, backbone init, world size, ZeRO stage,
                              precision, launcher; `config_tags`)
    vpgc_sha256               the weights file's hash (also in the card)
    metric.<name>             the headline evaluation metrics (e.g. demon_average, mme.perception), so that
                              promotion compares recorded values and never has to re-evaluate

Nothing is registered unless it checks out: the weights must match the SHA-256 on their card, hold only finite
values, come from a real backbone (not random planning weights) and load on the backbone the card records; the
metrics must be finite and name the weights they measured (`vpgc_sha256`, written by `cheetah evaluate`).

Promotion is MLflow 3 aliases (registry stages are deprecated): the new version always takes `challenger`; it takes
`champion` when it is eligible — trained from committed code, parameters and data (the pipeline's own outputs,
`dvc.lock` and what it lists, do not count as uncommitted), and not in a `dvc exp run` experiment — and there is
no champion, or its `register.metric` beats the champion's, as logged with the champion's MLflow model, by more
than `register.margin` (higher is better). Every decision is recorded on the version (`gate`, `gate_at`).
`cheetah registry demote N --reason ...` marks a broken version and hands `champion` to the best remaining
eligible version; `cheetah registry promote N --reason ...` moves it by hand (recorded as `promoted_by_hand`);
`cheetah registry history` lists all of it. Moving the alias in the MLflow UI works too, but records no reason.

Serving: `mlflow.pyfunc.load_model("models:/<name>@champion").predict(df)` with columns `instruction` (str) and
`images` (list of image paths or `data:image/png;base64,...` URIs) returns one answer per row; `cheetah predict`
does the same for one request. The logged model carries its code (the `cheetah` package, as `code_paths`), pinned
requirements, a signature and an input example; the backbone is found where the card records it, where
`CHEETAH_BACKBONE_DIR` says, or downloaded once from the copy logged to the tracking server at registration (one
copy per backbone weights digest), so it loads on a machine that has neither the project nor the backbone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import warnings
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc

from cheetah.config import Params
from cheetah.pipeline import RECEIPT
from cheetah.tracking import flat_metrics
from cheetah.io import DataError, atomic_write_json, read_json

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_NAME_IN_RUN = "vpgc"
BACKBONE_ENV = "CHEETAH_BACKBONE_DIR"
MEASURED_WEIGHTS_FIELD = "vpgc_sha256"  # in the evaluation metrics: the hash of the VPG-C weights they measured
RANDOM_BACKBONE_FIELD = "random_backbone"  # in a weights card: trained on random backbone weights (planning only)
DVC_EXPERIMENT_ENV = "DVC_EXP_NAME"  # set by `dvc exp run` in every stage's environment
CACHE_ENV = "CHEETAH_CACHE"  # where downloaded backbones are kept (default ~/.cache/cheetah)
BACKBONE_RUN_TAG = "cheetah.backbone_sha256"  # the run holding a backbone's files as artifacts, by weights digest
_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pillow", "numpy", "pandas",
                 "pydantic", "pyyaml")


# ---------------------------------------------------------------------------------------------------------------
# The pyfunc
# ---------------------------------------------------------------------------------------------------------------


def with_image_placeholders(instruction: str, n_images: int) -> str:
    """Add `<image>` placeholders when the instruction has none: `<image> text` for one image, `Image 1: <image>
    Image 2: <image> ... text` for several (the DEMON convention). An instruction that has placeholders is used as
    is (its count must then match the images)."""
    from cheetah.model.prompts import IMAGE_TOKEN

    if n_images == 0 or IMAGE_TOKEN in instruction:
        return instruction
    if n_images == 1:
        return f"{IMAGE_TOKEN} {instruction}"
    return " ".join(f"Image {k + 1}: {IMAGE_TOKEN}" for k in range(n_images)) + f" {instruction}"


def resolve_backbone_dir(card: Mapping[str, Any], override: str | Path | None = None,
                         remote: Mapping[str, Any] | None = None) -> Path | None:
    """Where the backbone of a VPG-C card is: `override` (or $CHEETAH_BACKBONE_DIR) when given, else where it was
    trained (`backbone_abspath`), else the card's `backbone` relative to the working directory (a checkout moved
    elsewhere), else the copy logged to the tracking server at registration (`remote`: {"uri", "sha256"}),
    downloaded once into the cache. None: the card names a preset without a directory. A directory that cannot be
    found is a clear error, not a stack trace from Hugging Face."""
    override = override or os.environ.get(BACKBONE_ENV)
    if override:
        if not Path(override).is_dir():
            raise DataError(f"backbone directory {override} (from {BACKBONE_ENV} or model_config) not found")
        return Path(override)
    for key in ("backbone_abspath", "backbone"):
        location = card.get(key)
        if location and Path(location).is_dir():
            return Path(location)
    if remote and remote.get("uri"):
        return fetch_backbone(str(remote["uri"]), str(remote["sha256"]))
    if card.get("backbone_abspath") or "/" in str(card.get("backbone", "")):
        raise DataError(
            f"the VPG-C card says its backbone is at {card.get('backbone')!r} "
            f"(absolute: {card.get('backbone_abspath')!r}), which does not exist here; set {BACKBONE_ENV} "
            "(or model_config={'backbone_dir': ...}) to its directory")
    return None


def fetch_backbone(uri: str, digest: str) -> Path:
    """The backbone logged at `uri` (e.g. `runs:/<id>/backbone`), downloaded once into the cache and checked against
    the weights digest it was logged with."""
    import shutil
    import tempfile

    from cheetah.evaluate.run import weights_digest

    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cheetah") / "backbones" / digest
    if cache.is_dir():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}.", dir=cache.parent))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        if weights_digest(local) != digest:
            raise DataError(f"{uri}: the downloaded backbone's weights differ from the digest it was logged with")
        os.replace(local, cache)
    except mlflow.exceptions.MlflowException as e:
        raise DataError(f"{uri}: cannot download the model's backbone from the tracking server ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def log_backbone(directory: str | Path) -> dict[str, str]:
    """Log a backbone folder to the tracking server once per weights digest (a child run tagged with it; later
    registrations of VPG-C on the same backbone reuse it), so that a served model finds its backbone on any machine
    that reaches the server. Returns {"uri", "sha256"}."""
    from mlflow.tracking import MlflowClient

    from cheetah.evaluate.run import weights_digest

    digest = weights_digest(directory)
    if digest is None:
        raise DataError(f"{directory}: no weight files in the backbone directory")
    active = mlflow.active_run()
    experiment_id = active.info.experiment_id if active else mlflow.get_experiment_by_name("Default").experiment_id
    found = MlflowClient().search_runs([experiment_id], filter_string=f"tags.`{BACKBONE_RUN_TAG}` = '{digest}'",
                                       max_results=1)
    if found:
        run_id = found[0].info.run_id
    else:
        with mlflow.start_run(run_name=f"backbone-{digest[:12]}", nested=active is not None,
                              tags={BACKBONE_RUN_TAG: digest}) as run:
            mlflow.log_artifacts(str(directory), artifact_path="backbone")
            run_id = run.info.run_id
    return {"uri": f"runs:/{run_id}/backbone", "sha256": digest}


class VPGCPyfunc(mlflow.pyfunc.PythonModel):
    """VPG-C as an MLflow pyfunc: artifacts `vpgc` (weights + card); the backbone is loaded from its recorded place.

    `predict(df)`: df has columns `instruction` (str; `<image>` placeholders optional) and `images` (list of image
    paths or base64 data URIs, or one); returns a list of answers (greedy decoding; `params={"max_new_tokens": n}`)."""

    # `predict` takes a DataFrame on purpose and the signature is given when the model is logged: no type-hint
    # based validation (MLflow would otherwise warn at class creation that predict has no list[...] hints).
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from cheetah.evaluate.generation import load_model
        from cheetah.model.backbones import load_backbone
        from cheetah.model.prompts import TEMPLATES
        from cheetah.model.vpgc import VPGCModel
        from cheetah.model.weights import read_card

        vpgc_dir = context.artifacts["vpgc"]
        card = read_card(vpgc_dir)
        config = dict(getattr(context, "model_config", None) or {})
        remote = {"uri": config.get("backbone_uri"), "sha256": config.get("backbone_sha256")}
        backbone_dir = resolve_backbone_dir(card, config.get("backbone_dir"), remote)
        if backbone_dir is None:  # a preset name the card records without a directory
            model = load_model(vpgc_dir)
        else:
            # The weights check (shapes, layer, architecture fingerprint) happens in from_pretrained; the template
            # is the one the weights were trained with, whatever the backbone directory's default.
            model = VPGCModel.from_pretrained(vpgc_dir, backbone=load_backbone(backbone_dir))
            if card.get("template") in TEMPLATES:
                model.backbone_info.template = TEMPLATES[card["template"]]
            model.eval()
        self.model = model
        self.max_new_tokens = int(config.get("max_new_tokens") or 32)

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would build a signature from them
        import pandas as pd

        from cheetah.evaluate.generation import answer_one

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = {"instruction", "images"} - set(frame.columns)
        if missing:
            raise DataError("predict: the input frame needs columns 'instruction' and 'images'; "
                            f"missing {sorted(missing)}")
        max_new_tokens = int((params or {}).get("max_new_tokens") or self.max_new_tokens)
        answers = []
        for row, (instruction, images) in enumerate(zip(frame["instruction"], frame["images"])):
            images = _as_images(images, row)
            answers.append(answer_one(self.model, with_image_placeholders(str(instruction), len(images)), images,
                                      max_new_tokens=max_new_tokens))
        return answers


DATA_URI = "data:image/"


def _as_images(images: Any, row: int) -> list[Any]:
    """A row's images: paths on the serving machine, or inline `data:image/...;base64,...` URIs (what a REST
    client sends), decoded to PIL images."""
    import base64
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    if images is None:
        return []
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    try:
        items = [str(p) for p in list(images)]
    except TypeError:
        raise DataError(f"predict: row {row}: `images` must be a list of image paths or data URIs, "
                        f"got {type(images).__name__}") from None
    out: list[Any] = []
    for k, item in enumerate(items):
        if item.startswith(DATA_URI):
            try:
                data = base64.b64decode(item.split(",", 1)[1], validate=True)
                with Image.open(io.BytesIO(data)) as im:
                    out.append(im.convert("RGB"))
            except (IndexError, binascii.Error, UnidentifiedImageError, OSError) as e:
                raise DataError(f"predict: row {row}, image {k}: not a decodable base64 image data URI ({e})") from None
        elif not Path(item).is_file():
            raise DataError(f"predict: row {row}, image {k}: {item}: image not found")
        else:
            out.append(item)
    return out


def _example_images() -> list[str]:
    """Two small scenes of the embedded world as PNG data URIs: the logged model's input example."""
    import base64

    from cheetah.world import generate_scene, png_bytes, render

    return [DATA_URI + "png;base64," + base64.b64encode(png_bytes(render(generate_scene(0, k, image_size=32)).image))
            .decode("ascii") for k in range(2)]


def _signature(max_new_tokens: int) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "instruction"), ColSpec(Array("string"), "images")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", max_new_tokens)]),
    )


def pip_requirements() -> list[str]:
    """Exact pins of what the pyfunc imports (passing them skips MLflow's slow requirement inference). The
    `cheetah` package itself is not on PyPI: install the repository (`pip install -e .`) where the model is served."""
    out = []
    for name in _REQUIREMENTS:
        try:
            version = metadata.version(name).split("+")[0]  # torch's "+cpu" is not a PyPI version
        except metadata.PackageNotFoundError:
            continue
        out.append(f"{name}=={version}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Lineage
# ---------------------------------------------------------------------------------------------------------------


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _load_yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _out_md5(entry: Mapping[str, Any] | None, path: str) -> str | None:
    for out in (entry or {}).get("outs", []) or []:
        if out.get("path") == path:
            return out.get("md5")
    return None


def uncommitted_changes(root: str | Path = ".") -> list[str] | None:
    """Files that differ from the commit (modified, staged, deleted or untracked, not ignored), except what the
    pipeline itself writes from committed inputs before it registers: `dvc.lock` and every output it lists
    (metrics, plots, the receipt), the `.gitignore` files DVC keeps, and `data.dvc` when it records the embedded
    world (regenerated from the committed `world.*` parameters; a corpus of your own in it counts). None when
    `root` is not a git checkout."""
    from cheetah.pipeline import DATA_DVC, read_data_dvc

    try:
        done = subprocess.run(["git", "status", "--porcelain=v1", "-z", "--untracked-files=all"], cwd=root,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    entries = done.stdout.split("\0")
    changed, i = [], 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        changed.append(entry[3:])
        if entry[0] in "RC":  # a rename or copy is followed by its source path
            i += 1
    lock = _load_yaml(Path(root) / "dvc.lock") or {}
    outputs = {"dvc.lock"} | {str(o.get("path", "")).rstrip("/") for st in (lock.get("stages") or {}).values()
                              for o in (st or {}).get("outs") or [] if isinstance(o, Mapping)}
    if read_data_dvc(root)["world"] is not None:
        outputs.add(DATA_DVC)
    return sorted(c for c in changed if Path(c).name != ".gitignore" and
                  not any(c == o or c.startswith(o + "/") for o in outputs if o))


def lineage(root: str | Path = ".", stage: str = "register") -> dict[str, str]:
    """The lineage tags of a model produced in `root` (see the module docstring). Missing facts are "unknown"."""
    root = Path(root)
    tags: dict[str, str] = {}
    commit = _git(root, "rev-parse", "HEAD")
    tags["git_commit"] = commit or "unknown"
    changes = uncommitted_changes(root)
    tags["git_dirty"] = "unknown" if changes is None else str(bool(changes)).lower()
    if changes:
        tags["git_uncommitted"] = ", ".join(changes[:20]) + (f" and {len(changes) - 20} more" if len(changes) > 20
                                                             else "")
    experiment = os.environ.get(DVC_EXPERIMENT_ENV)
    if experiment:
        tags["dvc_experiment"] = experiment

    lock = _load_yaml(root / "dvc.lock") or {}
    stages = dict(lock.get("stages") or {})
    upstream = {name: entry for name, entry in stages.items() if name != stage}
    tags["dvc_lock_hash"] = (hashlib.sha256(json.dumps(upstream, sort_keys=True, default=str).encode()).hexdigest()
                             if upstream else "unknown")
    data_dvc = _load_yaml(root / "data.dvc")
    data_md5 = _out_md5(data_dvc, "data/source") if data_dvc else None
    tags["data_hash"] = data_md5 or _out_md5(stages.get("world"), "data/source") or "unknown"
    base_outs = (stages.get("base") or {}).get("outs") or []  # the backbone: the base stage's directory output
    tags["backbone_hash"] = next((o.get("md5") for o in base_outs if str(o.get("md5", "")).endswith(".dir")),
                                 None) or "unknown"
    return tags


def config_tags(card: Mapping[str, Any]) -> dict[str, str]:
    """The configuration a model was trained in, from its card: `config.preset`, `config.backbone_init` (pretrain,
    random, checkpoint), `config.random_backbone`, `config.world_size`, `config.zero_stage`, `config.precision`,
    `config.launcher`."""
    training = card.get("training") or {}
    tags = {f"config.{k}": str(card.get(k)) for k in ("backbone_init", "random_backbone")}
    tags.update({f"config.{k}": str(training.get(k)) for k in ("preset", "world_size", "zero_stage", "precision",
                                                              "launcher")})
    return tags


def champion_eligibility(tags: Mapping[str, str]) -> tuple[bool, str]:
    """Whether a version with these lineage tags may take `champion` automatically: only from committed code,
    parameters and data (`git_dirty` false), and not from a `dvc exp run` experiment nobody committed. The rest
    become `challenger`; `cheetah registry promote` moves `champion` by hand, recorded with its reason."""
    if tags.get("dvc_experiment"):
        return False, f"it comes from the DVC experiment {tags['dvc_experiment']!r}, not from committed parameters"
    if tags.get("git_dirty") != "false":
        what = tags.get("git_uncommitted") or "git status unknown"
        return False, f"the code, parameters or data it was trained from are not committed ({what})"
    return True, "committed code, parameters and data"


def metric_value(metrics: Mapping[str, Any], name: str, source: str = "metrics") -> float:
    """`name` from the evaluation metrics; dotted names reach into nested sections (`mme.perception`)."""
    node: Any = metrics
    if name in metrics:
        node = metrics[name]
    else:
        for part in name.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise DataError(f"{source}: no metric {name!r} (register.metric); "
                                f"it has {sorted(flat_metrics(metrics))}")
            node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise DataError(f"{source}: metric {name!r} is {node!r}, not a number")
    if not math.isfinite(node):
        raise DataError(f"{source}: metric {name!r} is {node}, not a finite number")
    return float(node)


# ---------------------------------------------------------------------------------------------------------------
# What is registered is verified first
# ---------------------------------------------------------------------------------------------------------------


def verify_weights(vpgc_dir: str | Path) -> dict[str, Any]:
    """The card of `vpgc_dir` after checking that the weights are what the card says (hash), finite, trained on a
    real backbone (not random planning weights), and loadable on the backbone the card records (built on the
    meta device: shapes and architecture, without reading the backbone's weights). Raises DataError."""
    from cheetah.model.backbones import load_backbone
    from cheetah.model.vpgc import VPGCModel
    from cheetah.model.weights import CARD_FILE, WEIGHTS_FILE, checked_state, read_card

    vpgc_dir = Path(vpgc_dir)
    for f in (WEIGHTS_FILE, CARD_FILE):
        if not (vpgc_dir / f).is_file():
            raise DataError(f"{vpgc_dir / f}: not found (register needs the trained VPG-C weights and card)")
    card = read_card(vpgc_dir)
    if card.get(RANDOM_BACKBONE_FIELD):
        raise DataError(f"{vpgc_dir / CARD_FILE}: trained on a backbone with random weights (a planning or "
                        "benchmark run); such weights are never registered")
    location = resolve_backbone_dir(card)
    backbone = load_backbone(str(location or card["backbone"]), device="meta")
    checked_state(vpgc_dir, VPGCModel(backbone, update_layer=card["update_layer"]))
    return card


def read_measured_metrics(metrics_path: str | Path, card: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation metrics, refused unless every number is finite and they name (by hash) the weights in hand."""
    from cheetah.io import _nonfinite_paths

    metrics = read_json(metrics_path)
    if not isinstance(metrics, Mapping):
        raise DataError(f"{metrics_path}: expected a JSON object of metrics")
    bad = _nonfinite_paths(dict(metrics))
    if bad:
        raise DataError(f"{metrics_path}: non-finite metric(s) {', '.join(bad[:5])}; nothing was registered")
    measured = metrics.get(MEASURED_WEIGHTS_FIELD)
    if measured is None:
        raise DataError(f"{metrics_path}: does not name the weights it measured ({MEASURED_WEIGHTS_FIELD}); "
                        "evaluate the weights with `cheetah evaluate` before registering them")
    if measured != card.get("sha256"):
        raise DataError(f"{metrics_path}: measured the VPG-C weights {str(measured)[:12]}…, not the ones being "
                        f"registered ({str(card.get('sha256'))[:12]}…); evaluate these weights first")
    return dict(metrics)


# ---------------------------------------------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------------------------------------------


def decide(challenger: float, champion: float | None, margin: float) -> tuple[bool, str]:
    """(promote?, why). Promote when there is no champion, or the challenger beats it by more than `margin`. A
    non-finite challenger is an error, whatever the champion: it can never become champion."""
    if not math.isfinite(challenger):
        raise DataError(f"the challenger's metric is {challenger}, not a finite number; it cannot be promoted")
    if champion is None:
        return True, "no champion yet"
    if challenger > champion + margin:
        return True, f"{challenger:.4f} beats the champion's {champion:.4f} by more than the margin {margin}"
    return False, f"{challenger:.4f} does not beat the champion's {champion:.4f} by more than the margin {margin}"


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def logged_metric(client: Any, version: Any, metric: str) -> float | None:
    """`metric` as logged with the version's MLflow model (the LoggedModel's metrics), None when it has none.
    This, not a tag, is what the gate compares."""
    from mlflow.exceptions import MlflowException

    model_id = getattr(version, "model_id", None)
    source = str(getattr(version, "source", "") or "")
    if not model_id and source.startswith("models:/m-"):  # the sqlite store leaves model_id unset; source has it
        model_id = source[len("models:/"):].split("/")[0]
    if not model_id:
        return None
    try:
        logged = client.get_logged_model(model_id)
    except MlflowException:
        return None
    values = [m.value for m in logged.metrics or [] if m.key == metric]
    return float(values[-1]) if values and math.isfinite(values[-1]) else None


def _log_model(vpgc_dir: Path, card: Mapping[str, Any], params: Params, backbone: Mapping[str, str] | None) -> Any:
    """Log the pyfunc (models from code: `cheetah/registry_model.py`) with the VPG-C weights + card as artifacts,
    the `cheetah` package itself as its code (so it serves where the project is not installed), pinned
    requirements, a signature with an input example, and the logged backbone's reference."""
    import shutil
    import tempfile

    import cheetah
    import pandas as pd

    # The package as the model's code, without what serving never uses (the Data Docs' web assets, bytecode).
    code = Path(tempfile.mkdtemp(prefix="cheetah-code-")) / "cheetah"
    shutil.copytree(Path(cheetah.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "static"))
    try:
        return _log_pyfunc(vpgc_dir, card, params, backbone, code)
    finally:
        shutil.rmtree(code.parent, ignore_errors=True)


def _log_pyfunc(vpgc_dir: Path, card: Mapping[str, Any], params: Params, backbone: Mapping[str, str] | None,
                code: Path) -> Any:
    import pandas as pd

    return mlflow.pyfunc.log_model(
        name=MODEL_NAME_IN_RUN,
        python_model=str(Path(__file__).with_name("registry_model.py")),  # models from code: no pickle
        code_paths=[str(code)],
        artifacts={"vpgc": str(vpgc_dir)},
        pip_requirements=pip_requirements(),
        signature=_signature(params.evaluate.max_new_tokens),
        # Images inline (data URIs), so that it runs anywhere: MLflow loads the logged model from its own files and
        # answers it once at logging time.
        input_example=(pd.DataFrame({"instruction": ["What is different between the images?"],
                                     "images": [_example_images()]}), {"max_new_tokens": 4}),
        # Every key that `load(..., model_config=...)` may override must be logged (MLflow drops unknown ones).
        model_config={"max_new_tokens": params.evaluate.max_new_tokens, "backbone_dir": "",
                      "backbone_uri": (backbone or {}).get("uri", ""),
                      "backbone_sha256": (backbone or {}).get("sha256", "")},
        metadata={"backbone": card.get("backbone"), "backbone_abspath": card.get("backbone_abspath"),
                  "backbone_fingerprint": card.get("backbone_fingerprint"),
                  "backbone_uri": (backbone or {}).get("uri")},
    )


def register(params: Params, metrics_path: str | Path | None = None, vpgc_dir: str | Path | None = None,
             out: str | Path = RECEIPT, root: str | Path = ".") -> dict[str, Any]:
    """Verify, log and register the VPG-C model of `vpgc_dir` (default `train.out`), gate it, write the receipt.

    Nothing is registered unless the weights match their card and load on its backbone, and the metrics are
    finite and name those weights. The version always takes `challenger`; it takes `champion` only when it is
    eligible (`champion_eligibility`) and beats the champion's logged metric by more than `register.margin`."""
    from mlflow.tracking import MlflowClient

    from cheetah.config import to_dict
    from cheetah.tracking import stage_run

    cfg = params.register
    root = Path(root)
    vpgc_dir = Path(vpgc_dir or params.train.out)
    metrics_path = Path(metrics_path or params.evaluate.metrics)
    card = verify_weights(vpgc_dir)
    metrics = read_measured_metrics(metrics_path, card)
    value = metric_value(metrics, cfg.metric, str(metrics_path))
    numbers = flat_metrics(metrics)
    # Headline numbers only (e.g. demon_average, demon.average, mme.perception): not per task, not the baselines.
    headline = {k: v for k, v in numbers.items() if k.count(".") <= 1 and not k.startswith("models.")}
    tags = {**lineage(root), "vpgc_sha256": str(card["sha256"]), "backbone": str(card.get("backbone")),
            "metric": cfg.metric, **{f"metric.{k}": repr(v) for k, v in headline.items()}}
    tags[f"metric.{cfg.metric}"] = repr(value)
    tags.update(config_tags(card))
    eligible, eligibility = champion_eligibility(tags)
    tags["champion_eligible"] = str(eligible).lower()

    with stage_run("register", {"register": to_dict(cfg)}, experiment=cfg.experiment) as run:
        mlflow.set_tags({k: v for k, v in tags.items() if not k.startswith("metric.")})
        if (root / "dvc.lock").is_file():
            mlflow.log_artifact(str(root / "dvc.lock"), artifact_path="lineage")
        with warnings.catch_warnings():
            # The predict method takes a DataFrame (no list[...] type hints) and the signature is given explicitly.
            warnings.filterwarnings("ignore", message=".*type hint", category=UserWarning)
            location = resolve_backbone_dir(card)
            backbone = log_backbone(location) if location is not None else None
            info = _log_model(vpgc_dir, card, params, backbone)
        # Linked to the logged model: the gate reads a champion's numbers from its model, not from tags.
        mlflow.log_metrics({k.replace("/", "_"): v for k, v in numbers.items()}, model_id=info.model_id)
        _log_datasets(params, root, info.model_id)
        client = MlflowClient()
        version = mlflow.register_model(info.model_uri, cfg.model_name, tags=tags)
        v = str(version.version)
        champion = _alias_version(client, cfg.model_name, CHAMPION)
        champion_value = logged_metric(client, champion, cfg.metric) if champion is not None else None
        if not eligible:
            promote, reason = False, f"not eligible for champion: {eligibility}"
        elif champion is not None and champion_value is None:
            promote, reason = False, (f"the champion (version {champion.version}) has no logged {cfg.metric!r}; "
                                      "it stays champion (`cheetah registry promote` moves it by hand)")
        else:
            promote, reason = decide(value, champion_value, cfg.margin)
        client.set_registered_model_alias(cfg.model_name, CHALLENGER, v)
        if promote:
            client.set_registered_model_alias(cfg.model_name, CHAMPION, v)
        _record(client, cfg.model_name, v, "gate", ("promoted: " if promote else "kept: ") + reason)
        client.update_model_version(cfg.model_name, v, description=(
            f"VPG-C on {card.get('backbone')} (layer {card.get('update_layer')}); {cfg.metric} = {value:.4f}; "
            f"git {tags['git_commit'][:12]}; {'champion' if promote else 'challenger'}: {reason}"))
        mlflow.set_tags({"registered_model": cfg.model_name, "registered_version": v, "promoted": str(promote).lower()})
        receipt = {
            "model_name": cfg.model_name,
            "version": int(v),
            "model_uri": f"models:/{cfg.model_name}/{v}",
            "run_id": run.info.run_id if run is not None else None,
            "metric": cfg.metric,
            "value": value,
            "margin": cfg.margin,
            "promoted": promote,
            "reason": reason,
            "previous_champion": None if champion is None else {"version": int(champion.version),
                                                                  "value": champion_value},
            "aliases": {CHALLENGER: int(v), CHAMPION: int(v) if promote else
                        (int(champion.version) if champion is not None else None)},
            "tracking_uri": mlflow.get_tracking_uri(),  # the lineage tags are on the version itself
        }
    atomic_write_json(out, receipt)
    return receipt


def _log_datasets(params: Params, root: Path, model_id: str) -> None:
    """The data the model was trained and measured on, as MLflow dataset inputs of the registering run linked to
    its model: each folder with DVC's hash of it (from dvc.lock / data.dvc; "unknown" outside the pipeline)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import LoggedModelInput

    lock = _load_yaml(root / "dvc.lock") or {}
    hashes = {str(o.get("path", "")).rstrip("/"): o.get("md5") for st in (lock.get("stages") or {}).values()
              for o in (st or {}).get("outs") or [] if isinstance(o, Mapping)}
    data_dvc = _load_yaml(root / "data.dvc")
    if data_dvc:
        hashes["data/source"] = _out_md5(data_dvc, "data/source")
    for context, name, path in (("source", "corpus", params.synthesize.source),
                                ("training", "synthetic", params.train.data),
                                ("evaluation", "demon", params.evaluate.demon_dir),
                                ("evaluation", "mme", params.evaluate.mme_dir)):
        digest = str(hashes.get(str(path).rstrip("/")) or "unknown").removesuffix(".dir")
        with warnings.catch_warnings():  # MLflow registers two equivalent local-file source classes
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways", category=UserWarning)
            source = resolve_dataset_source((root / path).resolve().as_uri())
        mlflow.log_input(MetaDataset(source, name=name, digest=digest[:36]), context=context,
                         model=LoggedModelInput(model_id=model_id))


def _record(client: Any, name: str, version: str, event: str, text: str) -> None:
    """One gate event on a version's tags (`gate`, `demoted`, `promoted_by_hand`), with the time it happened."""
    import datetime

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    client.set_model_version_tag(name, version, event, text)
    client.set_model_version_tag(name, version, f"{event}_at", stamp)


def _versions(client: Any, name: str) -> list[Any]:
    return sorted(client.search_model_versions(f"name='{name}'"), key=lambda mv: int(mv.version))


def demote(name: str, version: int | str, reason: str, metric: str = "demon_average") -> dict[str, Any]:
    """Mark a version broken (`demoted` tag with the reason) and, if it was champion, give `champion` to the best
    remaining eligible version by its logged `metric` (or to none). Returns what happened."""
    from mlflow.tracking import MlflowClient

    if not reason.strip():
        raise DataError("demote: give the reason (--reason), it is recorded on the version")
    client = MlflowClient()
    target = _get_version(client, name, version)
    _record(client, name, str(target.version), "demoted", reason)
    champion = _alias_version(client, name, CHAMPION)
    result: dict[str, Any] = {"model_name": name, "demoted": int(target.version), "reason": reason,
                              "champion": None if champion is None else int(champion.version)}
    if champion is None or str(champion.version) != str(target.version):
        return result
    client.delete_registered_model_alias(name, CHAMPION)
    best, best_value = None, None
    for mv in _versions(client, name):
        tags = mv.tags or {}
        if "demoted" in tags or tags.get("champion_eligible") != "true":
            continue
        value = logged_metric(client, mv, metric)
        if value is not None and (best_value is None or value > best_value):
            best, best_value = mv, value
    if best is not None:
        client.set_registered_model_alias(name, CHAMPION, str(best.version))
        _record(client, name, str(best.version), "gate", f"promoted: best remaining eligible {metric} "
                f"({best_value:.4f}) after version {target.version} was demoted ({reason})")
    result["champion"] = None if best is None else int(best.version)
    return result


def promote(name: str, version: int | str, reason: str) -> dict[str, Any]:
    """Move `champion` to `version` by hand, whatever the gate said (a recorded, deliberate override). A demoted
    version is refused: a broken model is never served."""
    from mlflow.tracking import MlflowClient

    if not reason.strip():
        raise DataError("promote: give the reason (--reason), it is recorded on the version")
    client = MlflowClient()
    target = _get_version(client, name, version)
    if "demoted" in (target.tags or {}):
        raise DataError(f"{name} version {target.version} was demoted ({target.tags['demoted']}); "
                        "it cannot become champion")
    previous = _alias_version(client, name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, str(target.version))
    was = f"version {previous.version}" if previous is not None else "none"
    _record(client, name, str(target.version), "promoted_by_hand", f"{reason} (champion was {was})")
    return {"model_name": name, "champion": int(target.version),
            "previous_champion": None if previous is None else int(previous.version), "reason": reason}


def _get_version(client: Any, name: str, version: int | str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise DataError(f"{name}: no version {version} in the registry at {mlflow.get_tracking_uri()}") from None


def history(name: str) -> list[dict[str, Any]]:
    """Every version of `name` with its aliases, lineage and every gate event (what `cheetah registry history`
    prints)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    rows = []
    for mv in _versions(client, name):
        tags = mv.tags or {}
        rows.append({
            "version": int(mv.version),
            "aliases": sorted(getattr(mv, "aliases", []) or []),
            "metric": tags.get("metric"),
            "value": tags.get(f"metric.{tags.get('metric')}"),
            "git_commit": tags.get("git_commit", "")[:12],
            "champion_eligible": tags.get("champion_eligible"),
            **{k: tags[k] for k in ("dvc_experiment", "git_uncommitted", "gate", "gate_at", "demoted", "demoted_at",
                                    "promoted_by_hand", "promoted_by_hand_at") if k in tags},
        })
    return rows


def receipt_is_current(path: str | Path = RECEIPT, experiment: str = "cheetah",
                       root: str | Path = ".") -> bool:
    """Whether the tracking store (of the repository at `root`) still holds the version a registration receipt
    names, from the same run. False for a missing or unreadable receipt, or a store that lost it (a fresh clone, a
    deleted mlflow.db, another MLFLOW_TRACKING_URI)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from cheetah.tracking import configure

    path = Path(path)
    if not path.is_file():
        return False
    try:
        receipt = json.loads(path.read_text())
        name, version, run_id = receipt["model_name"], str(receipt["version"]), receipt.get("run_id")
    except (ValueError, KeyError, TypeError):
        return False
    configure(experiment, root=root)
    try:
        mv = MlflowClient().get_model_version(name, version)
    except MlflowException:
        return False
    return run_id is None or mv.run_id == run_id


# ---------------------------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------------------------


def load(model_uri: str, backbone_dir: str | Path | None = None) -> Any:
    """`mlflow.pyfunc.load_model(model_uri)`, with the backbone directory overridden when given."""
    from mlflow.exceptions import MlflowException

    config = {"backbone_dir": str(backbone_dir)} if backbone_dir else None
    try:
        return mlflow.pyfunc.load_model(model_uri, model_config=config)
    except MlflowException as e:  # no such model, version or alias (e.g. no champion yet) in this tracking store
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{model_uri}: cannot load it from the tracking store {mlflow.get_tracking_uri()} ({first})") from None


def predict(model_uri: str, instruction: str, images: Sequence[str | Path],
            backbone_dir: str | Path | None = None, max_new_tokens: int | None = None) -> str:
    """One answer from a registered model (e.g. `models:/cheetah-vpgc@champion`)."""
    import pandas as pd

    for image in images:
        if not Path(image).is_file():
            raise DataError(f"{image}: image not found")
    model = load(model_uri, backbone_dir)
    frame = pd.DataFrame({"instruction": [instruction], "images": [[str(p) for p in images]]})
    params = {"max_new_tokens": int(max_new_tokens)} if max_new_tokens else None
    return model.predict(frame, params=params)[0]
