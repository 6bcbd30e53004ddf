"""VPG-C weights on disk: `vpgc.safetensors` (the ~6.3M trainable tensors only) plus a small JSON card.

The card records what the weights fit — the backbone (preset or path, architecture fingerprint), the update layer,
the number of queries and the hidden sizes — and the SHA-256 of the weights file. Loading into a backbone that
differs fails with a message listing every difference: the official code's `load_state_dict(strict=False)` is why
its users got garbage output without an error.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cheetah.errors import CheetahError
from cheetah.io import DataError, atomic_dir, sha256_file

WEIGHTS_FILE = "vpgc.safetensors"
CARD_FILE = "vpgc.json"
FORMAT_VERSION = 1
VPGC_KIND = "VPG-C weights"  # the kind of output folder save_vpgc writes (cheetah.io.atomic_dir)


class IncompatibleWeights(CheetahError, ValueError):
    """VPG-C weights that do not fit the backbone they are being loaded into."""


_HASH_WHOLE_LIMIT = 2 << 30  # weight files up to 2 GiB are hashed whole; larger ones by size + head + tail
_PARTIAL = 16 << 20


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    if size <= _HASH_WHOLE_LIMIT:
        return sha256_file(path)
    h = hashlib.sha256(f"size={size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(_PARTIAL))
        f.seek(size - _PARTIAL)
        h.update(f.read(_PARTIAL))
    return "partial:" + h.hexdigest()


def weights_digest(directory: str | Path) -> str | None:
    """SHA-256 over a Hugging Face directory's weight files (names and contents); None without any."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{_file_digest(p)}\n".encode())
    return h.hexdigest()


def card_for(model: Any, trained_template: str | None = None) -> dict[str, Any]:
    """The compatibility facts of a VPGCModel (everything but the hashes).

    `template` is the chat rendering to use the weights with (evaluation, serving); `trained_template` the one
    they were trained with: the same for weights trained here, and for the imported official release the training
    configs' `prompt_template` rendering (`vicuna-train` / `llama2-train`), while `template` is the official
    inference rendering the released checkpoints were evaluated with (see cheetah/model/prompts.py)."""
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
        "trained_template": trained_template or model.backbone_info.template.name,
        "update_layer": model.update_layer,
        "num_llm_layers": cfg.text_config.num_hidden_layers,
        "num_query_tokens": model.num_query_tokens,
        "llm_hidden_size": cfg.text_config.hidden_size,
        "qformer_hidden_size": cfg.qformer_config.hidden_size,
    }


def _abspath_if_dir(source: str) -> str | None:
    return str(Path(source).resolve()) if Path(source).is_dir() else None


def save_vpgc(model: Any, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
              extra: dict[str, Any] | None = None, trained_template: str | None = None, *,
              protect: Iterable[str | Path] = ()) -> Path:
    """Write the VPG-C weights and card atomically. Pass `state_dict` when it had to be gathered (ZeRO-3). An
    existing folder is replaced only if it holds earlier VPG-C weights (`cheetah.io.check_output`)."""
    state = state_dict if state_dict is not None else model.vpgc.state_dict()
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    with atomic_dir(directory, kind=VPGC_KIND, protect=protect) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        card = {
            **card_for(model, trained_template),
            "tensors": {k: list(v.shape) for k, v in tensors.items()},
            "sha256": sha256_file(tmp / WEIGHTS_FILE),
            **(extra or {}),
        }
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return Path(directory)


REQUIRED_CARD_FIELDS = ("backbone", "backbone_fingerprint", "backbone_class", "template", "update_layer",
                        "num_llm_layers", "num_query_tokens", "llm_hidden_size", "qformer_hidden_size", "sha256")


def read_card(directory: str | Path) -> dict[str, Any]:
    """The card of a VPG-C weights folder; a missing, malformed or incomplete card is a DataError naming the field."""
    directory = Path(directory)
    card_path = directory / CARD_FILE
    if not card_path.exists():
        raise DataError(f"{card_path}: no VPG-C card (expected {CARD_FILE} next to {WEIGHTS_FILE})")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{card_path}: malformed JSON: {e}") from None
    if not isinstance(card, dict):
        raise DataError(f"{card_path}: expected a JSON object")
    missing = [f for f in REQUIRED_CARD_FIELDS if f not in card]
    if missing:
        raise DataError(f"{card_path}: missing field(s) {missing} (not a card written by `cheetah train`)")
    return card


def check_compatible(card: dict[str, Any], model: Any, *, check_backbone: bool = True) -> list[str]:
    """Every way the weights' card differs from `model` (empty: compatible)."""
    have = card_for(model)
    keys = ["update_layer", "num_query_tokens", "llm_hidden_size", "qformer_hidden_size", "num_llm_layers",
            "backbone_class"]
    if check_backbone:
        keys.append("backbone_fingerprint")
    return [f"{k}: weights were trained with {card.get(k)!r}, this backbone has {have[k]!r}"
            for k in keys if card.get(k) != have[k]]


def checked_state(directory: str | Path, model: Any, *, check_backbone: bool = True
                  ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The card and tensors of a VPG-C weights folder, after every check that they fit `model` (which may live on
    the meta device): the file's hash against the card, the card against the backbone, names and shapes of the
    tensors against `model.vpgc`, and every value finite. Anything else raises DataError / IncompatibleWeights."""
    from safetensors import SafetensorError

    directory = Path(directory)
    card = read_card(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.exists():
        raise DataError(f"{weights}: VPG-C weights file not found")
    if sha256_file(weights) != card["sha256"]:
        raise DataError(f"{weights}: SHA-256 differs from the card's; the file is corrupt or was replaced")
    problems = check_compatible(card, model, check_backbone=check_backbone)
    if problems:
        raise IncompatibleWeights(f"{directory}: VPG-C weights do not fit this backbone ({model.backbone_info.source}):"
                                  "\n  " + "\n  ".join(problems))
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise DataError(f"{weights}: not a readable safetensors file ({e})") from None
    expected = model.vpgc.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise IncompatibleWeights(f"{weights}: missing {missing}, unexpected {unexpected}, mis-shaped {shapes}")
    nonfinite = [k for k, v in sorted(state.items()) if not torch.isfinite(v).all()]
    if nonfinite:
        raise DataError(f"{weights}: tensor(s) {nonfinite[:5]} hold NaN or infinite values (a diverged run)")
    return card, state


def load_vpgc(model: Any, directory: str | Path, *, check_backbone: bool = True) -> dict[str, Any]:
    """Load VPG-C weights into `model.vpgc`, refusing anything that does not fit (`checked_state`). Returns the card.

    `check_backbone=False` allows a backbone with the same shapes but a different architecture fingerprint (e.g.
    a re-saved copy with another dtype); shapes, layer and query count are always checked.
    """
    card, state = checked_state(directory, model, check_backbone=check_backbone)
    model.vpgc.load_state_dict(state, strict=True)
    return card
