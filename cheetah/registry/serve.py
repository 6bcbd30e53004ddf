"""Serving a registered model: `cheetah predict`, or `load(...).predict(df)` from Python."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow

from cheetah.io import DataError


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
