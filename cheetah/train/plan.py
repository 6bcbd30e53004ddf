"""How much memory a training run needs per rank, before anything is allocated: `cheetah train --plan`.

The model is built on the meta device (shapes only: no weights, no memory, seconds even for 7B), so parameter counts
are exact for the preset or checkpoint directory. Memory is then estimated per rank for the chosen world size, ZeRO
stage, precision, offload (from the merged DeepSpeed config) and gradient checkpointing:

- frozen weights: the backbone in `model.dtype` (the Q-Former in fp32 under fp16, as Hugging Face loads it); replicated
  under ZeRO 0-2, partitioned under ZeRO-3 (DeepSpeed partitions every parameter of the module) plus the gathered
  working set (at most `stage3_max_live_parameters`);
- VPG-C's trainable parameters, gradients and AdamW states, partitioned as the ZeRO paper counts them (16-bit
  weights and gradients plus 12 bytes of fp32 master weights and moments per parameter under bf16/fp16; 16 bytes in
  fp32); optimiser states on the host with `offload_optimizer`;
- DeepSpeed's gradient-reduction buffers (`reduce_bucket_size` elements per step, twice with `overlap_comm`);
- activations kept for backward, per micro-batch (the synthetic and caption forwards of a micro-batch share one
  backward): the LLM layers above `update_layer` (below it nothing needs gradients), the Q-Former re-run over every
  image (its queries carry gradients), the LM head at the response tokens, and the cached features or the ViT
  forward. Per token per upper layer: `e*(2h + 4i) + 10h` bytes (e: bytes of `model.dtype`; h, i: hidden and MLP
  sizes), `e*h + 2h` with checkpointing plus one layer recomputed; per Q-Former query per layer
  `q*(6d + i_q + heads*Q)`, plus `q*heads*P` in cross-attention layers (q: bytes of the Q-Former's dtype). These coefficients were calibrated on
  saved-tensor bytes measured on a CPU (tests/test_plan.py checks them); a GPU with flash attention saves a
  similar set, and keeps no L x L attention matrices (assumed here).

Not counted: the CUDA context and allocator fragmentation (typically 0.5-2 GB), and the caching allocator's slack.
The GPU check (benchmarks/gpu_checks.sh) prints this estimate next to the measured peak.
"""

from __future__ import annotations

from typing import Any

GB = 2**30


def _numel(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def activation_bytes_per_token_layer(hidden: int, intermediate: int, elem: int, checkpointing: bool) -> int:
    """Bytes an upper LLM layer keeps for backward per token (see the module docstring for the calibration)."""
    if checkpointing:
        return elem * hidden + 2 * hidden
    return elem * (2 * hidden + 4 * intermediate) + 10 * hidden


def qformer_bytes_per_image(num_queries: int, layers: int, hidden: int, intermediate: int, heads: int,
                            patches: int, cross_layers: int, elem: int) -> int:
    """Bytes the Q-Former re-run (in `elem`-byte precision) keeps for backward per image."""
    per_layer = elem * (6 * hidden + intermediate + heads * num_queries)
    return num_queries * (layers * per_layer + cross_layers * elem * heads * patches)


def plan_memory(params: Any, world: int = 1, lengths: tuple[int, int] = (128, 64), response_tokens: int = 32
                ) -> dict[str, Any]:
    """The estimate as a JSON-able dict (GB per rank and on the host per rank), with the counts it rests on."""
    from cheetah.model.backbones import load_backbone
    from cheetah.model.vpgc import VPGCModel
    from cheetah.train import distributed
    from cheetah.train.vpgc import micro_batch_size

    cfg, model_cfg = params.train, params.model
    micro_batch_size(cfg, world)  # refuses batches that do not split over `world`
    backbone = load_backbone(model_cfg.preset, device="meta", backbone_dir=model_cfg.backbone_dir,
                             template=model_cfg.template)
    model = VPGCModel(backbone, update_layer=model_cfg.update_layer)
    hf = model.backbone
    text, vision, qformer = hf.config.text_config, hf.config.vision_config, hf.config.qformer_config
    counts = {"vision": _numel(hf.vision_model), "qformer": _numel(hf.qformer) + hf.query_tokens.numel(),
              "projection": _numel(hf.language_projection), "language_model": _numel(hf.language_model),
              "vpgc_trainable": _numel(model.vpgc)}
    trainable = counts["vpgc_trainable"]
    ds = distributed.deepspeed_config(
        micro_batch=1, accumulation=cfg.gradient_accumulation, zero_stage=cfg.zero_stage, precision=cfg.precision,
        grad_clip=cfg.grad_clip, persist_numel=1, bucket_numel=trainable, world=world, user=cfg.deepspeed_config)
    zero = ds["zero_optimization"]
    offload_optimizer = (zero.get("offload_optimizer") or {}).get("device", "none") not in (None, "none")
    offload_param = (zero.get("offload_param") or {}).get("device", "none") not in (None, "none")
    stage = cfg.zero_stage

    # -- weights -------------------------------------------------------------------------------------------
    elem = _bytes(model_cfg.dtype)
    qformer_elem = 4 if model_cfg.dtype == "float16" else elem  # (Hugging Face keeps it fp32 under fp16 only)
    mixed = cfg.precision != "fp32"
    frozen = ((counts["vision"] + counts["projection"] + counts["language_model"]) * elem
              + counts["qformer"] * qformer_elem)
    gpu: dict[str, float] = {}
    host: dict[str, float] = {}
    if stage == 3:
        live = min(int(zero.get("stage3_max_live_parameters", 1e9)), sum(counts.values()) - trainable) * elem
        (host if offload_param else gpu)["frozen_weights"] = frozen / world
        gpu["gathered_weights"] = live
    else:
        gpu["frozen_weights"] = frozen

    # -- VPG-C: weights, gradients, optimiser (ZeRO paper: 2 + 2 + 12 bytes mixed, 4 + 4 + 8 in fp32) ---------
    w_b, g_b, o_b = (2, 2, 12) if mixed else (4, 4, 8)
    gpu["trainable_weights"] = trainable * w_b / (world if stage == 3 else 1)
    gpu["gradients"] = trainable * g_b / (world if stage >= 2 else 1)
    (host if offload_optimizer else gpu)["optimizer_states"] = trainable * o_b / (world if stage >= 1 else 1)
    if stage in (1, 2) and zero.get("contiguous_gradients", True):
        buffers = 2 if zero.get("overlap_comm", False) else 1
        gpu["reduction_buffers"] = int(zero.get("reduce_bucket_size", 5e8)) * buffers * (4 if stage == 1 else g_b)

    # -- activations of one micro-batch (synthetic + caption forwards, one backward) ---------------------------
    parts = world * cfg.gradient_accumulation
    syn, cap = cfg.synthetic_batch // parts, cfg.caption_batch // parts
    tokens = syn * lengths[0] + cap * lengths[1]
    images = 2 * syn + cap
    upper = text.num_hidden_layers - model.update_layer
    h, i = text.hidden_size, text.intermediate_size if hasattr(text, "intermediate_size") else text.ffn_dim
    per_token = activation_bytes_per_token_layer(h, i, elem, cfg.gradient_checkpointing)
    gpu["llm_activations"] = tokens * upper * per_token
    if cfg.gradient_checkpointing:  # one layer's activations, recomputed in backward
        gpu["llm_activations"] += tokens * activation_bytes_per_token_layer(h, i, elem, False)
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    gpu["qformer_activations"] = images * qformer_bytes_per_image(
        hf.config.num_query_tokens, qformer.num_hidden_layers, qformer.hidden_size, qformer.intermediate_size,
        qformer.num_attention_heads, patches, -(-qformer.num_hidden_layers // qformer.cross_attention_frequency),
        qformer_elem)
    gpu["lm_head_logits"] = (syn + cap) * response_tokens * text.vocab_size * 4
    feature_elem = elem if cfg.feature_dtype == "auto" else _bytes(cfg.feature_dtype)
    gpu["vision_features"] = images * patches * vision.hidden_size * feature_elem
    if cfg.feature_cache is None:  # the frozen ViT runs on the step's images: one layer's working set at a time
        gpu["vit_forward"] = images * patches * (4 * vision.hidden_size + vision.intermediate_size) * elem
    gpu["llm_forward_working_set"] = tokens * (4 * h + 2 * i) * elem  # the layer being computed, no grad

    return {
        "preset": model_cfg.preset,
        "world_size": world,
        "zero_stage": stage,
        "precision": cfg.precision,
        "model_dtype": model_cfg.dtype,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "offload_optimizer": offload_optimizer,
        "offload_param": offload_param,
        "feature_cache": cfg.feature_cache,
        "micro_batch_per_rank": {"synthetic": syn, "caption": cap, "tokens": tokens, "images": images,
                                 "lengths": list(lengths), "response_tokens": response_tokens},
        "parameters": counts,
        "per_rank_gb": {k: round(v / GB, 3) for k, v in gpu.items()} | {"total": round(sum(gpu.values()) / GB, 2)},
        "host_per_rank_gb": {k: round(v / GB, 3) for k, v in host.items()} | {"total": round(sum(host.values()) / GB,
                                                                                               2)},
        "not_counted": "CUDA context and allocator slack (typically 0.5-2 GB per GPU)",
    }
