"""The language stage of the embedded default: pretrain the `tiny` language model on the world's language alone.

This plays the part of Vicuna in the paper: a language model that, before it is given eyes, can already talk about
whatever its input holds — here, compare two scenes' objects and name what changed, answer Yes/No and open questions
about any object, caption a scene. Its input is scenes as **object tokens** (cheetah/train/world_examples.py): every
object, large or small, and the background, one input vector each. The base stage starts from it, learns to see
(the vision phase) and aligns the visual prompt to what this model reads; VPG-C later adds what the visual prompt
dropped, and this model can use it only because it learned here to read every object.

Why a stage of its own: comparing two scenes' objects is learned late by a model this small (thousands of steps,
docs/miniature.md points 4 and 8), far past what `make run` can afford; like Vicuna's weights, its output is
committed and DVC reruns it only when its code or parameters change.

Output: a backbone directory (`language.out`; its vision side untrained, unused) whose language model and tokenizer
the base stage takes, and `metrics/language.json`: Yes/No about large and small objects and difference descriptions
of a small and of a large edit, from object tokens of held-out scenes (link 0 of the chain).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from cheetah.config import ConfigError, LanguageConfig, Params
from cheetah.formats import IMAGE_TOKEN
from cheetah.io import (METRICS_KIND, atomic_dir, atomic_write_json, check_output, check_output_file, lock_output,
                        write_metrics)
from cheetah.model.backbones import BACKBONE_KIND, build_backbone, save_backbone
from cheetah.model.prompts import PromptBuilder
from cheetah.progress import StageBar
from cheetah.train.schedule import lr_lambda
from cheetah.train.world_examples import (Example, ObjectTokens, caption_example, difference_example,
                                          yes_no_example)
from cheetah.world import SIZES, Scene, generate_scene, heldout_scenes, sample_question, train_tokenizer

LANGUAGE_STREAM = 30_000
"""The object-token scenes' own seed stream (the corpus uses world.seed, held-out scenes world.heldout_seed), drawn
afresh for every example: they cost no rendering, and must not be learned by heart."""

TASKS = (("difference", 2), ("yes_no", 1), ("question", 1), ("caption", 0.25))
"""What a step's examples are, by weight: mostly two-scene differences (the comparison is what takes longest), Yes/No
and open questions about an object of either size, and captions (the form the base stage aligns the visual prompt
with)."""


def language_example(scene: Scene, rng: np.random.Generator) -> Example:
    """One example about `scene` (and, for a difference, an edit of one of its objects of either size)."""
    names = [t for t, _ in TASKS]
    weights = np.array([w for _, w in TASKS], dtype=float)
    task = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    if task == "difference":
        return difference_example(scene, rng, SIZES[int(rng.integers(len(SIZES)))])
    if task == "yes_no":
        return yes_no_example(scene, rng, None)
    if task == "question":
        qa = sample_question(scene, rng)
        return Example(f"{IMAGE_TOKEN} {qa.question}", qa.answer, (scene,))
    return caption_example(scene, rng)


def fresh_scenes(seed: int, rng: np.random.Generator, n: int) -> list[Scene]:
    """`n` scenes never seen before: random indices of the language stream of `seed`."""
    return [generate_scene(LANGUAGE_STREAM + seed, int(i)) for i in rng.integers(2**31, size=n)]


def lm_loss(model: Any, builder: PromptBuilder, samples: list[Any],
            image_tokens: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The language model's token-mean loss on `samples` (`Encoded`), each with its images' tokens in the language
    model's input space (`image_tokens`: one (images x queries, H) tensor per sample; None: text only). Computed in
    two length buckets, so a short Yes/No question is not padded to the longest two-image sample: the same value as
    one padded batch on fewer tokens."""
    if not samples:
        return torch.zeros(())
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    lengths = [len(samples[i].input_ids) for i in order]
    n = len(order)
    cut = min(range(1, n + 1), key=lambda k: k * lengths[k - 1] + (n - k) * lengths[-1])  # the least padding
    targets = sum(s.num_targets for s in samples)
    loss = torch.zeros(())
    for part in (order[:cut], order[cut:]):
        if not part:
            continue
        batch = builder.collate([samples[i] for i in part], "right")
        if image_tokens is None:
            inputs = {"input_ids": batch["input_ids"]}
        else:
            mask = (batch["input_ids"] == model.config.image_token_index).unsqueeze(-1)
            tokens = torch.cat([image_tokens[i] for i in part])
            inputs = {"inputs_embeds": model.get_input_embeddings()(batch["input_ids"]).masked_scatter(mask, tokens)}
        # num_items_in_batch: each bucket's summed loss over the whole batch's targets, so the buckets add up to
        # the batch's token mean.
        loss = loss + model.language_model(**inputs, attention_mask=batch["attention_mask"], labels=batch["labels"],
                                           num_items_in_batch=targets).loss
    return loss


def log_phase(step: int, steps: int, phase: str, values: dict[str, float], scheduler: Any) -> None:
    """Every 20th step's `values` (and the learning rate) to the stage's MLflow run, as `<phase>_<name>`."""
    from cheetah.tracking import log_steps

    if (step + 1) % 20 == 0 or step + 1 == steps:
        log_steps([(step + 1, {**{f"{phase}_{k}": v for k, v in values.items()},
                               f"{phase}_lr": scheduler.get_last_lr()[0]})])


def object_token_loss(model: Any, builder: PromptBuilder, tokens: ObjectTokens, examples: list[Example],
                      rng: np.random.Generator) -> torch.Tensor:
    """The language model's token-mean loss on `examples`, their scenes given as object tokens."""
    embedding = model.get_input_embeddings()
    encoded = [builder.encode(e.instruction, len(e.scenes), e.response) for e in examples]
    return lm_loss(model, builder, encoded, [tokens.embed(e.scenes, embedding.weight, rng) for e in examples])


def pretrain_language(params: Params) -> dict[str, Any]:
    """`cheetah language`: train the tiny language model from scratch on object tokens; write it to `language.out`
    and its metrics to `language.metrics`; returns the metrics."""
    cfg = params.language
    if params.base.init != "pretrain":
        return _not_used(params)
    if params.model.preset != "tiny":
        raise ConfigError(f"the language stage pretrains the embedded `tiny` preset only, not {params.model.preset!r} "
                          "(a real preset brings its language model with its checkpoint: base.init `checkpoint`)")
    check_output(cfg.out, BACKBONE_KIND)
    lock_output(cfg.out)
    check_output_file(cfg.metrics, METRICS_KIND)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        tokenizer = train_tokenizer(cfg.vocab_size)
        backbone = build_backbone("tiny", tokenizer=tokenizer, image_size=params.world.image_size, seed=cfg.seed)
        model = backbone.model
        builder = PromptBuilder.for_backbone(backbone, max_length=128)
        tokens = ObjectTokens(tokenizer, backbone.num_query_tokens)
        started = time.perf_counter()
        losses = train(model, builder, tokens, cfg, rng)
        seconds = time.perf_counter() - started
        model.eval()
        model.requires_grad_(False)
        metrics = {"steps": cfg.steps, "threads": cfg.threads, "train_seconds": round(seconds, 1),
                   "final_loss": float(np.mean(losses[-100:])),
                   **measure_language(model, builder, tokens, list(heldout_scenes(params.world, cfg.eval_scenes))),
                   "parameters": sum(p.numel() for p in model.language_model.parameters())}
    finally:
        torch.set_num_threads(threads)
    save_backbone(backbone, cfg.out, extra_meta={"init": "language", "language_metrics": _headline(metrics)})
    write_metrics(cfg.metrics, metrics)
    return _headline(metrics)


def _not_used(params: Params) -> dict[str, Any]:
    """`base.init` `checkpoint` or `random`: the language model comes with the backbone, nothing is trained. The
    stage still writes its outputs (a note saying so), as DVC runs every stage of the pipeline at every scale."""
    cfg = params.language
    metrics = {"used": False, "reason": f"base.init is {params.base.init!r}: the language model comes with the "
                                        "backbone the base stage brings in"}
    check_output_file(cfg.metrics, METRICS_KIND)
    with atomic_dir(cfg.out, kind=BACKBONE_KIND) as tmp:
        atomic_write_json(tmp / "not_used.json", metrics)
    write_metrics(cfg.metrics, metrics)
    return metrics


def train(model: Any, builder: PromptBuilder, tokens: ObjectTokens, cfg: LanguageConfig,
          rng: np.random.Generator) -> list[float]:
    """`cfg.steps` AdamW steps of `cfg.batch_size` fresh object-token examples (`language_example`) on the language
    model and its embeddings; returns the loss per step."""
    params = list(model.language_model.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.steps, "cosine"))
    model.language_model.train()
    losses = []
    bar = StageBar("language model", cfg.steps, "steps")
    for step in range(cfg.steps):
        examples = [language_example(s, rng) for s in fresh_scenes(cfg.seed, rng, cfg.batch_size)]
        loss = object_token_loss(model, builder, tokens, examples, rng)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        log_phase(step, cfg.steps, "language", {"loss": losses[-1]}, scheduler)
        bar.update()
    bar.close()
    model.language_model.eval()
    return losses


def measure_language(model: Any, builder: PromptBuilder, tokens: ObjectTokens, heldout: list[Scene]
                     ) -> dict[str, Any]:
    """Link 0 on held-out scenes given as object tokens: Yes/No about the large and the small objects, and the
    content of difference descriptions of a small and of a large edit (cheetah/evaluate/object_tokens.py)."""
    from cheetah.evaluate.object_tokens import object_token_differences, object_token_yes_no

    yes_no = object_token_yes_no(model, builder, tokens, heldout)
    differences = {size: object_token_differences(model, builder, tokens, heldout, size) for size in SIZES}
    return {
        "yes_no_primary_accuracy": yes_no["primary"]["accuracy"],
        "yes_no_detail_accuracy": yes_no["detail"]["accuracy"],
        **{f"differences_content_{size}": differences[size]["content"] for size in SIZES},
        "yes_no": yes_no,
        "differences": differences,
    }


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in ("yes_no", "differences")}
