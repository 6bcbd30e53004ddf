"""Import of the official Cheetah release into a Hugging Face backbone directory plus VPG-C weights.

Inputs (all local files; `torch.load(weights_only=True)`, so no pickled code ever runs):
- the released Cheetah `.pth`: a dict whose `model` entry holds `llama_proj.{weight,bias}` (the frozen 768->4096
  first-pass projection) and the VPG-C tensors `llama_model.model.{qformer_proj,llm_proj}.{weight,bias}` and
  `llama_model.model.query_tokens`;
- LAVIS `eva_vit_g.pth`: the EVA ViT-g state dict (LAVIS builds 39 of its 40 blocks and drops the rest);
- LAVIS `blip2_pretrained_flant5xxl.pth` (a dict with a `model` entry): the BLIP-2 Q-Former, its query tokens and
  `ln_vision`, plus parts Cheetah does not use (the T5 projection, the Q-Former's text branch and heads);
- a LLaMA / Vicuna directory in Hugging Face format (weights, config, tokenizer).

Every key is accounted for: a key is either mapped, or ignored for a stated reason, and the report lists every
ignored key with its reason. Ignored are the parts the official model drops or never applies (the T5 projection and
the Q-Former's text branch of the BLIP-2 file, EVA's final `norm`/`head`), and what the released file may carry
besides the weights Cheetah trained: the persistent rotary `inv_freq` buffers of its LLaMA fork
(`modeling_llama.py` L81) and copies of tensors that another input holds - the frozen Q-Former is also reachable as
`llama_model.model.Qformer` (`set_qformer_and_proj`, `modeling_llama.py` L465-469), and a full state dict repeats
ViT, Q-Former and LLM. The official loader ignores all of these silently (`load_state_dict(strict=False)`,
`cheetah_vicuna.py` L381-386); here each copy must equal the tensor it duplicates (an `inv_freq` the LLM's own, to
rounding), or the import stops naming both. Unknown, missing or mis-shaped keys stop the import and are all listed.

The chat template is detected from the language model (`detect_template`) unless given: what the backbone is
evaluated and served with is the official inference rendering of that LLM (cheetah/model/prompts.py), and the
VPG-C card records the training configs' rendering as the one the weights were trained with.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration, LlamaForCausalLM

from cheetah.io import DataError
from cheetah.model.backbones import Backbone, _image_processor, save_backbone
from cheetah.model.prompts import IMAGE_TOKEN, TEMPLATES


class ImportErrorReport(DataError):
    """The official files do not map cleanly; the message lists every problem key (the CLI exits 2)."""


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
# EVA keys LAVIS's ViT-g never uses: it builds no final norm or head (eva_vit.py L284-286 are commented out,
# forward_features returns before any norm, L340-341) and loads the file with strict=False (L436); BLIP-2 normalises
# the features with its own `ln_vision` instead.
_EVA_IGNORED = [
    (r"(norm|fc_norm|head)\.(weight|bias)", "EVA's final norm / head: LAVIS's ViT-g has neither (ln_vision instead)"),
]
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
# Cheetah-checkpoint keys that copy a tensor another input holds: (pattern, source, source key). The first match wins,
# so the Q-Former copy inside the LLM is not taken for an LLM weight.
_CHEETAH_COPIES = [
    (r"llama_model\.model\.(Qformer\..+)", "blip2", r"\1"),
    (r"(Qformer\..+|query_tokens|ln_vision\.(?:weight|bias))", "blip2", r"\1"),
    (r"visual_encoder\.(.+)", "eva", r"\1"),
    (r"llama_model\.((?:model|lm_head)\..+)", "llm", r"\1"),
]
_ROTARY_INV_FREQ = r"llama_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"
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


Ignored = list[tuple[str, str]]
"""(key, why it is not used)."""


def map_eva(state: dict[str, torch.Tensor], depth: int) -> tuple[dict[str, torch.Tensor], Ignored, list[str]]:
    """EVA ViT-g keys -> HF `vision_model.*`. Returns (mapped, ignored, unknown)."""
    mapped, dropped, unknown = {}, [], []
    qv_bias: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in _EVA_TOP:
            mapped[_EVA_TOP[key]] = value
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if m and (m.group(2) in _EVA_BLOCK or m.group(2) in ("attn.q_bias", "attn.v_bias")):
            if int(m.group(1)) >= depth:
                dropped.append((key, f"LAVIS builds ViT-g with {depth} blocks"))
            elif m.group(2) in _EVA_BLOCK:
                mapped[f"vision_model.encoder.layers.{m.group(1)}.{_EVA_BLOCK[m.group(2)]}"] = value
            else:
                qv_bias.setdefault(m.group(1), {})[m.group(2)[5]] = value
            continue
        reason = _reason(key, _EVA_IGNORED)
        (dropped.append((key, reason)) if reason else unknown.append(key))
    # EVA keeps separate q and v biases and no k bias; HF holds them as one qkv bias with zeros for k.
    for block, parts in qv_bias.items():
        if set(parts) != {"q", "v"}:
            unknown.append(f"blocks.{block}.attn: q_bias and v_bias must come together (found {sorted(parts)})")
            continue
        mapped[f"vision_model.encoder.layers.{block}.self_attn.qkv.bias"] = torch.cat(
            [parts["q"], torch.zeros_like(parts["v"]), parts["v"]])
    return mapped, dropped, unknown


def map_blip2(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Ignored, list[str]]:
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
                reason = _reason(key, _QFORMER_DROPPED)
                (dropped.append((key, reason)) if reason else unknown.append(key))
            continue
        reason = _reason(key, _QFORMER_DROPPED)
        (dropped.append((key, reason)) if reason else unknown.append(key))
    return mapped, dropped, unknown


def _reason(key: str, table: list[tuple[str, str]]) -> str | None:
    for pattern, reason in table:
        if re.fullmatch(pattern, key):
            return reason
    return None


@dataclasses.dataclass
class CheetahKeys:
    """The Cheetah checkpoint sorted: what is mapped, what copies another input's tensor, what is unknown."""

    backbone: dict[str, torch.Tensor]
    vpgc: dict[str, torch.Tensor]
    copies: list[tuple[str, torch.Tensor, str, str]]
    """(key, tensor, source, source key): to be checked equal to the source's tensor."""
    rotary: dict[str, torch.Tensor]
    """Persistent rotary `inv_freq` buffers: to be checked against the LLM's own."""
    unknown: list[str]


def map_cheetah(state: dict[str, torch.Tensor]) -> CheetahKeys:
    """Sort the Cheetah checkpoint's keys (VPG-C and `llama_proj` are mapped; copies and buffers are checked later)."""
    out = CheetahKeys({}, {}, [], {}, [])
    for key, value in state.items():
        if key in _CHEETAH_KEYS:
            out.backbone[_CHEETAH_KEYS[key]] = value
        elif key in _VPGC_KEYS:
            out.vpgc[_VPGC_KEYS[key]] = value
        elif re.fullmatch(_ROTARY_INV_FREQ, key):
            out.rotary[key] = value
        else:
            for pattern, source, repl in _CHEETAH_COPIES:
                if re.fullmatch(pattern, key):
                    out.copies.append((key, value, source, re.sub(pattern, repl, key)))
                    break
            else:
                out.unknown.append(key)
    return out


def _same(copy: torch.Tensor, source: torch.Tensor) -> bool:
    """Equal at the lower precision of the two (a copy saved in half precision equals its fp32 source rounded)."""
    if copy.shape != source.shape:
        return False
    if not (copy.is_floating_point() and source.is_floating_point()):
        return torch.equal(copy, source.to(copy.dtype))
    low = copy.dtype if torch.finfo(copy.dtype).eps >= torch.finfo(source.dtype).eps else source.dtype
    return torch.equal(copy.to(low), source.to(low))


def check_copies(keys: CheetahKeys, sources: dict[str, tuple[str, dict[str, torch.Tensor]]],
                 rotary: torch.Tensor, where: str) -> tuple[Ignored, list[str]]:
    """Check every copy in the Cheetah checkpoint against the tensor it duplicates. `sources` maps a source name to
    (its file, its state dict); `rotary` is the LLM's own `inv_freq`. Returns (ignored, problems)."""
    ignored: Ignored = []
    problems: list[str] = []
    for key, value, source, source_key in keys.copies:
        path, state = sources[source]
        if source_key not in state:
            reason = _reason(source_key, _QFORMER_DROPPED) if source == "blip2" else None
            if reason == "buffer":  # e.g. the Q-Former's position_ids, which BLIP-2 files may leave out
                ignored.append((key, "buffer (not a weight)"))
            else:
                problems.append(f"{where}: unknown key {key} (not a copy of a tensor of {path}: it has no "
                                f"{source_key})")
            continue
        original = state[source_key]
        if not _same(value, original):
            detail = (f"shape {tuple(value.shape)} vs {tuple(original.shape)}" if value.shape != original.shape else
                      f"max |difference| {(value.float() - original.float()).abs().max().item():.3g}")
            problems.append(f"{where}: {key} differs from {path}: {source_key} ({detail}); the two files are "
                            "not from the same model")
            continue
        ignored.append((key, f"copy of {source_key} in {Path(path).name}, checked equal"))
    for key, value in keys.rotary.items():
        tolerance = max(torch.finfo(value.dtype).eps, 1e-6) if value.is_floating_point() else 0
        if value.shape != rotary.shape or not torch.allclose(value.float(), rotary.float(), rtol=tolerance, atol=0):
            problems.append(f"{where}: {key} differs from the rotary inverse frequencies of the LLM's config "
                            f"(shape {tuple(value.shape)} vs {tuple(rotary.shape)}): another RoPE base or head size")
            continue
        ignored.append((key, "rotary inv_freq buffer (persistent in the official LLaMA fork), equal to the LLM's"))
    return ignored, problems


def detect_template(llm_dir: str | Path, tokenizer: Any) -> tuple[str, str]:
    """(`vicuna` or `llama2`, the evidence): which official chat rendering fits the language model in `llm_dir`.

    In order: a tokenizer chat template in the LLaMA-2 format ([INST]); the model's name (`_name_or_path` in
    config.json, else the folder's) naming LLaMA-2 chat or Vicuna; the context length (LLaMA-2: 4096 positions,
    LLaMA-1 and Vicuna v0: 2048)."""
    llm_dir = Path(llm_dir)
    chat = getattr(tokenizer, "chat_template", None)
    if isinstance(chat, str) and "[INST]" in chat:
        return "llama2", "the tokenizer's chat template uses [INST]"
    config = json.loads((llm_dir / "config.json").read_text())
    name = str(config.get("_name_or_path") or llm_dir.resolve().name)
    folded = name.lower().replace("_", "-")
    if re.search(r"llama-?2", folded) and "chat" in folded:
        return "llama2", f"the model is named {name!r}"
    if "vicuna" in folded:
        return "vicuna", f"the model is named {name!r}"
    positions = config.get("max_position_embeddings")
    if positions is not None and int(positions) >= 4096:
        return "llama2", f"max_position_embeddings={positions} (LLaMA-2's context; LLaMA-1/Vicuna v0 have 2048)"
    return "vicuna", f"max_position_embeddings={positions} (LLaMA-1/Vicuna v0's context; LLaMA-2 has 4096)"


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
                    out_backbone: str | Path, out_vpgc: str | Path, template: str | None = None,
                    update_layer: int | None = None, image_size: int | None = None,
                    num_attention_heads: dict[str, int] | None = None) -> dict[str, Any]:
    """Convert the official files; returns a report of what was mapped and what was ignored (and why).

    `template` (`vicuna` or `llama2`): the official chat rendering the backbone is used with; None detects it from
    the language model (`detect_template`; the report says which and why). `num_attention_heads`
    ({"vision": n, "qformer": n}) overrides the head counts, which cannot be read from the tensors (defaults: EVA's
    88-wide heads, BERT's 64-wide heads).
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
    if template is None:
        template, template_reason = detect_template(llm_dir, tokenizer)
    elif template in _TRAINED_WITH:
        template_reason = "given"
    else:
        raise ImportErrorReport(f"template {template!r}: the official release has {sorted(_TRAINED_WITH)}")
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

    eva_mapped, eva_ignored, eva_unknown = map_eva(eva, config.vision_config.num_hidden_layers)
    blip_mapped, blip_ignored, blip_unknown = map_blip2(blip2)
    ch = map_cheetah(cheetah)
    problems = [f"{eva_vit}: unknown key {k}" for k in eva_unknown]
    problems += [f"{blip2_qformer}: unknown key {k}" for k in blip_unknown]
    problems += [f"{cheetah_ckpt}: unknown key {k}" for k in ch.unknown]
    ch_ignored, copy_problems = check_copies(
        ch, {"eva": (str(eva_vit), eva), "blip2": (str(blip2_qformer), blip2), "llm": (str(llm_dir), llm.state_dict())},
        llm.model.rotary_emb.inv_freq, str(cheetah_ckpt))
    problems += copy_problems

    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("language_model.")}
    mapped = {**eva_mapped, **blip_mapped, **ch.backbone}
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
    problems += [f"{cheetah_ckpt}: missing VPG-C key {k}" for k in vpgc_expected if k not in ch.vpgc]
    problems += [f"{cheetah_ckpt}: mis-shaped VPG-C key {k}: {tuple(ch.vpgc[k].shape)} vs {shape}"
                 for k, shape in vpgc_expected.items() if k in ch.vpgc and tuple(ch.vpgc[k].shape) != shape]
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
    vpgc_model.vpgc.load_state_dict({k: v.float() for k, v in ch.vpgc.items()}, strict=True)
    save_vpgc(vpgc_model, out_vpgc, trained_template=_TRAINED_WITH[template])
    return {
        "backbone_dir": str(out_backbone),
        "vpgc_dir": str(out_vpgc),
        "template": template,
        "template_reason": template_reason,
        "trained_template": _TRAINED_WITH[template],
        "mapped_keys": len(mapped) + len(ch.vpgc),
        "language_model_keys": len(llm.state_dict()),
        "ignored": _group_ignored([(str(eva_vit), eva_ignored), (str(blip2_qformer), blip_ignored),
                                   (str(cheetah_ckpt), ch_ignored)]),
        "image_token_index": image_token_index,
        "update_layer": vpgc_model.update_layer,
        "config": json.loads(config.to_json_string())["vision_config"] | {"num_query_tokens": config.num_query_tokens},
    }


# The released model's inference rendering -> its training configs' `prompt_template` rendering (cheetah/model/
# prompts.py), recorded in the VPG-C card as the rendering the weights were trained with.
_TRAINED_WITH = {"vicuna": "vicuna-train", "llama2": "llama2-train"}


def _group_ignored(files: list[tuple[str, Ignored]]) -> list[dict[str, Any]]:
    """[{file, reason, keys}] in file order, keys grouped by reason (LAVIS drops whole families of tensors)."""
    out: list[dict[str, Any]] = []
    for path, items in files:
        by_reason: dict[str, list[str]] = {}
        for key, reason in items:
            by_reason.setdefault(reason, []).append(key)
        out += [{"file": path, "reason": reason, "keys": keys} for reason, keys in by_reason.items()]
    return out


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
