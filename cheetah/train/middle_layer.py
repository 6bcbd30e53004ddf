"""Details that arrive at the language model's middle layer — the form of VPG-C's correction — and the language
model learning to read them there.

VPG-C adds its correction to the image tokens' hidden states at `update_layer`, the middle of the LLM (paper §2.1).
A 32-layer Vicuna uses what arrives there with the 16 layers above. The embedded 4-layer language model, trained on
inputs only, reads images in its first layer alone: what reaches the image tokens later changes no answer, whatever
VPG-C fetches (docs/miniature.md point 10). It learns to read a detail arriving at its middle layer as it learned to
read one at its input — from examples where details arrive there, after thousands of steps (point 12). This module
gives those examples, in the form a perfect VPG-C's correction takes: per image token, the object-token vector of one
of the image's small objects (cheetah/train/world_examples.py), added at the middle layer.

- `MiddleLayer` adds queued vectors to the image tokens' hidden states at one layer, for the next forward pass.
- `SplitObjectTokens` shows scenes (like `ObjectTokens.embed`, so the measurements of
  cheetah/evaluate/object_tokens.py take it as it is) split the way the pipeline splits them: the large objects
  and the background as object tokens at the input, the small objects at the middle layer on the positions left
  empty.
- `train_middle`: the `middle` stage (after the language stage, before the base stage) trains the language model on
  split examples beside ordinary ones. The base stage keeps a share of examples whose small objects arrive at the
  middle layer on its visual prompt (cheetah/train/base.py `PromptWithDetails`, with `late_vectors`), so the base
  it writes reads details where VPG-C adds them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cheetah.config import ConfigError, MiddleConfig, Params
from cheetah.devices import torch_threads
from cheetah.io import (METRICS_KIND, DataError, atomic_dir, atomic_write_json, check_output, check_output_file,
                        lock_output, write_metrics)
from cheetah.model.backbones import BACKBONE_KIND, load_backbone, save_backbone
from cheetah.model.prompts import PromptBuilder
from cheetah.progress import StageBar
from cheetah.train.language import (_headline, fresh_scenes, language_example, log_phase, measure_language,
                                    object_token_loss)
from cheetah.train.schedule import lr_lambda
from cheetah.train.world_examples import Example, ObjectTokens, object_phrases
from cheetah.world import Scene, heldout_scenes, where


def middle_layer_index(model: Any, update_layer: int | None) -> int:
    """The LLM layer VPG-C corrects (`model.update_layer`; None: the middle, as `VPGCModel` takes it)."""
    return model.config.text_config.num_hidden_layers // 2 if update_layer is None else int(update_layer)


class MiddleLayer:
    """Adds queued vectors to the image tokens' hidden states at LLM layer `layer` in the next forward pass, as VPG-C
    adds its correction. The image tokens are those of the ids the input embedding last looked up (the prompt's),
    the vectors queued in the order of the images. A context manager: leaving it removes the hooks."""

    def __init__(self, model: Any, layer: int):
        self.image_token = model.config.image_token_index
        self._queued: list[torch.Tensor] = []
        self._mask: torch.Tensor | None = None
        layers = model.language_model.get_decoder().layers
        self._handles = [model.get_input_embeddings().register_forward_hook(self._saw_ids),
                         layers[layer].register_forward_pre_hook(self._add, with_kwargs=True)]

    def queue(self, vectors: torch.Tensor) -> None:
        self._queued.append(vectors)

    def _saw_ids(self, module: Any, args: tuple, output: torch.Tensor) -> None:
        self._mask = args[0] == self.image_token

    def _add(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self._queued:
            return None
        vectors, self._queued = torch.cat(self._queued), []
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if self._mask is None or self._mask.shape != hidden.shape[:2] or int(self._mask.sum()) != len(vectors):
            raise RuntimeError(f"{len(vectors)} vectors queued for the middle layer do not fit the prompt's image "
                               "tokens")
        hidden = hidden + torch.zeros_like(hidden).masked_scatter(self._mask.unsqueeze(-1), vectors.to(hidden.dtype))
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": hidden}
        return (hidden, *args[1:]), kwargs

    def __enter__(self) -> MiddleLayer:
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._queued = []


def _slot_vectors(tokens: ObjectTokens, slots: Sequence[str | None], embedding: torch.Tensor) -> torch.Tensor:
    """(len(slots), H): each slot's object-token vector (the sum of its words' embeddings); the pad token's
    embedding for an empty slot (None), as `ObjectTokens` pads."""
    ids, offsets = [], []
    for phrase in slots:
        offsets.append(len(ids))
        ids.extend(tokens._phrase_ids(phrase) if phrase else [tokens.tokenizer.pad_token_id])
    return torch.nn.functional.embedding_bag(torch.tensor(ids), embedding, torch.tensor(offsets), mode="sum")


def late_vectors(tokens: ObjectTokens, slots: Sequence[str | None], embedding: torch.Tensor, scale: float
                 ) -> torch.Tensor:
    """What arrives at the middle layer: each slot's object-token vector x `scale`; zero for an empty slot."""
    filled = torch.tensor([[float(p is not None)] for p in slots])
    return _slot_vectors(tokens, slots, embedding) * filled * scale


def detail_phrases(scene: Scene) -> list[str]:
    """What the object tokens of the scene's small objects name."""
    return [where(o.attrs()) for o in scene.details]


class SplitObjectTokens:
    """Scenes as object tokens split the way the pipeline splits them: the large objects and the background at the
    input (what the caption-trained visual prompt carries), the small objects' vectors (x `scale`) added at the middle
    layer (`middle`) on image positions that hold the pad embedding at the input."""

    def __init__(self, tokens: ObjectTokens, middle: MiddleLayer, scale: float):
        self.tokens, self.middle, self.scale = tokens, middle, scale

    def embed(self, scenes: Sequence[Scene], embedding: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        n = self.tokens.num_tokens
        at_input: list[str | None] = []
        later: list[str | None] = []
        for scene in scenes:
            details = detail_phrases(scene)
            early = [where(o.attrs()) for o in scene.primary] + object_phrases(scene)[-1:]  # + the background
            slots_in = early + [None] * (n - len(early))
            slots_late = [None] * len(early) + details + [None] * (n - len(early) - len(details))
            for k in rng.permutation(n):
                at_input.append(slots_in[k])
                later.append(slots_late[k])
        self.middle.queue(late_vectors(self.tokens, later, embedding, self.scale))
        return _slot_vectors(self.tokens, at_input, embedding)


def shown_loss(model: Any, builder: PromptBuilder, examples: list[Example], shown: Any,
               rng: np.random.Generator) -> torch.Tensor:
    """The language model's token-mean loss on `examples`, their scenes shown by `shown` (`embed` queues the
    middle layer's vectors in the examples' order): one padded batch, as the queue holds the whole batch."""
    embedding = model.get_input_embeddings()
    batch = builder.collate([builder.encode(e.instruction, len(e.scenes), e.response) for e in examples], "right")
    inputs = embedding(batch["input_ids"])  # the middle layer takes the image positions from these ids
    images = torch.cat([shown.embed(e.scenes, embedding.weight, rng) for e in examples])
    inputs = inputs.masked_scatter((batch["input_ids"] == model.config.image_token_index).unsqueeze(-1), images)
    return model.language_model(inputs_embeds=inputs, attention_mask=batch["attention_mask"],
                                labels=batch["labels"]).loss


def train_middle(params: Params) -> dict[str, Any]:
    """`cheetah middle`: the language stage's language model (`language.out`), trained further to read the small
    objects arriving at the middle layer; written to `middle.out`, metrics to `middle.metrics`."""
    cfg = params.middle
    if params.base.init != "pretrain":
        return _not_used(params)
    if params.model.preset != "tiny":
        raise ConfigError(f"the middle stage trains the embedded `tiny` preset only, not {params.model.preset!r} (a "
                          "real preset's LLM reads its middle layer already: base.init `checkpoint`)")
    check_output(cfg.out, BACKBONE_KIND, protect=[params.language.out])
    lock_output(cfg.out)
    check_output_file(cfg.metrics, METRICS_KIND)
    if not Path(params.language.out).is_dir():
        raise DataError(f"{params.language.out}: no pretrained language model here (language.out); run "
                        "`cheetah language` first (`dvc repro` and `make run` do)")
    with torch_threads(cfg.threads):
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        backbone = load_backbone(params.language.out)
        model = backbone.model
        builder = PromptBuilder.for_backbone(backbone, max_length=160)
        tokens = ObjectTokens(backbone.tokenizer, backbone.num_query_tokens)
        layer = middle_layer_index(model, params.model.update_layer)
        started = time.perf_counter()
        with MiddleLayer(model, layer) as middle:
            split = SplitObjectTokens(tokens, middle, cfg.scale)
            losses = _train(model, builder, tokens, split, cfg, rng)
            seconds = time.perf_counter() - started
            model.eval()
            model.requires_grad_(False)
            heldout = list(heldout_scenes(params.world, cfg.eval_scenes))
            metrics = {"steps": cfg.steps, "threads": cfg.threads, "layer": layer, "scale": cfg.scale,
                       "train_seconds": round(seconds, 1), "final_loss": float(np.mean(losses[-100:])),
                       "middle": _headline(measure_language(model, builder, split, heldout)),
                       "input": _headline(measure_language(model, builder, tokens, heldout))}
    save_backbone(backbone, cfg.out, extra_meta={"init": "middle", "middle_metrics": metrics},
                  protect=[params.language.out])
    write_metrics(cfg.metrics, metrics)
    return metrics


def _not_used(params: Params) -> dict[str, Any]:
    """`base.init` `checkpoint` or `random`: nothing to train (a real LLM reads its middle layer); the stage writes
    a note in its outputs, as DVC runs every stage at every scale."""
    cfg = params.middle
    metrics = {"used": False, "reason": f"base.init is {params.base.init!r}: the language model comes with the "
                                        "backbone the base stage brings in"}
    check_output_file(cfg.metrics, METRICS_KIND)
    with atomic_dir(cfg.out, kind=BACKBONE_KIND) as tmp:
        atomic_write_json(tmp / "not_used.json", metrics)
    write_metrics(cfg.metrics, metrics)
    return metrics


def _train(model: Any, builder: PromptBuilder, tokens: ObjectTokens, split: SplitObjectTokens, cfg: MiddleConfig,
           rng: np.random.Generator) -> list[float]:
    params = list(model.language_model.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.steps, "constant"))
    model.language_model.train()
    losses = []
    bar = StageBar("middle: language model", cfg.steps, "steps")
    for step in range(cfg.steps):
        late = [language_example(s, rng) for s in fresh_scenes(cfg.seed, rng, cfg.batch_size)]
        loss = shown_loss(model, builder, late, split, rng)
        told = [language_example(s, rng) for s in fresh_scenes(cfg.seed, rng, cfg.input_batch)]
        loss = loss + object_token_loss(model, builder, tokens, told, rng)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        log_phase(step, cfg.steps, "middle", {"loss": losses[-1]}, scheduler)
        bar.update()
    bar.close()
    model.language_model.eval()
    return losses

