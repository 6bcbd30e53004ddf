"""Import of the official Cheetah release into a Hugging Face backbone directory plus VPG-C weights.

Inputs (all local files; `torch.load(weights_only=True)`, so no pickled code ever runs):
- the released Cheetah `.pth`: a dict whose `model` entry holds `llama_proj.{weight,bias}` (the frozen 768->4096
  first-pass projection) and the VPG-C tensors `llama_model.model.{qformer_proj,llm_proj}.{weight,bias}` and
  `llama_model.model.query_tokens`;
- LAVIS `eva_vit_g.pth`: the EVA ViT-g state dict (LAVIS builds 39 of its 40 blocks and drops the rest);
- LAVIS `blip2_pretrained_flant5xxl.pth` (a dict with a `model` entry): the BLIP-2 Q-Former, its query tokens and
  `ln_vision`, plus parts Cheetah does not use (the T5 projection, the Q-Former's text branch and heads);
- a LLaMA / Vicuna directory in Hugging Face format (weights, config, tokenizer).

Every key is accounted for: a key is either mapped, or dropped because the official model drops it too (listed
below with the reason). Unknown, missing or mis-shaped keys stop the import and are all listed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration, LlamaForCausalLM

from cheetah.io import DataError
from cheetah.model.backbones import Backbone, _image_processor, save_backbone
from cheetah.model.prompts import IMAGE_TOKEN, TEMPLATES


class ImportErrorReport(ValueError):
    """The official files do not map cleanly; the message lists every problem key."""


# -- key maps ------------------------------------------------------------------------------------------------------

_EVA_BLOCK = {
    "norm1.weight": "layer_norm1.weight", "norm1.bias": "layer_norm1.bias",
    "norm2.weight": "layer_norm2.weight", "norm2.bias": "layer_norm2.bias",
    "attn.qkv.weight": "self_attn.qkv.weight",
    "attn.proj.weight": "self_attn.projection.weight", "attn.proj.bias": "self_attn.projection.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_EVA_TOP = {
    "cls_token": "vision_model.embeddings.class_embedding",
    "pos_embed": "vision_model.embeddings.position_embedding",
    "patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
}
# LAVIS BertLayer -> HF Blip2QFormerLayer (only the query branch: Cheetah deletes the text FFN).
_QFORMER_LAYER = [
    (r"attention\.self\.(query|key|value)\.(weight|bias)", r"attention.attention.\1.\2"),
    (r"attention\.output\.(dense|LayerNorm)\.(weight|bias)", r"attention.output.\1.\2"),
    (r"crossattention\.self\.(query|key|value)\.(weight|bias)", r"crossattention.attention.\1.\2"),
    (r"crossattention\.output\.(dense|LayerNorm)\.(weight|bias)", r"crossattention.output.\1.\2"),
    (r"intermediate_query\.dense\.(weight|bias)", r"intermediate_query.dense.\1"),
    (r"output_query\.(dense|LayerNorm)\.(weight|bias)", r"output_query.\1.\2"),
]
# Keys of the BLIP-2 checkpoint that the official Cheetah model removes or never uses, with the reason.
_QFORMER_DROPPED = [
    (r"Qformer\.cls\..*", "Q-Former LM head (Cheetah sets Qformer.cls = None)"),
    (r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\..*", "Q-Former text embeddings (removed)"),
    (r"Qformer\.bert\.embeddings\.position_ids", "buffer"),
    (r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.(dense|LayerNorm)\..*", "Q-Former text FFN (removed)"),
    (r"(t5_proj|opt_proj|llm_proj|vision_proj|text_proj|itm_head)\..*", "BLIP-2 heads for other LLMs / stage 1"),
    (r"temp", "stage-1 contrastive temperature"),
    (r"visual_encoder\..*", "ViT weights come from eva_vit_g.pth"),
]
_CHEETAH_KEYS = {
    "llama_proj.weight": "language_projection.weight",
    "llama_proj.bias": "language_projection.bias",
}
_VPGC_KEYS = {
    "llama_model.model.query_tokens": "query_tokens",
    "llama_model.model.qformer_proj.weight": "qformer_proj.weight",
    "llama_model.model.qformer_proj.bias": "qformer_proj.bias",
    "llama_model.model.llm_proj.weight": "llm_proj.weight",
    "llama_model.model.llm_proj.bias": "llm_proj.bias",
}


def _load_pth(path: str | Path, what: str, entry: str | None) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: {what} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file, or one that needs arbitrary unpickling
        raise DataError(f"{path}: cannot read {what} as a weights-only torch file: {e}") from None
    if entry is not None and isinstance(obj, dict) and entry in obj and isinstance(obj[entry], dict):
        obj = obj[entry]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"{path}: {what} is not a state dict of tensors"
                        + (f" (nor a dict with a {entry!r} state dict)" if entry else ""))
    return obj


def map_eva(state: dict[str, torch.Tensor], depth: int) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """EVA ViT-g keys -> HF `vision_model.*`. Returns (mapped, dropped, unknown)."""
    mapped, dropped, unknown = {}, [], []
    qv_bias: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in _EVA_TOP:
            mapped[_EVA_TOP[key]] = value
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if m and (m.group(2) in _EVA_BLOCK or m.group(2) in ("attn.q_bias", "attn.v_bias")):
            if int(m.group(1)) >= depth:
                dropped.append(f"{key} (LAVIS builds ViT-g with {depth} blocks)")
            elif m.group(2) in _EVA_BLOCK:
                mapped[f"vision_model.encoder.layers.{m.group(1)}.{_EVA_BLOCK[m.group(2)]}"] = value
            else:
                qv_bias.setdefault(m.group(1), {})[m.group(2)[5]] = value
            continue
        unknown.append(key)
    # EVA keeps separate q and v biases and no k bias; HF holds them as one qkv bias with zeros for k.
    for block, parts in qv_bias.items():
        if set(parts) != {"q", "v"}:
            unknown.append(f"blocks.{block}.attn: q_bias and v_bias must come together (found {sorted(parts)})")
            continue
        mapped[f"vision_model.encoder.layers.{block}.self_attn.qkv.bias"] = torch.cat(
            [parts["q"], torch.zeros_like(parts["v"]), parts["v"]])
    return mapped, dropped, unknown


def map_blip2(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """LAVIS BLIP-2 checkpoint keys -> HF `qformer.*`, `query_tokens`, `vision_model.post_layernorm.*`."""
    mapped, dropped, unknown = {}, [], []
    for key, value in state.items():
        if key in ("ln_vision.weight", "ln_vision.bias"):
            mapped[key.replace("ln_vision", "vision_model.post_layernorm")] = value
            continue
        if key == "query_tokens":
            mapped["query_tokens"] = value
            continue
        if key in ("Qformer.bert.embeddings.LayerNorm.weight", "Qformer.bert.embeddings.LayerNorm.bias"):
            mapped[key.replace("Qformer.bert.embeddings.LayerNorm", "qformer.layernorm")] = value
            continue
        m = re.fullmatch(r"Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)", key)
        if m:
            for pattern, repl in _QFORMER_LAYER:
                if re.fullmatch(pattern, m.group(2)):
                    mapped[f"qformer.encoder.layer.{m.group(1)}.{re.sub(pattern, repl, m.group(2))}"] = value
                    break
            else:
                reason = _dropped_reason(key)
                (dropped.append(f"{key} ({reason})") if reason else unknown.append(key))
            continue
        reason = _dropped_reason(key)
        (dropped.append(f"{key} ({reason})") if reason else unknown.append(key))
    return mapped, dropped, unknown


def _dropped_reason(key: str) -> str | None:
    for pattern, reason in _QFORMER_DROPPED:
        if re.fullmatch(pattern, key):
            return reason
    return None


def map_cheetah(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Cheetah checkpoint -> (backbone keys, VPG-C keys, unknown)."""
    backbone, vpgc, unknown = {}, {}, []
    for key, value in state.items():
        if key in _CHEETAH_KEYS:
            backbone[_CHEETAH_KEYS[key]] = value
        elif key in _VPGC_KEYS:
            vpgc[_VPGC_KEYS[key]] = value
        else:
            unknown.append(key)
    return backbone, vpgc, unknown


def _infer_config(eva: dict[str, torch.Tensor], blip2: dict[str, torch.Tensor], llm_config: Any,
                  image_token_index: int, vocab_size: int) -> Blip2Config:
    """Shapes come from the tensors themselves, so the same code imports the real 7B files and tiny test files."""
    width = eva["cls_token"].shape[-1]
    patch = eva["patch_embed.proj.weight"].shape[-1]
    n_pos = eva["pos_embed"].shape[1] - 1
    grid = int(round(n_pos ** 0.5))
    depth_in_file = 1 + max(int(m.group(1)) for k in eva if (m := re.fullmatch(r"blocks\.(\d+)\..+", k)))
    mlp = eva["blocks.0.mlp.fc1.weight"].shape[0]
    q_hidden = blip2["query_tokens"].shape[-1]
    q_layers = 1 + max(int(m.group(1)) for k in blip2
                       if (m := re.fullmatch(r"Qformer\.bert\.encoder\.layer\.(\d+)\..+", k)))
    cross = sorted({int(m.group(1)) for k in blip2
                    if (m := re.fullmatch(r"Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\..+", k))})
    frequency = cross[1] - cross[0] if len(cross) > 1 else q_layers
    q_inter = blip2["Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0]
    heads_vision = max(1, width // 88)  # EVA ViT-g: 1408 // 88 = 16 heads of 88
    text = llm_config.to_dict()
    text.update(vocab_size=vocab_size)
    return Blip2Config(
        vision_config=dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=_vit_depth(depth_in_file),
                           num_attention_heads=heads_vision if width % heads_vision == 0 else 1,
                           image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6, qkv_bias=True),
        qformer_config=dict(hidden_size=q_hidden, intermediate_size=q_inter, num_hidden_layers=q_layers,
                            num_attention_heads=max(1, q_hidden // 64), cross_attention_frequency=frequency,
                            encoder_hidden_size=width, layer_norm_eps=1e-12),
        text_config=text,
        num_query_tokens=blip2["query_tokens"].shape[1],
        image_token_index=image_token_index,
    )


def _vit_depth(depth_in_file: int) -> int:
    # LAVIS's create_eva_vit_g builds 39 blocks from the 40-block EVA-CLIP checkpoint; smaller files are used whole.
    return 39 if depth_in_file == 40 else depth_in_file


def import_official(cheetah_ckpt: str | Path, eva_vit: str | Path, blip2_qformer: str | Path, llm_dir: str | Path,
                    out_backbone: str | Path, out_vpgc: str | Path, template: str = "vicuna",
                    update_layer: int | None = None, image_size: int | None = None,
                    num_attention_heads: dict[str, int] | None = None) -> dict[str, Any]:
    """Convert the official files; returns a report of what was mapped and what was dropped (and why).

    `num_attention_heads` ({"vision": n, "qformer": n}) overrides the head counts, which cannot be read from the
    tensors (defaults: EVA's 88-wide heads, BERT's 64-wide heads).
    """
    from cheetah.model.vpgc import VPGCModel
    from cheetah.model.weights import save_vpgc

    eva = _load_pth(eva_vit, "EVA ViT-g state dict", None)
    blip2 = _load_pth(blip2_qformer, "BLIP-2 checkpoint", "model")
    cheetah = _load_pth(cheetah_ckpt, "Cheetah checkpoint", "model")
    llm_dir = Path(llm_dir)
    if not (llm_dir / "config.json").exists():
        raise DataError(f"{llm_dir}: not a Hugging Face LLaMA/Vicuna directory (no config.json)")

    tokenizer = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # as the official code pads
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    llm = LlamaForCausalLM.from_pretrained(llm_dir, local_files_only=True, dtype=torch.float32)
    old_vocab = llm.config.vocab_size

    for state, where, required in (
        (eva, eva_vit, ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")),
        (blip2, blip2_qformer, ("query_tokens", "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight")),
    ):
        absent = [k for k in required if k not in state]
        if absent:
            raise ImportErrorReport(f"{where}: missing keys {absent}")
    config = _infer_config(eva, blip2, llm.config, image_token_index, max(len(tokenizer), old_vocab))
    if num_attention_heads:
        config.vision_config.num_attention_heads = num_attention_heads.get("vision", config.vision_config.num_attention_heads)
        config.qformer_config.num_attention_heads = num_attention_heads.get("qformer",
                                                                            config.qformer_config.num_attention_heads)
    if image_size is not None and image_size != config.vision_config.image_size:
        raise ImportErrorReport(f"{eva_vit}: position embeddings are for {config.vision_config.image_size} px, "
                                f"not {image_size} px")

    eva_mapped, eva_dropped, eva_unknown = map_eva(eva, config.vision_config.num_hidden_layers)
    blip_mapped, blip_dropped, blip_unknown = map_blip2(blip2)
    ch_backbone, ch_vpgc, ch_unknown = map_cheetah(cheetah)
    problems = [f"{eva_vit}: unknown key {k}" for k in eva_unknown]
    problems += [f"{blip2_qformer}: unknown key {k}" for k in blip_unknown]
    problems += [f"{cheetah_ckpt}: unknown key {k}" for k in ch_unknown]

    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("language_model.")}
    mapped = {**eva_mapped, **blip_mapped, **ch_backbone}
    problems += [f"missing: {k} (shape {tuple(expected[k].shape)})" for k in sorted(set(expected) - set(mapped))]
    problems += [f"mis-shaped: {k}: file {tuple(mapped[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in sorted(set(expected) & set(mapped)) if mapped[k].shape != expected[k].shape]
    vpgc_expected = {
        "query_tokens": (1, config.num_query_tokens, config.qformer_config.hidden_size),
        "qformer_proj.weight": (config.qformer_config.hidden_size, config.text_config.hidden_size),
        "qformer_proj.bias": (config.qformer_config.hidden_size,),
        "llm_proj.weight": (config.text_config.hidden_size, config.qformer_config.hidden_size),
        "llm_proj.bias": (config.text_config.hidden_size,),
    }
    problems += [f"{cheetah_ckpt}: missing VPG-C key {k}" for k in vpgc_expected if k not in ch_vpgc]
    problems += [f"{cheetah_ckpt}: mis-shaped VPG-C key {k}: {tuple(ch_vpgc[k].shape)} vs {shape}"
                 for k, shape in vpgc_expected.items() if k in ch_vpgc and tuple(ch_vpgc[k].shape) != shape]
    if problems:
        raise ImportErrorReport("the official files do not map onto the backbone:\n  " + "\n  ".join(problems))

    # Materialise: mapped tensors are assigned as they are; the LLM module is the one just loaded.
    model.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=False, assign=True)
    _add_image_token_rows(llm, config.text_config.vocab_size)
    model.language_model = llm
    model.eval()
    backbone = Backbone(model=model, tokenizer=tokenizer, image_processor=_image_processor(config.vision_config.image_size),
                        template=TEMPLATES[template], source=str(out_backbone))
    save_backbone(backbone, out_backbone, extra_meta={"imported_from": {
        "cheetah": str(cheetah_ckpt), "eva_vit": str(eva_vit), "blip2": str(blip2_qformer), "llm": str(llm_dir)}})

    vpgc_model = VPGCModel(backbone, update_layer=update_layer)
    vpgc_model.vpgc.load_state_dict({k: v.float() for k, v in ch_vpgc.items()}, strict=True)
    save_vpgc(vpgc_model, out_vpgc)
    return {
        "backbone_dir": str(out_backbone),
        "vpgc_dir": str(out_vpgc),
        "mapped_keys": len(mapped) + len(ch_vpgc),
        "language_model_keys": len(llm.state_dict()),
        "dropped_keys": eva_dropped + blip_dropped,
        "image_token_index": image_token_index,
        "update_layer": vpgc_model.update_layer,
        "config": json.loads(config.to_json_string())["vision_config"] | {"num_query_tokens": config.num_query_tokens},
    }


@torch.no_grad()
def _add_image_token_rows(llm: LlamaForCausalLM, vocab_size: int) -> None:
    """Grow the LLM's vocabulary for `<image>`. Its input row is never read (image tokens are overwritten); its output
    row is set to the mean of the others, deterministically, and generation suppresses it."""
    old = llm.get_input_embeddings().weight.shape[0]
    if vocab_size == old:
        return
    llm.resize_token_embeddings(vocab_size, mean_resizing=False)
    emb = llm.get_input_embeddings().weight
    emb[old:] = emb[:old].mean(dim=0, keepdim=True)
    head = llm.get_output_embeddings()
    if head is not None and head.weight is not emb:
        head.weight[old:] = head.weight[:old].mean(dim=0, keepdim=True)
