"""VPG-C training: synthetic discriminative + caption examples, frozen backbone, DeepSpeed ZeRO.

Read top to bottom: set-up (process group, model, data), the DeepSpeed engine, resume, the loop, the export.
The same code runs one process on a laptop CPU (gloo) and many GPU processes under `torchrun` or `deepspeed`.

Each optimiser step takes `synthetic_batch` discriminative and `caption_batch` caption examples (the paper:
24 + 64), split evenly over ranks and gradient-accumulation micro-batches. The loss is the mean over samples of
each sample's mean response-token cross-entropy, so 1 and N processes compute the same step.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from cheetah.config import ConfigError, Params, TrainConfig, to_dict
from cheetah.errors import DivergenceError
from cheetah.io import atomic_write_bytes, atomic_write_text, check_output, claim_dir, write_metrics
from cheetah.model.backbones import load_backbone
from cheetah.model.prompts import PromptBuilder
from cheetah.model.vpgc import VPGCModel
from cheetah.model.weights import VPGC_KIND, save_vpgc
from cheetah.train import distributed
from cheetah.train.state import STATE_KIND, TrainingState, fingerprint, rng_state, set_rng_state
from cheetah.train.data import (
    EncodedExample,
    FeatureCache,
    JointSampler,
    collate,
    encode_examples,
    load_examples,
    split_heldout,
)

log = logging.getLogger(__name__)


def lr_lambda(warmup: int, total: int, schedule: str):
    """Linear warm-up, then cosine decay to zero (LAVIS's linear_warmup_cosine_lr) or constant."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(model: VPGCModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    # LAVIS's rule: no weight decay for biases and vectors; the (1, Q, D) query tokens are decayed.
    decay = [p for n, p in model.vpgc.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.vpgc.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), foreach=False)


def _split(cfg: TrainConfig, world: int) -> int:
    """Examples per micro-batch per rank; refuses batches that do not split evenly (the loss would differ)."""
    parts = world * cfg.gradient_accumulation
    for name in ("synthetic_batch", "caption_batch"):
        if getattr(cfg, name) % parts:
            raise ConfigError(f"train.{name}={getattr(cfg, name)} must be divisible by world size x "
                             f"gradient_accumulation = {world} x {cfg.gradient_accumulation}")
    return (cfg.synthetic_batch + cfg.caption_batch) // parts


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def heldout_loss(engine: Any, builder: PromptBuilder, items: list[EncodedExample], features: FeatureCache,
                 device: torch.device, rank: int, world: int, batch_size: int = 32) -> float:
    """Mean per-sample loss over held-out examples, split over ranks."""
    mine = items[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, len(mine), batch_size):
        batch = _to_device(collate(builder, mine[start:start + batch_size], features), device)
        losses = engine(**batch, return_sample_losses=True).sample_losses
        total += torch.stack([losses.double().sum(), torch.tensor(float(len(losses)), device=device)])
    dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def _on_any_rank(local: list[str], device: torch.device) -> list[str]:
    """Every rank's entries of `local`, on every rank (collective; cheap when all are empty, the usual case)."""
    count = torch.tensor([len(local)], dtype=torch.int64, device=device)
    dist.all_reduce(count)
    if not int(count):
        return []
    everyone: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return [x for part in everyone for x in part or []]


def _nonfinite_weights(model: VPGCModel) -> list[str]:
    """VPG-C parameters with a NaN or inf (this rank's partition under ZeRO-3)."""
    return [name for name, p in model.vpgc.named_parameters()
            if not torch.isfinite(getattr(p, "ds_tensor", p).detach()).all()]


def _full_fp32(model: VPGCModel) -> dict[str, torch.Tensor]:
    """VPG-C weights as the optimiser holds them (fp32 masters, gathered under ZeRO-3). Collective: every rank."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in model.vpgc.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (full if full is not None else p.detach()).float().cpu().clone()
    return out


def train_vpgc(params: Params, restart: bool = False) -> dict[str, Any]:
    """Train VPG-C per `params.train` on the backbone of `params.model`; returns the final metrics (on rank 0).

    Resumes from the newest intact checkpoint in `train.state_dir` unless `restart` (which removes them first).
    Joins the process group (creating a one-process group when not launched by torchrun/deepspeed) and leaves
    it up, so several runs can share one process; the CLI tears it down at exit (`distributed.shutdown`).
    """
    import deepspeed

    cfg = params.train
    # Before any work: the weights folder replaces only earlier weights, and never holds the state or the inputs.
    inputs = [p for p in (cfg.data, params.model.backbone_dir) if p]
    check_output(cfg.out, VPGC_KIND, protect=[cfg.state_dir, cfg.metrics, cfg.curve, *inputs])
    rank, world = distributed.init()
    device = distributed.device()
    micro = _split(cfg, world)
    if rank == 0:
        claim_dir(cfg.state_dir, STATE_KIND, protect=inputs)
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)

    # -- model: frozen backbone + zero-initialised VPG-C ------------------------------------------------------
    # The frozen backbone is loaded in `model.dtype` (bf16 for 7B: no fp32 copy of the weights); DeepSpeed keeps
    # fp32 master weights for the trainable VPG-C parameters.
    backbone = load_backbone(params.model.preset, backbone_dir=params.model.backbone_dir,
                             template=params.model.template, dtype=getattr(torch, params.model.dtype))
    model = VPGCModel(backbone, update_layer=params.model.update_layer).to(device)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    builder = PromptBuilder.for_backbone(backbone, max_length=cfg.max_length)

    # -- data ------------------------------------------------------------------------------------------------
    data = Path(cfg.data)
    data_files = [data / "synthetic.jsonl", data / "captions.jsonl"]
    synthetic, captions = (load_examples(f) for f in data_files)
    train_syn, heldout = split_heldout(synthetic, cfg.heldout_fraction)
    train_cap, _ = split_heldout(captions, cfg.heldout_fraction)
    enc_syn = encode_examples(builder, train_syn, "synthetic")
    enc_cap = encode_examples(builder, train_cap, "caption")
    enc_held = encode_examples(builder, heldout, "synthetic")
    sampler = JointSampler(len(enc_syn), len(enc_cap), cfg.synthetic_batch, cfg.caption_batch, cfg.seed)
    features = FeatureCache.from_setting(cfg.feature_cache, lambda px: model.vision_features(px.to(device)),
                                         backbone.image_processor, backbone.fingerprint())

    # -- engine ----------------------------------------------------------------------------------------------
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.steps, cfg.schedule))
    ds_config = distributed.deepspeed_config(
        micro_batch=micro, accumulation=cfg.gradient_accumulation, zero_stage=cfg.zero_stage,
        precision=cfg.precision, grad_clip=cfg.grad_clip, persist_numel=model.vpgc.query_tokens.numel() + 1)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)

    # -- resume: the newest intact checkpoint, read as tensors and data only (cheetah/train/state.py) -----------
    state = TrainingState(cfg.state_dir, cfg.keep_checkpoints, rank, fingerprint(params, world, data_files))
    if restart:
        state.restart()
    start, history, evals, skipped = 0, [], [], []
    tag = state.resumable()
    if tag is not None:
        client = state.load(engine, tag)
        start, history, evals, skipped = client["step"], client["history"], client["evals"], client["skipped"]
        set_rng_state(client["rng"])
        if rank == 0:
            print(f"resuming VPG-C training from {cfg.state_dir}/{tag} (step {start}/{cfg.steps})")

    def checkpoint(step: int) -> None:
        state.save(engine, step, {"step": step, "history": history, "evals": evals, "skipped": skipped,
                                  "rng": rng_state()})

    # -- loop ------------------------------------------------------------------------------------------------
    from cheetah.tracking import stage_run

    with stage_run("train", to_dict(params), experiment=params.register.experiment, enabled=rank == 0,
                   system_metrics=True) as run:
        if start == 0 and enc_held:
            evals.append({"step": 0, "heldout_loss": heldout_loss(engine, builder, enc_held, features, device,
                                                                  rank, world)})
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=rank != 0, desc="train VPG-C",
                   dynamic_ncols=True)
        pending_metrics: list[tuple[int, dict[str, float]]] = []
        for step in bar:
            t0 = time.perf_counter()
            syn_idx, cap_idx = sampler.step(step)
            syn = [enc_syn[i] for i in syn_idx][rank::world]
            cap = [enc_cap[i] for i in cap_idx][rank::world]
            ids = ([train_syn[i].id for i in syn_idx][rank::world], [train_cap[i].id for i in cap_idx][rank::world])
            stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, samples, tokens
            accum = cfg.gradient_accumulation
            for m in range(accum):
                # One forward per source: synthetic and caption examples differ in length, so padding them into
                # one batch would waste compute. The loss is still the mean over all samples of the micro-batch.
                groups = [(source, items, names) for source, items, names in
                          (("synthetic", syn[m::accum], ids[0][m::accum]), ("caption", cap[m::accum], ids[1][m::accum]))
                          if items]
                loss_sum, n_items, nonfinite = 0.0, sum(len(g[1]) for g in groups), []
                for source, items, names in groups:
                    batch = _to_device(collate(builder, items, features), device)
                    losses = engine(**batch, return_sample_losses=True).sample_losses
                    nonfinite += [f"{source} {n}" for n, ok in zip(names, torch.isfinite(losses.detach()).tolist())
                                  if not ok]
                    loss_sum = loss_sum + losses.sum()
                    stats[2] += float(batch["attention_mask"].sum())
                nonfinite = _on_any_rank(nonfinite, device)
                if nonfinite:  # every rank sees the same list, so every rank skips (or stops) together
                    if len(skipped) >= cfg.max_skipped_steps:
                        raise DivergenceError(
                            f"train: non-finite loss at step {step + 1} on example(s) {', '.join(nonfinite[:8])}"
                            f"{' ...' if len(nonfinite) > 8 else ''} (after {len(skipped)} skipped step(s); "
                            f"train.max_skipped_steps={cfg.max_skipped_steps}). Lower train.lr, check these "
                            "examples, or allow skipping; no weights or metrics were written")
                    break
                loss = loss_sum / n_items
                engine.backward(loss)
                engine.step()
                stats[:2] += torch.tensor([loss.item() * n_items, n_items], dtype=torch.float64, device=device)
            if nonfinite:  # skipped (accumulation is 1, so nothing was applied): the schedule still follows the step
                skipped.append({"step": step + 1, "examples": nonfinite})
                scheduler.step()
                if rank == 0:
                    log.warning("train: skipped step %d: non-finite loss on %s (%d of %d skips allowed)", step + 1,
                                ", ".join(nonfinite[:8]), len(skipped), cfg.max_skipped_steps)
                continue
            if _on_any_rank(_nonfinite_weights(model), device):
                raise DivergenceError(f"train: the update of step {step + 1} made VPG-C weights non-finite (a "
                                      f"non-finite gradient; train.lr={cfg.lr}). Lower train.lr or "
                                      "train.grad_clip; no weights or metrics were written")
            dist.all_reduce(stats)
            elapsed = time.perf_counter() - t0
            record = {"step": step + 1, "loss": float(stats[0] / stats[1]), "lr": scheduler.get_last_lr()[0],
                      "samples_per_s": float(stats[1]) / elapsed, "tokens_per_s": float(stats[2]) / elapsed}
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            samples_s=f"{record['samples_per_s']:.1f}")
            pending_metrics.append((step + 1, {k: v for k, v in record.items() if k != "step"}))
            if enc_held and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                evals.append({"step": step + 1, "heldout_loss": heldout_loss(engine, builder, enc_held, features,
                                                                             device, rank, world)})
                if not math.isfinite(evals[-1]["heldout_loss"]):
                    raise DivergenceError(f"train: the held-out loss after step {step + 1} is "
                                          f"{evals[-1]['heldout_loss']}; no weights or metrics were written")
                pending_metrics.append((step + 1, {"heldout_loss": evals[-1]["heldout_loss"]}))
            if run is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
                _log_metrics(run.info.run_id, pending_metrics)
                pending_metrics = []
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                checkpoint(step + 1)

        # -- export ------------------------------------------------------------------------------------------
        weights = _full_fp32(model)
        metrics = {
            "steps": cfg.steps,
            "final_train_loss": history[-1]["loss"] if history else None,
            "heldout_loss_init": evals[0]["heldout_loss"] if evals and evals[0]["step"] == 0 else None,
            "heldout_loss_final": evals[-1]["heldout_loss"] if evals else None,
            "heldout_examples": len(enc_held),
            "train_examples": {"synthetic": len(enc_syn), "caption": len(enc_cap)},
            "samples_per_s": float(np.median([h["samples_per_s"] for h in history[-50:]])) if history else None,
            "skipped_steps": len(skipped),
            "world_size": world,
            "zero_stage": cfg.zero_stage,
            "precision": cfg.precision,
        }
        if rank == 0:
            save_vpgc(model, cfg.out, state_dict=weights, extra={"training": metrics},
                      protect=[cfg.state_dir, cfg.metrics, cfg.curve, *inputs])
            write_metrics(cfg.metrics, metrics)
            _write_curve(cfg.curve, history, evals)
            if run is not None:
                import mlflow

                mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
                mlflow.log_artifact(cfg.curve, artifact_path="train")
                mlflow.log_artifact(str(Path(cfg.curve).with_suffix(".png")), artifact_path="train")
                mlflow.log_artifact(str(Path(cfg.out) / "vpgc.json"), artifact_path="train")
    distributed.barrier()
    return metrics if rank == 0 else None


def _log_metrics(run_id: str, pending: list[tuple[int, dict[str, float]]]) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for step, values in pending for k, v in values.items()]
    for i in range(0, len(batch), 900):  # the REST API accepts at most 1000 metrics per batch
        MlflowClient().log_batch(run_id, metrics=batch[i:i + 900], synchronous=True)


def _write_curve(path: str | Path, history: list[dict[str, float]], evals: list[dict[str, float]]) -> None:
    """CSV for `dvc plots` (step, loss, lr) and a PNG with the held-out loss on top."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", "loss", "lr"], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buf.getvalue())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", lw=1)
    if evals:
        ax.plot([e["step"] for e in evals], [e["heldout_loss"] for e in evals], "o-", label="held-out difference loss")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(Path(path).with_suffix(".png"), png.getvalue())

