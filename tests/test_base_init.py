"""The base stage at every scale (`base.init`): a real checkpoint brought in by hard links, random weights at a
preset's shapes saved as a checkpoint, and `pretrain` refused for presets it cannot train."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tokenizer

from cheetah.config import ConfigError, load_params
from cheetah.io import DataError
from cheetah.model.backbones import build_backbone, load_backbone, save_backbone
from cheetah.train.base import base_stage


def _params(tmp_path, **base):
    overrides = [f"base.{k}={json.dumps(v)}" for k, v in {"out": str(tmp_path / "out"),
                                                          "metrics": str(tmp_path / "base.json"), **base}.items()]
    return load_params(None, overrides)


def test_checkpoint_is_linked_in_and_loads_like_the_original(tmp_path):
    source = save_backbone(build_backbone("tiny", tokenizer=make_tokenizer(), image_size=32, seed=3),
                           tmp_path / "checkpoint")
    metrics = base_stage(_params(tmp_path, init="checkpoint", checkpoint=str(source)))
    out = tmp_path / "out"
    weights = next(source.glob("*.safetensors"))
    assert (out / weights.name).stat().st_ino == weights.stat().st_ino  # a hard link: no second copy
    assert json.loads((out / "cheetah_backbone.json").read_text())["init"] == "checkpoint"
    a, b = load_backbone(source), load_backbone(out)
    assert b.init == "checkpoint" and a.fingerprint() == b.fingerprint() == metrics["fingerprint"]
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert json.loads((tmp_path / "base.json").read_text())["files"] == metrics["files"] > 0
    with pytest.raises(DataError, match="base.checkpoint: .*nowhere: backbone directory not found"):
        base_stage(_params(tmp_path, init="checkpoint", checkpoint=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="names no directory"):
        base_stage(_params(tmp_path, init="checkpoint"))


def test_random_weights_at_a_presets_shapes_are_a_checkpoint_directory(tmp_path):
    params = load_params(None, ["model.preset=mini", "model.dtype=bfloat16", f"base.out={tmp_path / 'out'}",
                                f"base.metrics={tmp_path / 'base.json'}", "base.init=random"])
    metrics = base_stage(params)
    backbone = load_backbone(tmp_path / "out", dtype=torch.bfloat16)
    assert backbone.init == "random" and not backbone.random_weights  # loadable: not in-process weights
    assert backbone.model.config.text_config.vocab_size == 32001  # the preset's rows, whatever the tokenizer's size
    built = build_backbone("mini", tokenizer=make_tokenizer(), dtype=torch.bfloat16)  # what --random-backbone runs
    assert [p.dtype for p in built.model.parameters()] == [p.dtype for p in backbone.model.parameters()]
    assert metrics["parameters"] == sum(p.numel() for p in backbone.model.parameters())
    with pytest.raises(ConfigError, match="`pretrain` trains the embedded `tiny` preset only"):
        base_stage(load_params(None, ["model.preset=mini", "base.init=pretrain"]))


TINY_LANGUAGE = ["language.steps=4", "language.batch_size=4", "language.warmup_steps=1", "language.eval_scenes=2",
                 "language.threads=1"]


def _language(tmp_path, name: str):
    from cheetah.train.language import pretrain_language

    return pretrain_language(load_params(None, [f"language.out={tmp_path / name}",
                                                f"language.metrics={tmp_path / name}.json", *TINY_LANGUAGE]))


def _pretrain(tmp_path, name: str):
    from cheetah.train.middle_layer import train_middle
    from cheetah.world import write_corpus

    source = tmp_path / "source"
    if not source.exists():
        params = load_params(None, [f"world.out={source}", "world.n=24", "world.image_size=32"])
        write_corpus(params.world)
    if not (tmp_path / "language").exists():
        _language(tmp_path, "language")
        train_middle(load_params(None, [f"language.out={tmp_path / 'language'}", f"middle.out={tmp_path / 'middle'}",
                                        f"middle.metrics={tmp_path / 'middle.json'}", "middle.steps=2",
                                        "middle.batch_size=2", "middle.input_batch=2", "middle.warmup_steps=1",
                                        "middle.eval_scenes=2", "middle.threads=1"]))
    return base_stage(load_params(None, [
        f"world.out={source}", "world.n=24", "world.image_size=32", f"base.out={tmp_path / name}",
        f"middle.out={tmp_path / 'middle'}", "base.middle_batch=2",
        f"base.metrics={tmp_path / name}.json", "base.vision_steps=4", "base.steps=4", "base.batch_size=4",
        "base.yes_no_batch=4", "base.warmup_steps=1", "base.eval_scenes=2", "base.probe_scenes=24",
        "base.probe_heldout=8"]))


# Losses of 4 steps of `cheetah language`, 2 of `cheetah middle` and 4 + 4 steps of `cheetah base` at the settings
# above (means over the steps; recorded with this code, fp32, one thread): a change to the examples, the object
# tokens, the middle layer's vectors, the tag probe, the optimiser or the order of random draws moves them.
GOLDEN_LANGUAGE = {"final_loss": 6.194649}
GOLDEN_BASE = {"final_vision_loss": 37.90176, "final_loss": 5.578401, "final_yes_no_loss": 3.024377,
               "final_middle_loss": 4.079171}


def test_language_pretraining_golden_loss_determinism_and_link_0_metrics(tmp_path, one_thread):
    first, again = _language(tmp_path, "a"), _language(tmp_path, "b")
    assert first["final_loss"] == again["final_loss"]
    assert {k: first[k] for k in GOLDEN_LANGUAGE} == pytest.approx(GOLDEN_LANGUAGE, rel=1e-4)
    assert load_backbone(tmp_path / "a").fingerprint() == load_backbone(tmp_path / "b").fingerprint()
    metrics = json.loads((tmp_path / "a.json").read_text())
    for key in ("yes_no_primary_accuracy", "yes_no_detail_accuracy", "differences_content_small",
                "differences_content_large"):
        assert 0 <= metrics[key] <= 100
    from cheetah.world import PERCEPTION_KINDS

    assert metrics["yes_no"]["detail"]["n"] == 2 * 2 * len(PERCEPTION_KINDS)  # 2 scenes x (yes, no) x each kind
    assert len(metrics["differences"]["small"]["examples"]) == 2


def test_base_pretraining_starts_from_the_language_model_golden_losses_and_determinism(tmp_path, one_thread):
    first = _pretrain(tmp_path, "a")
    again = _pretrain(tmp_path, "b")
    losses = {k: first[k] for k in GOLDEN_BASE}
    assert losses == {k: again[k] for k in GOLDEN_BASE}  # the same seed, the same losses, bit for bit
    assert losses == pytest.approx(GOLDEN_BASE, rel=1e-4)
    assert set(first["probe"]) == {"vit_large", "vit_small", "qformer_large", "qformer_small"}
    a, b = load_backbone(tmp_path / "a"), load_backbone(tmp_path / "b")
    assert a.fingerprint() == b.fingerprint()
    # The language model it started from (the middle stage's): its tokenizer, and its weights (moved by the base's
    # 4 steps only).
    language = load_backbone(tmp_path / "middle")
    assert a.tokenizer.get_vocab() == language.tokenizer.get_vocab()
    start, end = language.model.language_model.state_dict(), a.model.language_model.state_dict()
    assert max((end[k] - start[k]).abs().max().item() for k in start) < 0.05
    # Without one, the stage says which folder and what to run.
    with pytest.raises(DataError, match=r"nowhere: no pretrained language model here .*cheetah middle"):
        base_stage(load_params(None, [f"world.out={tmp_path / 'source'}", "world.image_size=32",
                                      f"base.out={tmp_path / 'c'}", f"base.metrics={tmp_path / 'c'}.json",
                                      f"middle.out={tmp_path / 'nowhere'}"]))


def test_bucketed_language_loss_equals_the_padded_batch_loss(tiny_backbone):
    """`lm_loss` splits a batch by length to pad less; its value (and gradient) must be the padded batch's."""
    from cheetah.model.prompts import PromptBuilder
    from cheetah.train.language import lm_loss

    torch.manual_seed(0)
    model, builder = tiny_backbone.model, PromptBuilder.for_backbone(tiny_backbone, max_length=128)
    rows = [("<image> Is there a large red star in the image? Please answer yes or no.", 1, "Yes"),
            ("<image> <image> Describe the second image briefly.", 2, "a large blue dotted circle on a red background"),
            ("<image> What colour is the large star?", 1, "red"),
            ("<image> <image> What changed? Tell me in one sentence.", 2,
             "In the second image, the large red star at the top left is now striped")]
    samples = [builder.encode(text, n, response) for text, n, response in rows]
    assert len({len(s.input_ids) for s in samples}) > 2  # lengths differ: the buckets pad less than one batch
    q, d = tiny_backbone.num_query_tokens, model.config.text_config.hidden_size
    visual = [torch.randn(n * q, d) for _, n, _ in rows]  # image tokens in the language model's input space

    def padded(samples, visual):
        batch = builder.collate(samples, "right")
        if visual is None:
            return model.language_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        labels=batch["labels"]).loss
        mask = (batch["input_ids"] == model.config.image_token_index).unsqueeze(-1)
        inputs = model.get_input_embeddings()(batch["input_ids"]).masked_scatter(mask, torch.cat(visual))
        return model.language_model(inputs_embeds=inputs, attention_mask=batch["attention_mask"],
                                    labels=batch["labels"]).loss

    for vis in (visual, None):
        texts = samples if vis is not None else [builder.encode(t.replace("<image>", ""), 0, r) for t, _, r in rows]
        expected, got = padded(texts, vis), lm_loss(model, builder, texts, vis)
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
        grads = []
        for loss in (expected, got):
            model.zero_grad()
            loss.backward()
            grads.append(model.language_model.lm_head.weight.grad.clone())
        assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert lm_loss(model, builder, []).item() == 0.0
