"""Import of the official Cheetah release, on state dicts of the tiny shape written under the official key names."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import make_tokenizer
from transformers import Blip2Config, Blip2ForConditionalGeneration, LlamaConfig, LlamaForCausalLM

from cheetah.model.backbones import Backbone, _image_processor, load_backbone
from cheetah.model.convert import ImportErrorReport, import_official
from cheetah.model.prompts import TEMPLATES, PromptBuilder
from cheetah.model.vpgc import VPGCModel

V_WIDTH, V_DEPTH, V_MLP, PATCH, SIZE = 32, 2, 64, 8, 32
Q_HIDDEN, Q_LAYERS, Q_MLP, NQ = 32, 2, 64, 4
H = 48


def _rand(*shape, g):
    return torch.randn(*shape, generator=g) * 0.2


def official_state_dicts(seed: int = 0):
    """EVA ViT, BLIP-2 and Cheetah checkpoints as LAVIS / Cheetah name their tensors (written out by hand here,
    independently of the converter's tables)."""
    g = torch.Generator().manual_seed(seed)
    n_pos = (SIZE // PATCH) ** 2 + 1
    eva = {"cls_token": _rand(1, 1, V_WIDTH, g=g), "pos_embed": _rand(1, n_pos, V_WIDTH, g=g),
           "patch_embed.proj.weight": _rand(V_WIDTH, 3, PATCH, PATCH, g=g), "patch_embed.proj.bias": _rand(V_WIDTH, g=g)}
    for i in range(V_DEPTH):
        b = f"blocks.{i}."
        eva |= {b + "norm1.weight": 1 + _rand(V_WIDTH, g=g), b + "norm1.bias": _rand(V_WIDTH, g=g),
                b + "norm2.weight": 1 + _rand(V_WIDTH, g=g), b + "norm2.bias": _rand(V_WIDTH, g=g),
                b + "attn.qkv.weight": _rand(3 * V_WIDTH, V_WIDTH, g=g), b + "attn.q_bias": _rand(V_WIDTH, g=g),
                b + "attn.v_bias": _rand(V_WIDTH, g=g), b + "attn.proj.weight": _rand(V_WIDTH, V_WIDTH, g=g),
                b + "attn.proj.bias": _rand(V_WIDTH, g=g), b + "mlp.fc1.weight": _rand(V_MLP, V_WIDTH, g=g),
                b + "mlp.fc1.bias": _rand(V_MLP, g=g), b + "mlp.fc2.weight": _rand(V_WIDTH, V_MLP, g=g),
                b + "mlp.fc2.bias": _rand(V_WIDTH, g=g)}
    blip2 = {"query_tokens": _rand(1, NQ, Q_HIDDEN, g=g), "ln_vision.weight": 1 + _rand(V_WIDTH, g=g),
             "ln_vision.bias": _rand(V_WIDTH, g=g), "t5_proj.weight": _rand(8, Q_HIDDEN, g=g),
             "t5_proj.bias": _rand(8, g=g),
             "Qformer.bert.embeddings.LayerNorm.weight": 1 + _rand(Q_HIDDEN, g=g),
             "Qformer.bert.embeddings.LayerNorm.bias": _rand(Q_HIDDEN, g=g),
             "Qformer.bert.embeddings.word_embeddings.weight": _rand(30, Q_HIDDEN, g=g),
             "Qformer.bert.embeddings.position_embeddings.weight": _rand(16, Q_HIDDEN, g=g)}
    for i in range(Q_LAYERS):
        b = f"Qformer.bert.encoder.layer.{i}."
        for part, kv_in in (("attention", Q_HIDDEN), ("crossattention", V_WIDTH)):
            blip2 |= {b + f"{part}.self.query.weight": _rand(Q_HIDDEN, Q_HIDDEN, g=g),
                      b + f"{part}.self.query.bias": _rand(Q_HIDDEN, g=g),
                      b + f"{part}.self.key.weight": _rand(Q_HIDDEN, kv_in, g=g),
                      b + f"{part}.self.key.bias": _rand(Q_HIDDEN, g=g),
                      b + f"{part}.self.value.weight": _rand(Q_HIDDEN, kv_in, g=g),
                      b + f"{part}.self.value.bias": _rand(Q_HIDDEN, g=g),
                      b + f"{part}.output.dense.weight": _rand(Q_HIDDEN, Q_HIDDEN, g=g),
                      b + f"{part}.output.dense.bias": _rand(Q_HIDDEN, g=g),
                      b + f"{part}.output.LayerNorm.weight": 1 + _rand(Q_HIDDEN, g=g),
                      b + f"{part}.output.LayerNorm.bias": _rand(Q_HIDDEN, g=g)}
        for branch in ("", "_query"):  # the text FFN (dropped) and the query FFN (kept)
            blip2 |= {b + f"intermediate{branch}.dense.weight": _rand(Q_MLP, Q_HIDDEN, g=g),
                      b + f"intermediate{branch}.dense.bias": _rand(Q_MLP, g=g),
                      b + f"output{branch}.dense.weight": _rand(Q_HIDDEN, Q_MLP, g=g),
                      b + f"output{branch}.dense.bias": _rand(Q_HIDDEN, g=g),
                      b + f"output{branch}.LayerNorm.weight": 1 + _rand(Q_HIDDEN, g=g),
                      b + f"output{branch}.LayerNorm.bias": _rand(Q_HIDDEN, g=g)}
    cheetah = {"llama_proj.weight": _rand(H, Q_HIDDEN, g=g), "llama_proj.bias": _rand(H, g=g),
               "llama_model.model.query_tokens": _rand(1, NQ, Q_HIDDEN, g=g),
               "llama_model.model.qformer_proj.weight": _rand(Q_HIDDEN, H, g=g),
               "llama_model.model.qformer_proj.bias": _rand(Q_HIDDEN, g=g),
               "llama_model.model.llm_proj.weight": _rand(H, Q_HIDDEN, g=g),
               "llama_model.model.llm_proj.bias": _rand(H, g=g)}
    return eva, blip2, cheetah


@pytest.fixture()
def official_files(tmp_path):
    eva, blip2, cheetah = official_state_dicts()
    torch.save(eva, tmp_path / "eva_vit_g.pth")
    torch.save({"model": blip2}, tmp_path / "blip2_pretrained_flant5xxl.pth")
    torch.save({"model": cheetah, "epoch": 3}, tmp_path / "cheetah.pth")
    tok = make_tokenizer(with_image_token=False)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(hidden_size=H, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                                       num_key_value_heads=4, vocab_size=len(tok), max_position_embeddings=128,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id))
    llm.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    return tmp_path, (eva, blip2, cheetah), llm


def _import(files, **kw):
    d = files
    return import_official(cheetah_ckpt=d / "cheetah.pth", eva_vit=d / "eva_vit_g.pth",
                           blip2_qformer=d / "blip2_pretrained_flant5xxl.pth", llm_dir=d / "llama",
                           out_backbone=d / "out" / "backbone", out_vpgc=d / "out" / "vpgc",
                           num_attention_heads={"vision": 2, "qformer": 2}, **kw)


@torch.no_grad()
def _set_directly(eva, blip2, cheetah, llm, image_token_index):
    """The same weights put into a Blip2 model through its module attributes, not through key names."""
    cfg = Blip2Config(
        vision_config=dict(hidden_size=V_WIDTH, intermediate_size=V_MLP, num_hidden_layers=V_DEPTH,
                           num_attention_heads=2, image_size=SIZE, patch_size=PATCH, layer_norm_eps=1e-6),
        qformer_config=dict(hidden_size=Q_HIDDEN, intermediate_size=Q_MLP, num_hidden_layers=Q_LAYERS,
                            num_attention_heads=2, cross_attention_frequency=1, encoder_hidden_size=V_WIDTH),
        text_config=llm.config.to_dict() | {"vocab_size": image_token_index + 1},
        num_query_tokens=NQ, image_token_index=image_token_index)
    m = Blip2ForConditionalGeneration(cfg).eval()
    v = m.vision_model
    v.embeddings.class_embedding.copy_(eva["cls_token"])
    v.embeddings.position_embedding.copy_(eva["pos_embed"])
    v.embeddings.patch_embedding.weight.copy_(eva["patch_embed.proj.weight"])
    v.embeddings.patch_embedding.bias.copy_(eva["patch_embed.proj.bias"])
    for i, layer in enumerate(v.encoder.layers):
        e = lambda k: eva[f"blocks.{i}.{k}"]  # noqa: E731
        for mod, src in ((layer.layer_norm1, "norm1"), (layer.layer_norm2, "norm2"), (layer.mlp.fc1, "mlp.fc1"),
                         (layer.mlp.fc2, "mlp.fc2"), (layer.self_attn.projection, "attn.proj")):
            mod.weight.copy_(e(f"{src}.weight")), mod.bias.copy_(e(f"{src}.bias"))
        layer.self_attn.qkv.weight.copy_(e("attn.qkv.weight"))
        # EVA's attention has q and v biases and no k bias (HF: one qkv bias with zeros in the middle)
        layer.self_attn.qkv.bias.copy_(torch.cat([e("attn.q_bias"), torch.zeros(V_WIDTH), e("attn.v_bias")]))
    v.post_layernorm.weight.copy_(blip2["ln_vision.weight"]), v.post_layernorm.bias.copy_(blip2["ln_vision.bias"])
    q = m.qformer
    q.layernorm.weight.copy_(blip2["Qformer.bert.embeddings.LayerNorm.weight"])
    q.layernorm.bias.copy_(blip2["Qformer.bert.embeddings.LayerNorm.bias"])
    for i, layer in enumerate(q.encoder.layer):
        b = lambda k: blip2[f"Qformer.bert.encoder.layer.{i}.{k}"]  # noqa: E731
        for mod, src in ((layer.attention, "attention"), (layer.crossattention, "crossattention")):
            for name in ("query", "key", "value"):
                getattr(mod.attention, name).weight.copy_(b(f"{src}.self.{name}.weight"))
                getattr(mod.attention, name).bias.copy_(b(f"{src}.self.{name}.bias"))
            for name in ("dense", "LayerNorm"):
                getattr(mod.output, name).weight.copy_(b(f"{src}.output.{name}.weight"))
                getattr(mod.output, name).bias.copy_(b(f"{src}.output.{name}.bias"))
        layer.intermediate_query.dense.weight.copy_(b("intermediate_query.dense.weight"))
        layer.intermediate_query.dense.bias.copy_(b("intermediate_query.dense.bias"))
        for name in ("dense", "LayerNorm"):
            getattr(layer.output_query, name).weight.copy_(b(f"output_query.{name}.weight"))
            getattr(layer.output_query, name).bias.copy_(b(f"output_query.{name}.bias"))
    m.query_tokens.copy_(blip2["query_tokens"])
    m.language_projection.weight.copy_(cheetah["llama_proj.weight"])
    m.language_projection.bias.copy_(cheetah["llama_proj.bias"])
    n = llm.config.vocab_size
    for name, p in llm.state_dict().items():
        m.language_model.state_dict()[name][:n].copy_(p)
    return m


def test_import_round_trips_to_identical_logits(official_files):
    d, (eva, blip2, cheetah), llm = official_files
    report = _import(d)
    ignored = {k: g["reason"] for g in report["ignored"] for k in g["keys"]}
    assert ignored["t5_proj.weight"].startswith("BLIP-2 heads for other LLMs")
    assert ignored["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] == "Q-Former text FFN (removed)"
    assert report["template"] == "vicuna" and "max_position_embeddings=128" in report["template_reason"]

    imported = VPGCModel.from_pretrained(d / "out" / "vpgc")
    backbone = load_backbone(d / "out" / "backbone")
    direct_model = _set_directly(eva, blip2, cheetah, llm, backbone.image_token_id)
    direct = VPGCModel(Backbone(direct_model, backbone.tokenizer, _image_processor(SIZE), TEMPLATES["vicuna"], "direct"))
    with torch.no_grad():
        direct.vpgc.query_tokens.copy_(cheetah["llama_model.model.query_tokens"])
        for name in ("qformer_proj", "llm_proj"):
            getattr(direct.vpgc, name).weight.copy_(cheetah[f"llama_model.model.{name}.weight"])
            getattr(direct.vpgc, name).bias.copy_(cheetah[f"llama_model.model.{name}.bias"])

    builder = PromptBuilder.for_backbone(backbone)
    batch = builder.collate([builder.encode("Image 1: <image> Image 2: <image> Describe the difference.", 2, "red"),
                             builder.encode("<image> What colour is the large circle?", 1, "blue")], "right")
    batch["pixel_values"] = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    a, b = imported(**batch).logits, direct(**batch).logits
    vocab = llm.config.vocab_size  # the added <image> row is never a target
    assert torch.equal(a[..., :vocab], b[..., :vocab])
    # VPG-C is really active (non-zero imported projections), not an identity
    base = direct_model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(a[..., :vocab], base[..., :vocab])


@pytest.mark.parametrize("edit, message", [
    ("drop_vpgc", "missing VPG-C key llm_proj.bias"),
    ("extra_cheetah", "unknown key llama_model.model.extra_gate"),
    ("drop_qformer", "missing: qformer.encoder.layer.1.crossattention.attention.key.weight"),
    ("reshape", "mis-shaped: language_projection.weight"),
])
def test_import_refuses_missing_extra_and_misshaped_keys(official_files, edit, message):
    d, (eva, blip2, cheetah), _ = official_files
    cheetah, blip2 = dict(cheetah), dict(blip2)
    if edit == "drop_vpgc":
        del cheetah["llama_model.model.llm_proj.bias"]
    elif edit == "extra_cheetah":
        cheetah["llama_model.model.extra_gate"] = torch.zeros(3)
    elif edit == "drop_qformer":
        del blip2["Qformer.bert.encoder.layer.1.crossattention.self.key.weight"]
    elif edit == "reshape":
        cheetah["llama_proj.weight"] = torch.zeros(H, Q_HIDDEN + 1)
    torch.save({"model": cheetah}, d / "cheetah.pth")
    torch.save({"model": blip2}, d / "blip2_pretrained_flant5xxl.pth")
    with pytest.raises(ImportErrorReport, match=message.replace(".", r"\.")):
        _import(d)
    assert not (d / "out" / "backbone").exists()


def _with_benign_extras(eva, blip2, cheetah, llm):
    """What a released file may carry besides the trained tensors (issue: the official loader ignores them)."""
    eva = {**eva, "norm.weight": torch.ones(V_WIDTH), "norm.bias": torch.zeros(V_WIDTH),
           "head.weight": torch.zeros(10, V_WIDTH), "head.bias": torch.zeros(10)}
    extra = {}
    for key, value in blip2.items():  # the frozen Q-Former as the LLM fork holds it (set_qformer_and_proj)
        if key.startswith("Qformer.") and ("_query" in key or "attention" in key or "LayerNorm" in key):
            extra[f"llama_model.model.{key}"] = value.clone()
    extra["llama_model.model.Qformer.bert.embeddings.position_ids"] = torch.arange(16)[None]  # a buffer
    inv_freq = llm.model.rotary_emb.inv_freq
    for layer in range(llm.config.num_hidden_layers):  # modeling_llama.py L81: persistent, saved in half precision
        extra[f"llama_model.model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq.half()
    extra["llama_model.model.norm.weight"] = llm.state_dict()["model.norm.weight"].half()  # a full-state-dict copy
    return eva, {**cheetah, **extra}


def test_import_accepts_benign_extras_checks_copies_and_lists_what_it_ignored(official_files, capsys):
    from cheetah.cli import main

    d, (eva, blip2, cheetah), llm = official_files
    eva, cheetah = _with_benign_extras(eva, blip2, cheetah, llm)
    torch.save(eva, d / "eva_vit_g.pth")
    torch.save({"model": cheetah}, d / "cheetah.pth")
    argv = ["model", "import", "--cheetah-ckpt", str(d / "cheetah.pth"), "--eva-vit", str(d / "eva_vit_g.pth"),
            "--qformer", str(d / "blip2_pretrained_flant5xxl.pth"), "--llm", str(d / "llama"), "--image-size", "32",
            "--out-backbone", str(d / "out" / "backbone"), "--out-vpgc", str(d / "out" / "vpgc")]
    assert main(argv) == 0  # (head counts are not in the tensors: the CLI's defaults give 1 head here, fine for keys)
    out = capsys.readouterr()
    assert "chat template: vicuna (max_position_embeddings=128" in out.err and "records vicuna-train" in out.err
    report = json.loads(out.out)
    ignored = {k: (g["file"], g["reason"]) for g in report["ignored"] for k in g["keys"]}
    assert ignored["norm.weight"][1].startswith("EVA's final norm / head") and "head.bias" in ignored
    q = "llama_model.model.Qformer.bert.encoder.layer.1.crossattention.self.key.weight"
    assert ignored[q] == (str(d / "cheetah.pth"), "copy of Qformer.bert.encoder.layer.1.crossattention.self.key.weight "
                                                  "in blip2_pretrained_flant5xxl.pth, checked equal")
    assert ignored["llama_model.model.layers.3.self_attn.rotary_emb.inv_freq"][1].startswith("rotary inv_freq")
    assert ignored["llama_model.model.Qformer.bert.embeddings.position_ids"][1] == "buffer (not a weight)"
    assert ignored["llama_model.model.norm.weight"][1] == "copy of model.norm.weight in llama, checked equal"
    card = json.loads((d / "out" / "vpgc" / "vpgc.json").read_text())
    assert card["template"] == "vicuna" and card["trained_template"] == "vicuna-train"

    # A copy that differs from the tensor it duplicates: an error naming both, and nothing written.
    shutil.rmtree(d / "out")
    bad = dict(cheetah)
    bad[q] = bad[q] + 1e-3
    torch.save({"model": bad}, d / "cheetah.pth")
    with pytest.raises(ImportErrorReport, match=re.escape(f"{q} differs from {d / 'blip2_pretrained_flant5xxl.pth'}: "
                                                          "Qformer.bert.encoder.layer.1.crossattention.self.key.weight")):
        _import(d)
    assert not (d / "out").exists()
    assert main(argv) == 2 and f"{q} differs from" in capsys.readouterr().err  # a clear error, exit 2

    # Rotary frequencies of another RoPE base are not the LLM's: refused.
    bad = dict(cheetah)
    bad["llama_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = (1.0 / 500000 ** (torch.arange(0, 12, 2) / 12))
    torch.save({"model": bad}, d / "cheetah.pth")
    with pytest.raises(ImportErrorReport, match="layers.0.self_attn.rotary_emb.inv_freq differs from the rotary"):
        _import(d)
    # Anything else unknown is still refused.
    torch.save({"model": {**cheetah, "llama_model.model.Qformer.bert.extra": torch.zeros(2)}}, d / "cheetah.pth")
    with pytest.raises(ImportErrorReport, match=r"unknown key llama_model\.model\.Qformer\.bert\.extra \(not a copy"):
        _import(d)


@pytest.mark.parametrize("hint, expected", [
    ({}, ("vicuna", "max_position_embeddings=128")),
    ({"max_position_embeddings": 4096}, ("llama2", "max_position_embeddings=4096")),
    ({"_name_or_path": "meta-llama/Llama-2-7b-chat-hf"}, ("llama2", "named 'meta-llama/Llama-2-7b-chat-hf'")),
    ({"_name_or_path": "/models/vicuna-7b-v0-merged", "max_position_embeddings": 4096}, ("vicuna", "named")),
    ({"chat_template": "{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}"}, ("llama2", "[INST]")),
])
def test_template_is_detected_from_the_language_model(official_files, hint, expected):
    from transformers import AutoTokenizer

    from cheetah.model.convert import detect_template

    d = official_files[0]
    config = json.loads((d / "llama" / "config.json").read_text())
    config.update({k: v for k, v in hint.items() if k != "chat_template"})
    (d / "llama" / "config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(d / "llama")
    tokenizer.chat_template = hint.get("chat_template")
    name, reason = detect_template(d / "llama", tokenizer)
    assert name == expected[0] and expected[1] in reason


def test_cli_import_prints_the_template_and_refuses_bad_files(official_files, capsys):
    from cheetah.cli import main

    d = official_files[0]
    (d / "broken.pth").write_bytes(b"not a torch file")
    argv = ["model", "import", "--cheetah-ckpt", str(d / "broken.pth"), "--eva-vit", str(d / "eva_vit_g.pth"),
            "--qformer", str(d / "blip2_pretrained_flant5xxl.pth"), "--llm", str(d / "llama"),
            "--out-backbone", str(d / "out" / "b"), "--out-vpgc", str(d / "out" / "v")]
    assert main(argv) == 2 and "broken.pth: cannot read Cheetah checkpoint" in capsys.readouterr().err
