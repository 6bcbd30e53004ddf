"""`cheetah train --plan`: exact parameter counts from a meta-device build, memory that follows ZeRO stage, world
size, offload and checkpointing, and activation coefficients checked against the bytes a real forward pass saves
for backward (CPU, the `mini` preset, which has the 7B layer proportions)."""

from __future__ import annotations

import json

import pytest
import torch

from cheetah.config import load_params
from cheetah.model.backbones import PRESETS, build_backbone
from cheetah.model.vpgc import VPGCModel
from cheetah.train.plan import GB, activation_bytes_per_token_layer, plan_memory, qformer_bytes_per_image


def _params(**train):
    overrides = ["model.preset=vicuna-7b", "model.backbone_dir=null", "model.dtype=bfloat16", "train.precision=bf16",
                 "train.feature_cache=null", *(f"train.{k}={json.dumps(v)}" for k, v in train.items())]
    return load_params(None, overrides)


def test_plan_counts_are_the_models_and_memory_follows_the_settings():
    base = plan_memory(_params(synthetic_batch=24, caption_batch=64, gradient_checkpointing=False, zero_stage=2))
    p = base["parameters"]
    assert p["vpgc_trainable"] == 6_320_896  # the paper's "about 6.3M"
    frozen_bytes = (p["vision"] + p["projection"] + p["language_model"] + p["qformer"]) * 2  # bf16, all of it
    assert base["per_rank_gb"]["frozen_weights"] == round(frozen_bytes / GB, 3)
    ckpt = plan_memory(_params(gradient_checkpointing=True))
    assert ckpt["per_rank_gb"]["llm_activations"] < base["per_rank_gb"]["llm_activations"] / 4
    two = plan_memory(_params(gradient_checkpointing=True), world=2)
    assert two["micro_batch_per_rank"]["tokens"] == ckpt["micro_batch_per_rank"]["tokens"] // 2
    zero3 = plan_memory(_params(gradient_checkpointing=True, zero_stage=3), world=2)
    assert zero3["per_rank_gb"]["frozen_weights"] == pytest.approx(two["per_rank_gb"]["frozen_weights"] / 2, abs=1e-3)
    assert "vit_forward" in base["per_rank_gb"]  # features not cached: the ViT runs in the step


def test_offload_from_the_users_deepspeed_config_moves_optimizer_states_to_the_host(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    plan = plan_memory(_params(deepspeed_config=str(user)))
    assert plan["offload_optimizer"] and "optimizer_states" in plan["host_per_rank_gb"]
    assert "optimizer_states" not in plan["per_rank_gb"]


def test_counts_of_a_small_preset_equal_the_built_model():
    from conftest import make_tokenizer

    params = load_params(None, ["model.preset=mini", "model.backbone_dir=null"])
    plan = plan_memory(params)
    real = VPGCModel(build_backbone("mini", tokenizer=make_tokenizer()))
    assert plan["parameters"]["vpgc_trainable"] == sum(p.numel() for p in real.vpgc.parameters())
    assert plan["parameters"]["language_model"] == sum(p.numel() for p in real.backbone.language_model.parameters())


def _saved_bytes(model: VPGCModel, batch: dict, features: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward (parameters excluded: they exist anyway)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch, vision_features=features, return_sample_losses=True).sample_losses.sum()
    return sum(seen.values())


@pytest.mark.parametrize("dtype,checkpointing", [("float32", False), ("bfloat16", False), ("bfloat16", True)])
def test_activation_coefficients_match_what_a_forward_pass_saves(dtype, checkpointing):
    from conftest import make_tokenizer

    torch.manual_seed(0)
    model = VPGCModel(build_backbone("mini", tokenizer=make_tokenizer(), dtype=getattr(torch, dtype)))
    if checkpointing:
        model.enable_gradient_checkpointing()
    n, length, target, images = 4, 160, 24, 2
    nq = model.num_query_tokens
    ids = torch.randint(10, 200, (n, length))
    for k in range(images):
        ids[:, 1 + k * (nq + 2):1 + k * (nq + 2) + nq] = model.image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, -target:] = ids[:, -target:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "guide_positions": torch.full((n,), length - target - 1)}
    vision, qformer, text = (getattr(model.backbone.config, f"{k}_config") for k in ("vision", "qformer", "text"))
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    features = torch.randn(n * images, patches, vision.hidden_size).to(getattr(torch, dtype))
    measured = _saved_bytes(model, batch, features)
    elem = 4 if dtype == "float32" else 2
    upper = text.num_hidden_layers - model.update_layer
    expected = (n * length * upper * activation_bytes_per_token_layer(text.hidden_size, text.intermediate_size,
                                                                      elem, checkpointing)
                + n * images * qformer_bytes_per_image(nq, qformer.num_hidden_layers, qformer.hidden_size,
                                                       qformer.intermediate_size, qformer.num_attention_heads,
                                                       patches, 1, elem)
                + n * target * text.vocab_size * 4)
    assert measured == pytest.approx(expected, rel=0.15), (measured, expected)
    assert PRESETS["mini"].text["intermediate_size"] / PRESETS["mini"].text["hidden_size"] == pytest.approx(
        PRESETS["vicuna-7b"].text["intermediate_size"] / PRESETS["vicuna-7b"].text["hidden_size"], rel=1e-3)
