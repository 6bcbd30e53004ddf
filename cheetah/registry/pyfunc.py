"""VPG-C as an MLflow model: the pyfunc that serves it, its backbone's whereabouts, and how it is logged.

The logged model carries its code (the `cheetah` package, as `code_paths`), pinned requirements, a signature and an
input example; its artifacts are only the VPG-C weights and card (`vpgc`). The backbone is found where the card
records it, where `CHEETAH_BACKBONE_DIR` says, or downloaded once from the copy logged to the tracking server at
registration (one copy per backbone weights digest): the model loads on a machine that has neither the project nor
the backbone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow.protos.databricks_pb2 import BAD_REQUEST, INTERNAL_ERROR

from cheetah.config import Params
from cheetah.io import DataError, check_finite_weights

log = logging.getLogger(__name__)

MODEL_NAME_IN_RUN = "vpgc"  # the model's name inside its registering run
BACKBONE_ENV = "CHEETAH_BACKBONE_DIR"
CACHE_ENV = "CHEETAH_CACHE"  # where downloaded backbones are kept (default ~/.cache/cheetah)
BACKBONE_RUN_TAG = "cheetah.backbone_sha256"  # the run holding a backbone's files as artifacts, by weights digest
IMAGE_ROOT_ENV = "CHEETAH_IMAGE_ROOT"
"""The one folder on the serving machine whose files a request may name as images (unset: none; a request sends
its images inline as data URIs, which is what `cheetah predict` does with local files)."""
_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pillow", "numpy", "pandas",
                 "pydantic", "pyyaml")


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


def check_backbone_digest(directory: str | Path, digest: str) -> None:
    """Refuse a backbone whose weights are not those the model was registered with (the version's `backbone_sha256`):
    wherever it was found (where it was trained, $CHEETAH_BACKBONE_DIR, the download cache), it must be that one."""
    from cheetah.model.weights import weights_digest

    found = weights_digest(directory)
    if found != digest:
        check_finite_weights(directory, "backbone weights")  # the more telling reason first, naming the file
        raise DataError(f"{directory}: the backbone's weights (digest {str(found)[:12]}…) are not those the model was "
                        f"registered with ({digest[:12]}…); set {BACKBONE_ENV} to the registered backbone")


def fetch_backbone(uri: str, digest: str) -> Path:
    """The backbone logged at `uri` (e.g. `runs:/<id>/backbone`), downloaded once into the cache and checked against
    the weights digest it was logged with."""
    import shutil
    import tempfile

    from cheetah.model.weights import weights_digest

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

    from cheetah.model.weights import weights_digest

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
        if backbone_dir is not None and remote["sha256"]:
            check_backbone_digest(backbone_dir, str(remote["sha256"]))
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
        root = os.environ.get(IMAGE_ROOT_ENV) or None
        answers = []
        for row, (instruction, images) in enumerate(zip(frame["instruction"], frame["images"])):
            try:
                images = _as_images(images, row, root)
                answers.append(answer_one(self.model, with_image_placeholders(str(instruction), len(images)), images,
                                          max_new_tokens=max_new_tokens))
            except DataError as e:
                raise RequestError(str(e)) from None
            except Exception:
                # A client gets one line; the traceback stays in the server's log.
                log.exception("predict: row %d", row)
                raise RequestError(f"predict: row {row}: the model failed to answer (the server's log has the "
                                   "details)", error_code=INTERNAL_ERROR) from None
        return answers


class RequestError(mlflow.exceptions.MlflowException, DataError):
    """A request the model refuses (bad row, image, or an internal failure), as MLflow's scoring server reports it:
    the message alone (HTTP 400, or 500 for a failure of the model), no stack trace; exit 2 on the command line."""

    def __init__(self, message: str, error_code: str = BAD_REQUEST):
        super().__init__(message, error_code=error_code)


DATA_URI = "data:image/"


def _as_images(images: Any, row: int, root: str | None) -> list[Any]:
    """A row's images: inline `data:image/...;base64,...` URIs (what a REST client sends), decoded to PIL images, or
    paths of files under `root` (`IMAGE_ROOT_ENV`) on the serving machine; any other path is refused."""
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
        elif root is None:
            raise DataError(f"predict: row {row}, image {k}: this model reads images sent in the request (data:image/"
                            f"...;base64 URIs), not files of the serving machine; set {IMAGE_ROOT_ENV} where it is "
                            "served to let it read the files of one folder")
        else:
            path = Path(root, item).resolve()
            if not path.is_relative_to(Path(root).resolve()):
                raise DataError(f"predict: row {row}, image {k}: {item}: outside the image folder {IMAGE_ROOT_ENV}")
            if not path.is_file():
                raise DataError(f"predict: row {row}, image {k}: {item}: image not found under {IMAGE_ROOT_ENV}")
            out.append(str(path))
    return out


def image_data_uri(path: str | Path) -> str:
    """A local image file as a data URI (how `cheetah predict` sends it: the model reads no path)."""
    import base64
    import mimetypes

    kind = (mimetypes.guess_type(str(path))[0] or "image/png").removeprefix("image/")
    return f"{DATA_URI}{kind};base64,{base64.b64encode(Path(path).read_bytes()).decode('ascii')}"


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


def log_model(vpgc_dir: Path, card: Mapping[str, Any], params: Params, backbone: Mapping[str, str] | None) -> Any:
    """Log the pyfunc (models from code: `cheetah/registry/served_model.py`) with the VPG-C weights + card as artifacts,
    the `cheetah` package itself as its code (so it serves where the project is not installed), pinned
    requirements, a signature with an input example, and the logged backbone's reference."""
    import shutil
    import tempfile

    import cheetah

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
        python_model=str(Path(__file__).with_name("served_model.py")),  # models from code: no pickle
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
