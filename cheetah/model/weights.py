"""VPG-C weights on disk: `vpgc.safetensors` (the ~6.3M trainable tensors only) plus a small JSON card.

The card records what the weights fit — the backbone (preset or path, architecture fingerprint), the update layer,
the number of queries and the hidden sizes — and the SHA-256 of the weights file. Loading into a backbone that
differs fails with a message listing every difference: the official code's `load_state_dict(strict=False)` is why
its users got garbage output without an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cheetah.io import DataError, atomic_dir, sha256_file

WEIGHTS_FILE = "vpgc.safetensors"
CARD_FILE = "vpgc.json"
FORMAT_VERSION = 1


class IncompatibleWeights(ValueError):
    """VPG-C weights that do not fit the backbone they are being loaded into."""


def card_for(model: Any) -> dict[str, Any]:
    """The compatibility facts of a VPGCModel (everything but the hashes)."""
    cfg = model.backbone.config
    return {
        "format_version": FORMAT_VERSION,
        "backbone": model.backbone_info.source,
        "backbone_abspath": _abspath_if_dir(model.backbone_info.source),
        "backbone_fingerprint": model.backbone_info.fingerprint(),
        "backbone_class": type(model.backbone).__name__,
        # How the backbone's weights came about (its cheetah_backbone.json), and whether they were random weights
        # built in the training process, which exist nowhere else: such VPG-C weights are for planning and
        # benchmarks, not for registration.
        "backbone_init": model.backbone_info.init,
        "random_backbone": model.backbone_info.random_weights,
        "template": model.backbone_info.template.name,
        "update_layer": model.update_layer,
        "num_llm_layers": cfg.text_config.num_hidden_layers,
        "num_query_tokens": model.num_query_tokens,
        "llm_hidden_size": cfg.text_config.hidden_size,
        "qformer_hidden_size": cfg.qformer_config.hidden_size,
    }


def _abspath_if_dir(source: str) -> str | None:
    return str(Path(source).resolve()) if Path(source).is_dir() else None


def save_vpgc(model: Any, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
              extra: dict[str, Any] | None = None) -> Path:
    """Write the VPG-C weights and card atomically. Pass `state_dict` when it had to be gathered (ZeRO-3)."""
    state = state_dict if state_dict is not None else model.vpgc.state_dict()
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        card = {
            **card_for(model),
            "tensors": {k: list(v.shape) for k, v in tensors.items()},
            "sha256": sha256_file(tmp / WEIGHTS_FILE),
            **(extra or {}),
        }
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return Path(directory)


def read_card(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    card_path = directory / CARD_FILE
    if not card_path.exists():
        raise DataError(f"{card_path}: no VPG-C card (expected {CARD_FILE} next to {WEIGHTS_FILE})")
    try:
        return json.loads(card_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{card_path}: malformed JSON: {e.msg}") from None


def check_compatible(card: dict[str, Any], model: Any, *, check_backbone: bool = True) -> list[str]:
    """Every way the weights' card differs from `model` (empty: compatible)."""
    have = card_for(model)
    keys = ["update_layer", "num_query_tokens", "llm_hidden_size", "qformer_hidden_size", "num_llm_layers",
            "backbone_class"]
    if check_backbone:
        keys.append("backbone_fingerprint")
    return [f"{k}: weights were trained with {card.get(k)!r}, this backbone has {have[k]!r}"
            for k in keys if card.get(k) != have[k]]


def load_vpgc(model: Any, directory: str | Path, *, check_backbone: bool = True) -> dict[str, Any]:
    """Load VPG-C weights into `model.vpgc`, refusing anything that does not fit. Returns the card.

    `check_backbone=False` allows a backbone with the same shapes but a different architecture fingerprint (e.g.
    a re-saved copy with another dtype); shapes, layer and query count are always checked.
    """
    directory = Path(directory)
    card = read_card(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.exists():
        raise DataError(f"{weights}: VPG-C weights file not found")
    if card.get("sha256") and sha256_file(weights) != card["sha256"]:
        raise DataError(f"{weights}: SHA-256 differs from the card's; the file is corrupt or was replaced")
    problems = check_compatible(card, model, check_backbone=check_backbone)
    if problems:
        raise IncompatibleWeights(f"{directory}: VPG-C weights do not fit this backbone ({model.backbone_info.source}):"
                                  "\n  " + "\n  ".join(problems))
    state = load_file(str(weights))
    expected = model.vpgc.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise IncompatibleWeights(f"{weights}: missing {missing}, unexpected {unexpected}, mis-shaped {shapes}")
    model.vpgc.load_state_dict(state, strict=True)
    return card
