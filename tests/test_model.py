"""VPG-C on the tiny backbone: identity at init, what trains, where the guide and residual act, generation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_instructblip, sharpen

from cheetah.model.backbones import PRESETS, build_backbone, load_backbone, save_backbone
from cheetah.model.prompts import IGNORE_INDEX, PromptBuilder, PromptError
from cheetah.model.vpgc import VPGCModel, position_ids_from_mask
from cheetah.model.weights import IncompatibleWeights, load_vpgc, save_vpgc

PROMPTS = [
    ("Image 1: <image> Image 2: <image> Describe the difference between the images.", 2,
     "In the second image, the small red star is blue."),
    ("<image> What colour is the large circle?", 1, "red"),
    ("Is there a small star? Image 1: <image> Image 2: <image> Image 3: <image>", 3, "yes"),
]


def _images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _train_batch(builder: PromptBuilder, prompts=PROMPTS):
    batch = builder.collate([builder.encode(t, n, r) for t, n, r in prompts], "right")
    batch["pixel_values"] = _images(sum(n for _, n, _ in prompts))
    return batch


@pytest.fixture()
def model(tiny_backbone):
    return VPGCModel(tiny_backbone)


@pytest.fixture()
def builder(tiny_backbone):
    return PromptBuilder.for_backbone(tiny_backbone)


def test_tiny_preset_summary(model):
    s = model.summary()
    assert s["update_layer"] == 2 == PRESETS["tiny"].text["num_hidden_layers"] // 2
    assert s["num_query_tokens"] == 8
    # queries (1x8x96) + Linear(128->96) + Linear(96->128)
    assert s["trainable_parameters"] == 8 * 96 + (128 * 96 + 96) + (96 * 128 + 128)
    assert s["trainable_parameters"] == sum(p.numel() for p in model.vpgc.parameters())


def test_logits_equal_backbone_at_init(model, builder, tiny_backbone):
    batch = _train_batch(builder)
    out = model(**batch)
    ref = tiny_backbone.model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"],
                              position_ids=position_ids_from_mask(batch["attention_mask"]))
    assert out.logits.shape == ref.logits.shape
    assert torch.equal(out.logits, ref.logits)


def test_placeholder_image_mismatch_is_refused(builder, model):
    with pytest.raises(PromptError, match="2 <image> placeholder"):
        builder.encode("Image 1: <image> Image 2: <image> Describe.", 1)
    batch = _train_batch(builder)
    with pytest.raises(ValueError, match="image blocks but 5 images"):
        model(**{**batch, "pixel_values": _images(5)})


def test_labels_cover_only_the_response(builder, tokenizer):
    enc = builder.encode(*PROMPTS[1])
    n_target = sum(label != IGNORE_INDEX for label in enc.labels)
    target = tokenizer("red" + builder.template.end, add_special_tokens=False)["input_ids"]
    assert n_target == len(target)
    assert enc.labels[enc.guide_position] == IGNORE_INDEX and enc.labels[enc.guide_position + 1] == target[0]
    left = builder.collate([builder.encode(t, n) for t, n, _ in PROMPTS], "left")
    width = left["input_ids"].shape[1]
    assert torch.all(left["guide_positions"] == width - 1) and torch.all(left["attention_mask"][:, -1] == 1)


def test_only_vpgc_trains_and_all_of_it_gets_gradients(model, builder):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    batch = _train_batch(builder)
    model.train()
    for step in range(3):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        if step == 0:
            # zero-init: llm_proj gets a gradient at once; qformer_proj and the queries only once llm_proj != 0
            assert model.vpgc.llm_proj.weight.grad.abs().sum() > 0
        opt.step()
    grads = {n: p.grad for n, p in model.vpgc.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), {n: g is None for n, g in grads.items()}
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"vpgc.{n}" for n, _ in model.vpgc.named_parameters()}
    assert not any(p.requires_grad for p in model.backbone.parameters())


def _capture_guides(model):
    seen = []
    original = model.vpgc.guided_queries

    def spy(guide):
        seen.append(guide.detach().clone())
        return original(guide)

    model.vpgc.guided_queries = spy
    return seen


def test_guide_is_the_last_instruction_token(model, builder, tokenizer):
    sharpen(model)
    guides = _capture_guides(model)
    text, n, response = PROMPTS[0]
    base = builder.collate([builder.encode(text, n, response)], "right")
    px = _images(n)
    model(**base, pixel_values=px)
    # change a response token: the guide must not move
    other_response = builder.collate([builder.encode(text, n, "In the first image the large circle is red.")], "right")
    model(**other_response, pixel_values=px)
    assert torch.equal(guides[0], guides[1])
    # change the last instruction token itself: the guide must move
    ids = base["input_ids"].clone()
    g = int(base["guide_positions"][0])
    ids[0, g] = (ids[0, g] + 7) % tokenizer.vocab_size
    model(**{**base, "input_ids": ids}, pixel_values=px)
    assert not torch.allclose(guides[0], guides[2])


def test_residual_reaches_only_image_positions(model, builder):
    sharpen(model)
    captured = {}
    layer_before = model._layers[model.update_layer - 1]
    layer_at = model._layers[model.update_layer]
    h1 = layer_before.register_forward_hook(lambda m, a, out: captured.__setitem__("before", out.detach().clone()))
    # registered after VPG-C's pre-hook, so it sees the corrected hidden states
    h2 = layer_at.register_forward_pre_hook(lambda m, a: captured.__setitem__("after", a[0].detach().clone()))
    batch = _train_batch(builder)
    model(**batch)
    h1.remove(), h2.remove()
    changed = (captured["after"] - captured["before"]).abs().amax(-1) > 0
    image_positions = batch["input_ids"] == model.image_token_id
    assert changed.any()
    assert torch.equal(changed, image_positions)


def _generation_inputs(builder, prompts):
    enc = [builder.encode(t, n) for t, n, _ in prompts]
    return builder.collate(enc, "left")


def test_kv_cache_generation_equals_full_recompute(model, builder):
    sharpen(model)
    model.eval()
    text, n, _ = PROMPTS[0]
    batch = _generation_inputs(builder, [PROMPTS[0]])
    px = _images(n)
    steps = 8
    cached = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=px,
                            max_new_tokens=steps, min_new_tokens=steps, do_sample=False, eos_token_id=None)
    ids = batch["input_ids"]
    guide = batch["guide_positions"]  # stays the last instruction token while the answer grows
    recomputed = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), guide_positions=guide,
                           pixel_values=px).logits
            logits[:, -1, model.image_token_id] = float("-inf")
            nxt = logits[:, -1].argmax(-1)
            recomputed.append(int(nxt))
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    assert cached[0].tolist() == recomputed
    assert len(set(recomputed)) > 1  # not a degenerate repetition


def test_batched_generation_equals_one_at_a_time(model, builder):
    sharpen(model)
    model.eval()
    batch = _generation_inputs(builder, PROMPTS)
    px = _images(sum(n for _, n, _ in PROMPTS))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, eos_token_id=None)
    together = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              pixel_values=px, **kw)
    start = 0
    for row, prompt in enumerate(PROMPTS):
        one = _generation_inputs(builder, [prompt])
        alone = model.generate(input_ids=one["input_ids"], attention_mask=one["attention_mask"],
                               pixel_values=px[start:start + prompt[1]], **kw)
        start += prompt[1]
        assert alone[0].tolist() == together[row].tolist()


def test_vpgc_weights_round_trip_and_refuse_other_backbones(model, builder, tmp_path, tokenizer, tiny_backbone):
    sharpen(model)
    save_backbone(tiny_backbone, tmp_path / "backbone")
    reloaded_backbone = load_backbone(tmp_path / "backbone")
    model.backbone_info.source = str(tmp_path / "backbone")
    save_vpgc(model, tmp_path / "vpgc")
    card = json.loads((tmp_path / "vpgc" / "vpgc.json").read_text())
    assert card["update_layer"] == 2 and card["num_query_tokens"] == 8 and len(card["sha256"]) == 64
    assert card["template"] == card["trained_template"] == "vicuna-train"  # the tiny preset's rendering

    restored = VPGCModel.from_pretrained(tmp_path / "vpgc")
    batch = _train_batch(builder)
    assert torch.equal(restored(**batch).logits, model(**batch).logits)
    fresh = VPGCModel(reloaded_backbone)
    load_vpgc(fresh, tmp_path / "vpgc")
    assert torch.equal(fresh(**batch).logits, model(**batch).logits)

    wrong_layer = VPGCModel(build_backbone("tiny", tokenizer=tokenizer, image_size=32, seed=0), update_layer=1)
    with pytest.raises(IncompatibleWeights, match="update_layer: weights were trained with 2"):
        load_vpgc(wrong_layer, tmp_path / "vpgc")
    wider = build_backbone("tiny", tokenizer=tokenizer, image_size=48, seed=0)
    with pytest.raises(IncompatibleWeights, match="backbone_fingerprint"):
        load_vpgc(VPGCModel(wider), tmp_path / "vpgc")


def test_corrupt_weights_file_is_refused(model, tmp_path):
    save_vpgc(model, tmp_path / "vpgc")
    path = tmp_path / "vpgc" / "vpgc.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256 differs"):
        load_vpgc(model, tmp_path / "vpgc")


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, builder):
    grads = []
    for checkpointing in (False, True):
        m = VPGCModel(build_backbone("tiny", tokenizer=tokenizer, image_size=32, seed=0))
        sharpen(m)
        if checkpointing:
            m.enable_gradient_checkpointing()
        m.train()
        m(**_train_batch(builder)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.vpgc.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_cli_summary_of_the_7b_preset_on_meta(capsys):
    from cheetah.cli import main

    assert main(["model", "summary", "--preset", "vicuna-7b", "--meta"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trainable_parameters"] == 6_320_896  # the paper's "0.09%, about 6.3M"
    assert out["update_layer"] == 16 and out["num_query_tokens"] == 32
    assert out["total_parameters"] > 7_000_000_000


def test_sample_losses_equal_per_sample_cross_entropy_of_full_logits(model, builder):
    sharpen(model)
    batch = _train_batch(builder)
    per_sample = model(**batch, return_sample_losses=True).sample_losses
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    for row in range(logits.shape[0]):
        targets = batch["labels"][row, 1:]
        keep = targets != IGNORE_INDEX
        expected = torch.nn.functional.cross_entropy(logits[row, :-1][keep], targets[keep])
        torch.testing.assert_close(per_sample[row], expected, rtol=1e-5, atol=1e-6)


def test_instructblip_backbone_identity_at_init_and_training(tokenizer):
    """VPG-C on InstructBLIP: the first pass keeps the instruction-aware Q-Former input (the builder gives the
    Q-Former each sample's instruction, once per image), the re-query is query-only."""
    backbone = build_tiny_instructblip(tokenizer)
    hf = backbone.model
    model = VPGCModel(backbone)
    builder = PromptBuilder.for_backbone(backbone)
    batch = _train_batch(builder)
    n_images = batch["pixel_values"].shape[0]
    assert batch["qformer_input_ids"].shape[0] == n_images  # one row per image, its sample's instruction
    expected = backbone.qformer_tokenizer(" ".join(PROMPTS[1][0].replace("<image>", " ").split()))["input_ids"]
    row = batch["qformer_input_ids"][2][batch["qformer_attention_mask"][2].bool()].tolist()  # 3rd image: prompt 2
    assert row == expected
    out = model(**batch)
    ref = hf(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
             position_ids=position_ids_from_mask(batch["attention_mask"]), qformer_input_ids=batch["qformer_input_ids"],
             qformer_attention_mask=batch["qformer_attention_mask"])
    assert torch.equal(out.logits, ref.logits)
    # the instruction text reaches the first pass: other Q-Former text, other logits
    other = {**batch, "qformer_input_ids": (batch["qformer_input_ids"] + 1) % len(backbone.qformer_tokenizer)}
    assert not torch.equal(model(**other).logits, out.logits)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(**batch, return_sample_losses=True).loss.backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vpgc.parameters())
    assert not torch.equal(model(**batch).logits, ref.logits)


def test_qformer_dropout_only_in_training_and_only_when_asked(tiny_backbone, builder):
    """`train.qformer_dropout`: the frozen Q-Former runs in training mode (dropout on) while training, as the
    official model leaves it; off, and in eval mode, the whole backbone is deterministic."""
    batch = _train_batch(builder)
    for flag in (False, True):
        model = VPGCModel(tiny_backbone, qformer_dropout=flag)
        sharpen(model)
        model.train()
        assert model.backbone.qformer.training is flag and not model.backbone.language_model.training
        assert not model.backbone.vision_model.training
        a, b = (model(**batch, return_sample_losses=True).loss for _ in range(2))
        assert torch.equal(a, b) is not flag  # dropout masks differ from pass to pass
        model.eval()
        assert not model.backbone.qformer.training
        assert torch.equal(model(**batch).logits, model(**batch).logits)
        model.detach_from_backbone()


def test_token_reduction_is_hugging_faces_batch_mean_and_sample_the_mean_of_means(model, builder):
    """`token` (the official model's loss) equals HF's CrossEntropyLoss over the whole batch; `sample` averages
    each sample's own mean. Split into parts, each reduction's parts add up to the whole step's loss."""
    from cheetah.model.vpgc import LossReduction

    sharpen(model)
    batch = _train_batch(builder)
    out = model(**batch, return_sample_losses=True)
    hf_loss = model(**batch).loss  # the language model's own loss over all target tokens of the batch
    tokens = int(out.token_counts.sum())
    torch.testing.assert_close(LossReduction.for_step("token", 1, 3, tokens)([out])[0], hf_loss)
    torch.testing.assert_close(LossReduction.for_step("sample", 1, 3, tokens)([out])[0], out.sample_losses.mean())
    assert not torch.allclose(hf_loss, out.sample_losses.mean())  # the prompts' answers differ in length
    # Three micro-batches of one sample each (as 3 ranks or 3 accumulation steps), and two uneven ones of 2 and 1
    # (as 2 ranks sharing 3 samples): DeepSpeed averages them over the parts.
    for split in ([(0, 1), (1, 2), (2, 3)], [(0, 2), (2, 3)]):
        parts = [model(**_rows(batch, lo, hi), return_sample_losses=True) for lo, hi in split]
        for mode, whole in (("token", hf_loss), ("sample", out.sample_losses.mean())):
            reduce = LossReduction.for_step(mode, len(split), 3, tokens)
            torch.testing.assert_close(sum(reduce([p])[0] for p in parts) / len(split), whole)


def _rows(batch, lo, hi):
    """Samples lo..hi-1 of a training batch, with their own images."""
    first, last = int(batch["image_counts"][:lo].sum()), int(batch["image_counts"][:hi].sum())
    return {**{k: v[lo:hi] for k, v in batch.items() if k != "pixel_values"},
            "pixel_values": batch["pixel_values"][first:last]}
