"""MLflow registration, promotion and serving of VPG-C (`cheetah register`, `cheetah predict`).

Registration (`register`) logs the trained VPG-C weights and their card as an MLflow model: a pyfunc
(`VPGCPyfunc`) whose artifacts are only `vpgc.safetensors` + `vpgc.json`. The backbone is never logged: the card
records where it lives (`backbone`, as trained, and `backbone_abspath`), and loading finds it there, or where
`CHEETAH_BACKBONE_DIR` / `model_config={"backbone_dir": ...}` says. A version of `register.model_name` is created
and tagged with its lineage:

    git_commit, git_dirty     the code (the commit `dvc exp run` or `make run` ran on; dirty: uncommitted edits)
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

Promotion is MLflow 3 aliases (registry stages are deprecated): the new version always takes `challenger`; it takes
`champion` when there is none, or when its `register.metric` beats the champion's recorded value by more than
`register.margin` (higher is better). Moving the alias by hand in the MLflow UI (model version page -> Aliases ->
add `champion`) or with `MlflowClient().set_registered_model_alias(name, "champion", version)` is the same move.

Serving: `mlflow.pyfunc.load_model("models:/<name>@champion").predict(df)` with columns `instruction` (str) and
`images` (list of image paths) returns one answer per row; `cheetah predict` does the same for one request. Loading
needs the `cheetah` package importable (the pyfunc's code) and the backbone directory present.
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
from cheetah.tracking import flat_metrics
from cheetah.io import DataError, atomic_write_json, read_json

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_NAME_IN_RUN = "vpgc"
BACKBONE_ENV = "CHEETAH_BACKBONE_DIR"
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


def resolve_backbone_dir(card: Mapping[str, Any], override: str | Path | None = None) -> Path | None:
    """Where the backbone of a VPG-C card is: `override` (or $CHEETAH_BACKBONE_DIR) when given, else where it was
    trained (`backbone_abspath`), else the card's `backbone` relative to the working directory (a checkout moved
    elsewhere). None: the card names a preset without a directory. A directory that cannot be found is a clear
    error, not a stack trace from Hugging Face."""
    override = override or os.environ.get(BACKBONE_ENV)
    if override:
        if not Path(override).is_dir():
            raise DataError(f"backbone directory {override} (from {BACKBONE_ENV} or model_config) not found")
        return Path(override)
    for key in ("backbone_abspath", "backbone"):
        location = card.get(key)
        if location and Path(location).is_dir():
            return Path(location)
    if card.get("backbone_abspath") or "/" in str(card.get("backbone", "")):
        raise DataError(
            f"the VPG-C card says its backbone is at {card.get('backbone')!r} "
            f"(absolute: {card.get('backbone_abspath')!r}), which does not exist here; set {BACKBONE_ENV} "
            "(or model_config={'backbone_dir': ...}) to its directory")
    return None


class VPGCPyfunc(mlflow.pyfunc.PythonModel):
    """VPG-C as an MLflow pyfunc: artifacts `vpgc` (weights + card); the backbone is loaded from its recorded place.

    `predict(df)`: df has columns `instruction` (str; `<image>` placeholders optional) and `images` (list of image
    paths, or one path); returns a list of answers (greedy decoding; `params={"max_new_tokens": n}`)."""

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
        backbone_dir = resolve_backbone_dir(card, config.get("backbone_dir"))
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
            images = _as_paths(images, row)
            answers.append(answer_one(self.model, with_image_placeholders(str(instruction), len(images)), images,
                                      max_new_tokens=max_new_tokens))
        return answers


def _as_paths(images: Any, row: int) -> list[str]:
    if images is None:
        return []
    if isinstance(images, (str, os.PathLike)):
        return [str(images)]
    try:
        return [str(p) for p in list(images)]
    except TypeError:
        raise DataError(f"predict: row {row}: `images` must be a list of image paths, "
                        f"got {type(images).__name__}") from None


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


def lineage(root: str | Path = ".", stage: str = "register") -> dict[str, str]:
    """The lineage tags of a model produced in `root` (see the module docstring). Missing facts are "unknown"."""
    root = Path(root)
    tags: dict[str, str] = {}
    commit = _git(root, "rev-parse", "HEAD")
    tags["git_commit"] = commit or "unknown"
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    tags["git_dirty"] = "unknown" if status is None else str(bool(status)).lower()

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
    return float(node)


# ---------------------------------------------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------------------------------------------


def decide(challenger: float, champion: float | None, margin: float) -> tuple[bool, str]:
    """(promote?, why). Promote when there is no champion, or the challenger beats it by more than `margin`."""
    if champion is None:
        return True, "no champion yet"
    if not math.isfinite(challenger):
        return False, f"challenger's value {challenger} is not a finite number"
    if challenger > champion + margin:
        return True, f"{challenger:.4f} beats the champion's {champion:.4f} by more than the margin {margin}"
    return False, f"{challenger:.4f} does not beat the champion's {champion:.4f} by more than the margin {margin}"


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _log_model(vpgc_dir: Path, card: Mapping[str, Any], params: Params) -> Any:
    """Log the pyfunc (models from code: `cheetah/registry_model.py`) with the VPG-C weights + card as artifacts."""
    return mlflow.pyfunc.log_model(
        name=MODEL_NAME_IN_RUN,
        python_model=str(Path(__file__).with_name("registry_model.py")),  # models from code: no pickle
        artifacts={"vpgc": str(vpgc_dir)},
        pip_requirements=pip_requirements(),
        signature=_signature(params.evaluate.max_new_tokens),
        # Every key that `load(..., model_config=...)` may override must be logged (MLflow drops unknown ones).
        model_config={"max_new_tokens": params.evaluate.max_new_tokens, "backbone_dir": ""},
        metadata={"backbone": card.get("backbone"), "backbone_abspath": card.get("backbone_abspath"),
                  "backbone_fingerprint": card.get("backbone_fingerprint"), "requires": "the cheetah package"},
    )


def register(params: Params, metrics_path: str | Path | None = None, vpgc_dir: str | Path | None = None,
             out: str | Path = "metrics/register.json", root: str | Path = ".") -> dict[str, Any]:
    """Log and register the VPG-C model of `vpgc_dir` (default `train.out`), gate it, write the receipt `out`."""
    from mlflow.tracking import MlflowClient

    from cheetah.config import to_dict
    from cheetah.model.weights import CARD_FILE, WEIGHTS_FILE, read_card
    from cheetah.tracking import stage_run

    cfg = params.register
    root = Path(root)
    vpgc_dir = Path(vpgc_dir or params.train.out)
    metrics_path = Path(metrics_path or params.evaluate.metrics)
    for f in (WEIGHTS_FILE, CARD_FILE):
        if not (vpgc_dir / f).is_file():
            raise DataError(f"{vpgc_dir / f}: not found (register needs the trained VPG-C weights and card)")
    card = read_card(vpgc_dir)
    metrics = read_json(metrics_path)
    if not isinstance(metrics, Mapping):
        raise DataError(f"{metrics_path}: expected a JSON object of metrics")
    value = metric_value(metrics, cfg.metric, str(metrics_path))
    numbers = flat_metrics(metrics)
    # Headline numbers only (e.g. demon_average, demon.average, mme.perception): not per task, not the baselines.
    headline = {k: v for k, v in numbers.items() if k.count(".") <= 1 and not k.startswith("models.")}
    tags = {**lineage(root), "vpgc_sha256": str(card.get("sha256", "unknown")),
            "backbone": str(card.get("backbone")), "metric": cfg.metric,
            **{f"metric.{k}": repr(v) for k, v in headline.items()}}
    tags[f"metric.{cfg.metric}"] = repr(value)
    tags.update(config_tags(card))

    with stage_run("register", {"register": to_dict(cfg)}, experiment=cfg.experiment) as run:
        mlflow.set_tags({k: v for k, v in tags.items() if not k.startswith("metric.")})
        mlflow.log_metrics({k.replace("/", "_"): v for k, v in numbers.items()})
        if (root / "dvc.lock").is_file():
            mlflow.log_artifact(str(root / "dvc.lock"), artifact_path="lineage")
        with warnings.catch_warnings():
            # The predict method takes a DataFrame (no list[...] type hints) and the signature is given explicitly;
            # an input example would make MLflow load the model and generate at logging time.
            warnings.filterwarnings("ignore", message=".*type hint", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*input example", category=UserWarning)
            info = _log_model(vpgc_dir, card, params)
        client = MlflowClient()
        version = mlflow.register_model(info.model_uri, cfg.model_name, tags=tags)
        v = str(version.version)
        champion = _alias_version(client, cfg.model_name, CHAMPION)
        champion_value: float | None = None
        reason_override = None
        if champion is not None:
            recorded = champion.tags.get(f"metric.{cfg.metric}")
            try:
                champion_value = float(recorded) if recorded is not None else None
            except ValueError:
                champion_value = None
            if champion_value is None:
                reason_override = (f"the champion (version {champion.version}) has no recorded {cfg.metric!r}; "
                                   "it stays champion (move the alias by hand to override)")
        if reason_override is not None:
            promote, reason = False, reason_override
        else:
            promote, reason = decide(value, champion_value, cfg.margin)
        client.set_registered_model_alias(cfg.model_name, CHALLENGER, v)
        if promote:
            client.set_registered_model_alias(cfg.model_name, CHAMPION, v)
        client.set_model_version_tag(cfg.model_name, v, "gate", ("promoted: " if promote else "kept: ") + reason)
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
            "aliases": {CHALLENGER: int(v), CHAMPION: int(v) if promote else int(champion.version)},
            "tracking_uri": mlflow.get_tracking_uri(),  # the lineage tags are on the version itself
        }
    atomic_write_json(out, receipt)
    return receipt


def receipt_is_current(path: str | Path = "metrics/register.json", experiment: str = "cheetah",
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
    config = {"backbone_dir": str(backbone_dir)} if backbone_dir else None
    return mlflow.pyfunc.load_model(model_uri, model_config=config)


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
