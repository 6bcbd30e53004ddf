"""VPG-C: the Visual Prompt Generator Complete, attached to a frozen BLIP-2-family backbone.

What it does, for a batch of interleaved image-text prompts (paper §2.1, official `modeling_llama.py` L556-578):

1. Every image runs through the frozen ViT once. The frozen Q-Former turns the ViT features into
   `num_query_tokens` visual tokens, which replace that image's block of `<image>` tokens in the LLM input.
2. The LLM runs its first `update_layer` layers (default L/2). There, the hidden state of each sample's last
   instruction token is the *guide*.
3. `qformer_proj(guide)` (zero-initialised Linear H->Q) is added to a new set of learnable queries, initialised from
   the backbone's query tokens. The same frozen Q-Former re-runs, query-only, over each image's (cached) ViT
   features with its sample's guided queries.
4. `llm_proj` (zero-initialised Linear Q->H) of the result is added to that image's token positions, out of place,
   and the remaining layers run on the corrected hidden states.

Because both projections start at zero, the model equals the backbone exactly at initialisation. During generation
the correction happens only at prefill; the KV cache of the layers above carries it to every decoding step. Only
the VPG-C parameters (about 6.3M for the 7B shapes) are trainable.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from cheetah.model.backbones import Backbone
from cheetah.model.prompts import position_ids_from_mask


class VPGC(nn.Module):
    """The trainable module: guided queries and the two projections."""

    def __init__(self, llm_hidden_size: int, qformer_hidden_size: int, init_query_tokens: torch.Tensor):
        super().__init__()
        # A *new* set of queries, initialised from the backbone's (official: init_query_tokens_value).
        self.query_tokens = nn.Parameter(init_query_tokens.detach().clone().float())
        self.qformer_proj = nn.Linear(llm_hidden_size, qformer_hidden_size, device=init_query_tokens.device)
        self.llm_proj = nn.Linear(qformer_hidden_size, llm_hidden_size, device=init_query_tokens.device)
        self.reset_projections()

    def reset_projections(self) -> None:
        """Zero-init both projections (ControlNet-style): the module is an exact identity before training."""
        for linear in (self.qformer_proj, self.llm_proj):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def guided_queries(self, guide: torch.Tensor) -> torch.Tensor:
        """(B, H) guide -> (B, Q_len, Q) queries."""
        guide = guide.to(self.qformer_proj.weight.dtype)
        return self.query_tokens + self.qformer_proj(guide).unsqueeze(1)

    def residual(self, qformer_output: torch.Tensor) -> torch.Tensor:
        return self.llm_proj(qformer_output.to(self.llm_proj.weight.dtype))


@dataclasses.dataclass
class _Injection:
    """What the hook at `update_layer` needs for one forward pass through the LLM."""

    image_mask: torch.Tensor  # (B, S) bool: image-token positions
    guide_positions: torch.Tensor  # (B,) index of each sample's last instruction token
    vision_features: torch.Tensor  # (N_img, P, D_vision), ViT output (post-LayerNorm)
    image_owner: torch.Tensor  # (N_img,) sample index of each image, in order of appearance


class VPGCModel(nn.Module):
    """A frozen backbone plus VPG-C. `forward` for training and scoring, `generate` for answers."""

    def __init__(self, backbone: Backbone, update_layer: int | None = None, vpgc: VPGC | None = None,
                 qformer_dropout: bool = False):
        super().__init__()
        self.backbone_info = backbone  # tokenizer, template, source: not a module
        self.backbone = backbone.model
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        text_cfg = self.backbone.config.text_config
        n_layers = text_cfg.num_hidden_layers
        self.update_layer = n_layers // 2 if update_layer is None else int(update_layer)
        if not 1 <= self.update_layer < n_layers:
            raise ValueError(f"update_layer must be in [1, {n_layers - 1}] for a {n_layers}-layer LLM, "
                             f"got {self.update_layer}")
        self.num_query_tokens = self.backbone.config.num_query_tokens
        self.image_token_id = self.backbone.config.image_token_index
        self.vpgc = vpgc if vpgc is not None else VPGC(
            text_cfg.hidden_size, self.backbone.config.qformer_config.hidden_size, self.backbone.query_tokens
        )
        self._pending: _Injection | None = None
        # A plain list, not a ModuleList: the layers are already registered under `backbone`.
        self._layers: list[nn.Module] = list(self.language_model.get_decoder().layers)
        self._hook = self._layers[self.update_layer].register_forward_pre_hook(self._inject, with_kwargs=True)
        self.gradient_checkpointing = False
        self.qformer_dropout = bool(qformer_dropout)
        self.train(self.training)

    # -- parts ---------------------------------------------------------------------------------------------------

    @property
    def language_model(self) -> nn.Module:
        return self.backbone.language_model

    @property
    def is_instructblip(self) -> bool:
        return self.backbone_info.is_instructblip

    @property
    def _qformer_dtype(self) -> torch.dtype:
        # BLIP-2 keeps the Q-Former in fp32 (`_keep_in_fp32_modules`); the guided queries must match it.
        return next(self.backbone.qformer.parameters()).dtype

    def train(self, mode: bool = True) -> "VPGCModel":
        # The backbone is frozen: it stays in eval mode (no dropout) whatever the trainer asks - except, with
        # `qformer_dropout`, the Q-Former in training, as the official model leaves it (its weights frozen, its
        # mode not: cheetah_vicuna.py L87-91, where the ViT gets eval() + disabled_train, L63-71).
        super().train(mode)
        self.backbone.eval()
        if mode and getattr(self, "qformer_dropout", False):
            self.backbone.qformer.train()
        return self

    @classmethod
    def from_pretrained(cls, directory: str | Path, backbone: Backbone | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        check_backbone: bool = True) -> "VPGCModel":
        """VPG-C weights from `directory`, on `backbone` or on the backbone its card records."""
        from cheetah.model.backbones import load_backbone
        from cheetah.model.weights import load_vpgc, read_card

        card = read_card(directory)
        if backbone is None:
            location = card["backbone"]
            if not Path(location).is_dir() and card.get("backbone_abspath") and Path(card["backbone_abspath"]).is_dir():
                location = card["backbone_abspath"]
            backbone = load_backbone(location, device=device, dtype=dtype, template=card.get("template"))
        model = cls(backbone, update_layer=card["update_layer"])
        load_vpgc(model, directory, check_backbone=check_backbone)
        return model.to(device)

    def detach_from_backbone(self) -> None:
        """Remove the hook, leaving the backbone as it was (e.g. to attach another VPG-C)."""
        self._hook.remove()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the layers above `update_layer` in backward instead of storing their activations.

        Hugging Face's own checkpointing only engages in `train()` mode, which would also switch on the frozen LLM's
        dropout, so the layers are wrapped here. The layers below need no checkpointing: nothing there requires
        grad, so autograd records nothing. Non-reentrant checkpointing works although the frozen layers' inputs
        are the only path to the trainable parameters.
        """
        if self.gradient_checkpointing:
            return
        for layer in self._layers[self.update_layer:]:
            layer.forward = _checkpointed(layer.forward)
        self.gradient_checkpointing = True

    def summary(self) -> dict[str, Any]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.trainable_parameters())
        cfg = self.backbone.config
        return {
            "backbone": self.backbone_info.source,
            "backbone_class": type(self.backbone).__name__,
            "language_model": cfg.text_config.model_type,
            "total_parameters": total,
            "trainable_parameters": trainable,
            "trainable_percent": round(100 * trainable / total, 4),
            "vpgc_parameters": {n: p.numel() for n, p in self.vpgc.named_parameters()},
            "update_layer": self.update_layer,
            "num_llm_layers": cfg.text_config.num_hidden_layers,
            "num_query_tokens": self.num_query_tokens,
            "llm_hidden_size": cfg.text_config.hidden_size,
            "qformer_hidden_size": cfg.qformer_config.hidden_size,
            "image_size": cfg.vision_config.image_size,
            "template": self.backbone_info.template.name,
        }

    # -- images --------------------------------------------------------------------------------------------------

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen ViT output (post-LayerNorm, LAVIS's `ln_vision`), (N_img, P, D). Cacheable: it never changes."""
        dtype = self.backbone.vision_model.embeddings.patch_embedding.weight.dtype
        return self.backbone.vision_model(pixel_values=pixel_values.to(dtype)).last_hidden_state

    def _qformer(self, queries: torch.Tensor, features: torch.Tensor,
                 text: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Query the frozen Q-Former over image features, as Hugging Face's `get_image_features` does."""
        feature_mask = torch.ones(features.shape[:-1], dtype=torch.long, device=features.device)
        if not self.is_instructblip:
            out = self.backbone.qformer(query_embeds=queries, encoder_hidden_states=features,
                                        encoder_attention_mask=feature_mask, return_dict=True)
            return out.last_hidden_state
        if text is None:
            input_ids, attention_mask = None, None
        else:
            query_mask = torch.ones(queries.shape[:-1], dtype=torch.long, device=queries.device)
            input_ids = text["qformer_input_ids"]
            attention_mask = torch.cat([query_mask, text["qformer_attention_mask"]], dim=1)
        out = self.backbone.qformer(input_ids=input_ids, attention_mask=attention_mask, query_embeds=queries,
                                    encoder_hidden_states=features, encoder_attention_mask=feature_mask,
                                    return_dict=True)
        return out.last_hidden_state[:, : queries.shape[1], :]

    def image_embeddings(self, vision_features: torch.Tensor,
                         qformer_text: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """First pass of the visual prompt generator: (N_img, num_query_tokens, H) LLM-space image tokens."""
        queries = self.backbone.query_tokens.expand(vision_features.shape[0], -1, -1)
        query_output = self._qformer(queries, vision_features, qformer_text)
        if query_output.dtype != vision_features.dtype:  # the Q-Former is kept in fp32
            query_output = query_output.to(vision_features.dtype)
        return self.backbone.language_projection(query_output)

    # -- inputs --------------------------------------------------------------------------------------------------

    def _image_layout(self, input_ids: torch.Tensor, num_images: int,
                      image_counts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-token mask and the owning sample of every image; refuses any mismatch with the images given. The
        checks read the device once (a GPU's queue is not stalled more than that); a failure is then described."""
        mask = input_ids == self.image_token_id
        per_sample = mask.sum(dim=1)
        counts = per_sample // self.num_query_tokens
        if image_counts is not None and len(image_counts) != len(counts):
            raise ValueError(f"{len(image_counts)} image counts for {len(counts)} samples")
        wrong = ((per_sample % self.num_query_tokens) != 0).any() | (counts.sum() != num_images)
        if image_counts is not None:
            wrong = wrong | (counts != image_counts.to(counts.device)).any()
        if bool(wrong):
            if bool((per_sample % self.num_query_tokens != 0).any()):
                bad = int(torch.nonzero(per_sample % self.num_query_tokens)[0])
                raise ValueError(f"sample {bad} has {int(per_sample[bad])} image tokens, not a multiple of "
                                 f"num_query_tokens={self.num_query_tokens}")
            if image_counts is not None and not torch.equal(counts.cpu(), image_counts.cpu()):
                raise ValueError(f"image placeholders per sample {counts.tolist()} differ from the images given "
                                 f"{image_counts.tolist()}")
            raise ValueError(f"the prompts hold {int(counts.sum())} image blocks but {num_images} images were given")
        owner = torch.repeat_interleave(torch.arange(len(counts), device=input_ids.device), counts,
                                        output_size=num_images)
        return mask, owner

    def prepare_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                       vision_features: torch.Tensor | None = None, image_counts: torch.Tensor | None = None,
                       guide_positions: torch.Tensor | None = None,
                       qformer_text: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, _Injection]:
        """LLM input embeddings with image tokens in place, and what VPG-C needs at `update_layer`."""
        if vision_features is None:
            if pixel_values is None:
                raise ValueError("give pixel_values or precomputed vision_features")
            with torch.no_grad():
                vision_features = self.vision_features(pixel_values)
        else:  # cached features (kept in fp32 on the host) take the vision tower's dtype and device
            ref = self.backbone.vision_model.post_layernorm.weight
            vision_features = vision_features.to(device=ref.device, dtype=ref.dtype)
        mask, owner = self._image_layout(input_ids, vision_features.shape[0], image_counts)
        if guide_positions is None:
            raise ValueError("guide_positions (index of each sample's last instruction token) is required")
        with torch.no_grad():  # the first pass is frozen
            image_embeds = self.image_embeddings(vision_features, qformer_text)
            inputs_embeds = self.backbone.get_input_embeddings()(input_ids)
            inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1), image_embeds.to(inputs_embeds.dtype))
        injection = _Injection(mask, guide_positions.to(input_ids.device), vision_features, owner)
        return inputs_embeds, injection

    # -- the correction, at `update_layer` -----------------------------------------------------------------------

    def _inject(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        injection, self._pending = self._pending, None
        if injection is None:  # decoding steps reuse the KV cache, which already carries the correction
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if hidden.shape[:2] != injection.image_mask.shape:
            raise RuntimeError(f"VPG-C expected hidden states for the whole prompt {tuple(injection.image_mask.shape)}"
                               f", got {tuple(hidden.shape[:2])}")
        residual = self.correction(hidden, injection)
        delta = torch.zeros_like(hidden).masked_scatter(injection.image_mask.unsqueeze(-1), residual)
        hidden = hidden + delta  # out of place: autograd and checkpointing see a plain function
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": hidden}
        return (hidden, *args[1:]), kwargs

    def correction(self, hidden: torch.Tensor, injection: _Injection) -> torch.Tensor:
        """What VPG-C adds to every image's tokens, (N_img, Q_len, H), from the hidden states (B, S, H) at
        `update_layer`: each sample's guide re-queries the frozen Q-Former over its images' features."""
        batch = torch.arange(hidden.shape[0], device=hidden.device)
        guide = hidden[batch, injection.guide_positions]  # (B, H)
        queries = self.vpgc.guided_queries(guide)[injection.image_owner]  # (N_img, Q_len, Q)
        reextracted = self._qformer(queries.to(self._qformer_dtype), injection.vision_features)  # query-only
        return self.vpgc.residual(reextracted).to(hidden.dtype)

    def _run_language_model(self, injection: _Injection, fn: Any, **kwargs: Any) -> Any:
        self._pending = injection
        try:
            out = fn(**kwargs)
        finally:
            leftover, self._pending = self._pending, None
        if leftover is not None:
            raise RuntimeError(f"VPG-C never ran: LLM layer {self.update_layer} was not reached")
        return out

    # -- public API ----------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, guide_positions: torch.Tensor,
                pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, image_counts: torch.Tensor | None = None,
                qformer_input_ids: torch.Tensor | None = None, qformer_attention_mask: torch.Tensor | None = None,
                return_sample_losses: bool = False, **kwargs: Any) -> Any:
        """Logits (and the LM loss on `labels`, -100 elsewhere) with the VPG-C correction applied.

        With `return_sample_losses=True` (training), returns `SampleLosses`: each sample's cross-entropy summed over
        its target tokens and their count, computing the LM head only at those positions — no (batch x length x
        vocab) logits.
        """
        qformer_text = _qformer_text(qformer_input_ids, qformer_attention_mask)
        inputs_embeds, injection = self.prepare_inputs(input_ids, pixel_values, vision_features, image_counts,
                                                       guide_positions, qformer_text)
        lm_inputs = dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        if not return_sample_losses:
            return self._run_language_model(injection, self.language_model, labels=labels, **lm_inputs, **kwargs)
        if labels is None:
            raise ValueError("return_sample_losses needs labels")
        hidden = self._run_language_model(injection, self.language_model.get_decoder(), **lm_inputs, **kwargs)[0]
        return response_losses(hidden, labels, self.language_model.get_output_embeddings())

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 vision_features: torch.Tensor | None = None, guide_positions: torch.Tensor | None = None,
                 image_counts: torch.Tensor | None = None, qformer_input_ids: torch.Tensor | None = None,
                 qformer_attention_mask: torch.Tensor | None = None, **generate_kwargs: Any) -> torch.Tensor:
        """New token ids for left-padded prompts. VPG-C fires once, at prefill."""
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate() needs left-padded prompts (every prompt must end at the last position)")
        if guide_positions is None:
            guide_positions = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        qformer_text = _qformer_text(qformer_input_ids, qformer_attention_mask)
        inputs_embeds, injection = self.prepare_inputs(input_ids, pixel_values, vision_features, image_counts,
                                                       guide_positions, qformer_text)
        # Neither an image placeholder nor padding is ever an answer (a pad id in an answer could not be told from
        # the padding of a batch).
        pad = self.backbone.config.text_config.pad_token_id
        generate_kwargs.setdefault("suppress_tokens", [self.image_token_id, *([pad] if pad is not None else [])])
        return self._run_language_model(
            injection, self.language_model.generate, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            **generate_kwargs,
        )


@dataclasses.dataclass
class SampleLosses:
    """Each sample's next-token cross-entropy over its target tokens, as a sum and a count, so that a training
    step can average over samples or over tokens (`LossReduction`)."""

    token_sums: torch.Tensor  # (B,) summed cross-entropy of each sample's target tokens
    token_counts: torch.Tensor  # (B,) how many target tokens each sample has

    @property
    def sample_losses(self) -> torch.Tensor:
        """(B,) each sample's mean token loss."""
        return self.token_sums / self.token_counts.clamp(min=1)

    @property
    def loss(self) -> torch.Tensor:
        """The mean over samples of their mean token loss."""
        return self.sample_losses.mean()


def response_losses(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> SampleLosses:
    """Next-token cross-entropy summed over each sample's target tokens (labels != -100), and their number.

    The LM head runs only where a token is predicted: no (batch x length x vocab) logits elsewhere."""
    targets = labels[:, 1:]
    selected = targets != -100
    logits = lm_head(hidden[:, :-1][selected]).float()
    token_loss = nn.functional.cross_entropy(logits, targets[selected], reduction="none")
    rows = torch.nonzero(selected, as_tuple=True)[0]
    totals = torch.zeros(labels.shape[0], dtype=token_loss.dtype, device=labels.device).index_add(0, rows, token_loss)
    return SampleLosses(totals, selected.sum(1))


@dataclasses.dataclass(frozen=True)
class LossReduction:
    """How one optimiser step averages its losses (`train.loss_reduction`), whatever its split into `parts`
    micro-batches (data-parallel ranks x gradient-accumulation steps), even or not.

    - `sample`: each sample's mean token loss, averaged over the step's samples: every sample weighs the same.
    - `token`: every target token's loss, averaged over all target tokens of the step (counted over every rank):
      the official model's loss, Hugging Face's `CrossEntropyLoss()` mean over the batch (`modeling_llama.py`
      L736-746), where long answers weigh more.

    DeepSpeed divides each micro-batch's loss by the accumulation steps and averages gradients over ranks, i.e.
    divides their sum by `parts`. So each micro-batch back-propagates its sum (of sample losses, or of token losses)
    times `parts` over the step's total (`step_total`: samples, or target tokens): the micro-batches add up to the
    step's mean however many examples each holds."""

    mode: str = "sample"
    parts: int = 1
    step_total: float | torch.Tensor = 1.0

    @classmethod
    def for_step(cls, mode: str, parts: int, step_samples: int, local_tokens: int,
                 device: torch.device | str = "cpu") -> "LossReduction":
        """The reduction of one step of `step_samples` samples; for `token`, all-reduces this rank's target-token
        count (a collective: every rank calls it; the count stays on the device, nothing waits for it)."""
        if mode == "sample":
            return cls("sample", parts, float(step_samples))
        if mode != "token":
            raise ValueError(f"loss reduction must be 'sample' or 'token', got {mode!r}")
        count = torch.tensor(float(local_tokens), dtype=torch.float64, device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(count)
        return cls("token", parts, count.clamp_min(1.0))

    def __call__(self, outputs: list[SampleLosses]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the micro-batch's loss to back-propagate, [numerator, denominator] of the step's loss for logging: a
        float64 tensor on the loss's device, read by the caller when it reads the step's other numbers)."""
        total: Any = 0.0
        count: Any = 0.0
        for out in outputs:
            if self.mode == "sample":
                total = total + out.sample_losses.sum()
                count = count + len(out.token_sums)
            else:
                total = total + out.token_sums.sum()
                count = count + out.token_counts.sum()
        logged = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=total.device).detach().reshape(())
                              for v in (total, count)])
        step_total = self.step_total
        if isinstance(step_total, torch.Tensor):  # (in the loss's precision: a float64 count would promote it)
            step_total = step_total.to(total.dtype)
        return total * self.parts / step_total, logged


def _qformer_text(ids: torch.Tensor | None, mask: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
    if ids is None:
        return None
    return {"qformer_input_ids": ids, "qformer_attention_mask": mask if mask is not None else torch.ones_like(ids)}


def _checkpointed(forward: Any) -> Any:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run
