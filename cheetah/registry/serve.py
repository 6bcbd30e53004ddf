"""Serving a registered model: `cheetah predict`, `cheetah serve`, or `load(...).predict(df)` from Python.

Every way in goes through `load_verified` (or `serving_copy`): the version's files are downloaded into a local folder
and checked against what was registered (`cheetah.registry.integrity`) before MLflow reads a byte of them, and MLflow
then loads that checked copy, never the store's files again.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow

from cheetah.io import DataError
from cheetah.registry.integrity import verified_copy


def serving_copy(model_uri: str) -> Path:
    """A checked local copy of the registered model `model_uri` (`verified_copy`), removed when this process ends
    (the loaded model imports its code from it as it goes)."""
    folder = tempfile.mkdtemp(prefix="cheetah-model-")
    atexit.register(shutil.rmtree, folder, True)
    return verified_copy(model_uri, folder)


def load(model_uri: str, backbone_dir: str | Path | None = None) -> Any:
    """`mlflow.pyfunc.load_model` of a registered version (`models:/<name>/<version>` or `models:/<name>@<alias>`)
    after checking its files against its registration; the backbone directory overridden when given."""
    from mlflow.exceptions import MlflowException

    config = {"backbone_dir": str(backbone_dir)} if backbone_dir else None
    local = serving_copy(model_uri)
    try:
        return mlflow.pyfunc.load_model(str(local), model_config=config)
    except MlflowException as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{model_uri}: cannot load it ({first})") from None


def predict(model_uri: str, instruction: str, images: Sequence[str | Path],
            backbone_dir: str | Path | None = None, max_new_tokens: int | None = None) -> str:
    """One answer from a registered model (e.g. `models:/cheetah-vpgc@champion`). The local image files are sent
    to the model inline, as a REST client sends them (the served model reads no path)."""
    import pandas as pd

    from cheetah.registry.pyfunc import image_data_uri

    for image in images:
        if not Path(image).is_file():
            raise DataError(f"{image}: image not found")
    model = load(model_uri, backbone_dir)
    frame = pd.DataFrame({"instruction": [instruction], "images": [[image_data_uri(p) for p in images]]})
    params = {"max_new_tokens": int(max_new_tokens)} if max_new_tokens else None
    return model.predict(frame, params=params)[0]


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 5001) -> int:
    """`mlflow models serve` (MLflow's REST scoring server, in this environment) on a checked copy of the registered
    model: a version whose files are not those registered never starts. Returns the server's exit status."""
    local = serving_copy(model_uri)
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(local), "--env-manager", "local",
               "--host", host, "--port", str(port)]
    return subprocess.run(command, check=False).returncode
