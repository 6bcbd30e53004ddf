"""VPG-C training: synthetic discriminative + caption examples, frozen backbone, DeepSpeed ZeRO.

Read top to bottom: set-up (process group, model, data), the DeepSpeed engine, resume, the loop, the export.
The same code runs one process on a laptop CPU (gloo) and many GPU processes under `torchrun` or `deepspeed`.

Each optimiser step takes `synthetic_batch` discriminative and `caption_batch` caption examples (the paper:
24 + 64), split evenly over ranks and gradient-accumulation micro-batches. The loss is the response-token
cross-entropy averaged over the step's samples or over all its tokens (`train.loss_reduction`, see
`cheetah.model.vpgc.LossReduction`), so 1 and N processes compute the same step. A non-finite loss or weight stops
the run (`DivergenceError`); resumable state lives in `train.state_dir` (`cheetah/train/state.py`).
"""

from __future__ import annotations

import csv
import logging
import math
import random
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cheetah.config import ConfigError, Params, TrainConfig
from cheetah.devices import check_gpu, torch_threads
from cheetah.errors import DivergenceError
from cheetah.formats import SYNTHETIC_CAPTIONS, SYNTHETIC_PAIRS
from cheetah.io import (METRICS_KIND, DataError, atomic_write_json, check_output, check_output_file, claim_dir,
                        lock_output, lock_scope, write_metrics, write_output_file)
from cheetah.model.backbones import load_backbone, random_backbone
from cheetah.model.prompts import IGNORE_INDEX, PromptBuilder
from cheetah.model.vpgc import LossReduction, VPGCModel
from cheetah.model.weights import VPGC_KIND, save_vpgc, weights_digest
from cheetah.progress import StageBar
from cheetah.provenance import PROVENANCE_FIELD, code_state
from cheetah.train import distributed
from cheetah.train.data import (
    FEATURE_DTYPES,
    Collator,
    ExampleBatches,
    ExampleFile,
    JointSampler,
    StepBatches,
    batches,
    build_feature_store,
    feature_key,
)
from cheetah.train.schedule import lr_lambda
from cheetah.train.state import STATE_KIND, TrainingState, fingerprint, rng_state, set_rng_state

log = logging.getLogger(__name__)
CURVE_KIND = "learning curve"  # train.curve, a single-file output (cheetah.io.write_output_file)
CURVE_IMAGE_KIND = "learning curve image"  # train.curve_image


def make_optimizer(model: VPGCModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over VPG-C's parameters, one group per (learning rate, weight decay) pair."""
    rates = {"query_tokens": cfg.query_lr, "qformer_proj": cfg.guide_lr}
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, param in model.vpgc.named_parameters():
        lr = rates.get(name.split(".")[0]) or cfg.lr
        # LAVIS's rule: no weight decay for biases and vectors; the (1, Q, D) query tokens are decayed.
        decay = cfg.weight_decay if param.ndim >= 2 else 0.0
        groups.setdefault((lr, decay), []).append(param)
    # The groups at `lr` first: the logged learning rate is the first group's.
    ordered = sorted(groups.items(), key=lambda item: item[0][0] != cfg.lr)
    return torch.optim.AdamW([{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in ordered],
                             lr=cfg.lr, betas=tuple(cfg.betas), foreach=False)


def init_queries(model: VPGCModel, how: str, seed: int) -> None:
    """VPG-C's new queries at the start (`train.query_init`): kept as the copy of the backbone's caption-trained queries
    the model is built with, or redrawn from a normal distribution of their standard deviation (the same on every
    rank: a generator of its own, seeded by `seed`)."""
    if how == "copy":
        return
    queries = model.vpgc.query_tokens
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        drawn = torch.randn(queries.shape, generator=generator) * queries.detach().float().std().item()
        queries.copy_(drawn.to(queries.device, queries.dtype))


def micro_batch_size(cfg: TrainConfig, world: int) -> int:
    """The most examples one rank's micro-batch holds. A step's examples are dealt over the world size x
    gradient_accumulation micro-batches one by one (`StepBatches`), so the batches need not divide evenly: the loss
    is the step's mean whatever the split (`LossReduction`). Refused only when a micro-batch would get no example."""
    parts = world * cfg.gradient_accumulation
    largest = max(cfg.synthetic_batch, cfg.caption_batch)
    if parts > largest:
        raise ConfigError(f"train.synthetic_batch={cfg.synthetic_batch} and train.caption_batch={cfg.caption_batch}: "
                          f"world size x gradient_accumulation = {world} x {cfg.gradient_accumulation} micro-batches "
                          f"leave some without an example (at most {largest}); use fewer ranks or larger batches")
    return -(-(cfg.synthetic_batch + cfg.caption_batch) // parts)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def query_geometry(query_tokens: torch.Tensor, guide_shift: torch.Tensor) -> torch.Tensor:
    """VPG-C's (1, L, Q) queries and (B, Q) guide shifts `qformer_proj(guide)` -> (B, 3): per sample the shift's
    norm, the queries' mean norm and the guided queries' mean pairwise cosine. A shift that outgrows the queries makes every query the same vector,
    and no query can keep to a region of the image (docs/miniature.md point 14)."""
    with torch.no_grad():
        shift = guide_shift.float()
        queries = query_tokens.float() + shift.unsqueeze(1)  # (B, L, Q)
        unit = torch.nn.functional.normalize(queries, dim=-1)
        length = queries.shape[1]
        cosine = ((unit @ unit.transpose(1, 2)).sum((1, 2)) - length) / max(length * (length - 1), 1)
        query_norm = query_tokens.float().norm(dim=-1).mean().expand(shift.shape[0])
        return torch.stack([shift.norm(dim=-1), query_norm, cosine], dim=-1)


HELDOUT_FIELDS = ("heldout_loss", "guide_norm", "query_norm", "query_cosine")


@torch.no_grad()
def heldout_eval(engine: Any, held: ExampleBatches, device: torch.device, workers: int) -> dict[str, float]:
    """Over the held-out examples (`held`: this rank's share; summed over ranks; eval mode, no Q-Former dropout):
    the mean per-sample loss, and how the instruction guide sits against the queries (`query_geometry`:
    mean guide-shift norm, query norm, guided queries' pairwise cosine), the measure of docs/miniature.md point 14."""
    import deepspeed

    vpgc = engine.module.vpgc
    with deepspeed.zero.GatheredParameters([vpgc.query_tokens]):  # whole under ZeRO-3; a no-op otherwise
        query_tokens = vpgc.query_tokens.detach().clone()
    shifts: list[torch.Tensor] = []  # qformer_proj's output, once per forward (the update layer)
    hook = vpgc.qformer_proj.register_forward_hook(lambda module, args, out: shifts.append(out.detach()))
    engine.module.eval()
    total = torch.zeros(len(HELDOUT_FIELDS) + 1, dtype=torch.float64, device=device)
    try:
        for batch in batches(held, range(len(held)), workers, pin_memory=device.type == "cuda"):
            batch.pop("example_ids")
            batch = _to_device(batch, device)
            losses = engine(**batch, return_sample_losses=True).sample_losses
            geometry = query_geometry(query_tokens, torch.cat(shifts)).double().sum(0)
            shifts.clear()
            total += torch.cat([losses.double().sum().view(1), geometry,
                                torch.tensor([float(len(losses))], dtype=torch.float64, device=device)])
    finally:
        hook.remove()
        engine.module.train()
    dist.all_reduce(total)
    count = float(total[-1])
    return {name: float(value) / count if count > 0 else float("nan") for name, value in zip(HELDOUT_FIELDS, total)}


def _on_any_rank(local: list[str], device: torch.device) -> list[str]:
    """Every rank's entries of `local`, on every rank (collective; cheap when all are empty, the usual case)."""
    count = torch.tensor([len(local)], dtype=torch.int64, device=device)
    dist.all_reduce(count)
    if not int(count):
        return []
    everyone: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return [x for part in everyone for x in part or []]


def _nonfinite_weight_count(model: VPGCModel) -> torch.Tensor:
    """How many VPG-C weights are NaN or inf (this rank's partition under ZeRO-3), on the device: no host read."""
    return sum(((~torch.isfinite(getattr(p, "ds_tensor", p).detach())).sum() for p in model.vpgc.parameters()),
               torch.zeros((), dtype=torch.int64, device=next(model.vpgc.parameters()).device)).double()


def _weights_diverged(step: int, cfg: TrainConfig) -> DivergenceError:
    return DivergenceError(f"train: the update of step {step} made VPG-C weights non-finite (a non-finite gradient; "
                           f"train.lr={cfg.lr}). Lower train.lr or train.grad_clip; no weights or metrics were written")


def _check_weights(count: torch.Tensor, step: int, cfg: TrainConfig, device: torch.device) -> None:
    """Stop (DivergenceError) if the update of `step` left a non-finite VPG-C weight on any rank (collective)."""
    total = count.detach().clone().to(device)
    dist.all_reduce(total)
    if total.item():
        raise _weights_diverged(step, cfg)


def _full_fp32(model: VPGCModel) -> dict[str, torch.Tensor]:
    """VPG-C weights as the optimiser holds them (fp32 masters, gathered under ZeRO-3). Collective: every rank."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in model.vpgc.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (full if full is not None else p.detach()).float().cpu().clone()
    return out


def train_vpgc(params: Params, restart: bool = False) -> dict[str, Any] | None:
    """Train VPG-C per `params.train` on the backbone of `params.model`; returns the final metrics (on rank 0).

    Resumes from the newest intact checkpoint in `train.state_dir` unless `restart` (which removes them first).
    Joins the process group (creating a one-process group when not launched by torchrun/deepspeed) and leaves it
    at the end, so nothing of it outlives the run (`distributed.shutdown`).
    """
    try:
        # (the output and state folders are this run's alone until it ends: cheetah.io.lock_output)
        with lock_scope(), torch_threads(params.train.threads):
            return _train(params, restart)
    finally:
        distributed.shutdown()


def preflight(params: Params, world_size: int | None = None, ranks_per_node: int | None = None) -> None:
    """What would stop every rank at once, checked before any work: by `cheetah train` before it starts the ranks
    (`cheetah.stages.train_launch`), and by each rank. The weights folder replaces only earlier weights and never
    holds the state or the inputs; the files written at the end can be written; the inputs are there; the GPU
    `model.require_gpu` asks for is visible; the batches split over `world_size` ranks."""
    cfg = params.train
    if world_size:
        micro_batch_size(cfg, world_size)
    inputs = [p for p in (cfg.data, params.model.backbone_dir) if p]
    check_output(cfg.out, VPGC_KIND, protect=[cfg.state_dir, cfg.metrics, cfg.curve, cfg.curve_image, *inputs])
    claim_dir(cfg.state_dir, STATE_KIND, protect=inputs, create=False)
    for path, kind in ((cfg.metrics, METRICS_KIND), (cfg.curve, CURVE_KIND), (cfg.curve_image, CURVE_IMAGE_KIND)):
        check_output_file(path, kind)  # (not only when they are written, hours from now)
    check_gpu(params, "train", ranks_per_node=ranks_per_node)
    for path in (Path(cfg.data) / SYNTHETIC_PAIRS, Path(cfg.data) / SYNTHETIC_CAPTIONS):
        if not path.is_file():
            raise DataError(f"{path}: not found (train.data must be a folder `cheetah synthesize` wrote)")
    backbone = params.model.backbone_dir
    if backbone and not params.model.random_backbone and not Path(backbone).is_dir():
        raise DataError(f"{backbone}: backbone directory not found (model.backbone_dir)")


def _train(params: Params, restart: bool) -> dict[str, Any] | None:
    import deepspeed

    cfg = params.train
    preflight(params, ranks_per_node=distributed.local_rank_and_size()[1])
    inputs = [p for p in (cfg.data, params.model.backbone_dir) if p]
    rank, world = distributed.init()
    if rank == 0:  # one run at a time on these folders: a second one is refused here, before any work
        lock_output(cfg.state_dir)
        lock_output(cfg.out)
    # The code this training runs on, recorded in the weights' card: the registry's champion gate reads it.
    provenance = code_state() if rank == 0 else None
    device = distributed.device()
    micro = micro_batch_size(cfg, world)
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)

    # -- model: frozen backbone + zero-initialised VPG-C ------------------------------------------------------
    # The frozen backbone is loaded in `model.dtype` (bf16 for 7B: no fp32 copy of the weights); DeepSpeed keeps
    # fp32 master weights for the trainable VPG-C parameters. `model.random_backbone`: the preset's shapes with
    # random weights, built here (planning, benchmarks), and marked so in the weights card.
    dtype = getattr(torch, params.model.dtype)
    if params.model.random_backbone:
        backbone = random_backbone(params.model.preset, tokenizer_dir=params.model.backbone_dir, device=device,
                                   dtype=dtype, template=params.model.template, seed=cfg.seed)
    else:
        backbone = load_backbone(params.model.preset, backbone_dir=params.model.backbone_dir,
                                 template=params.model.template, dtype=dtype)
    model = VPGCModel(backbone, update_layer=params.model.update_layer, qformer_dropout=cfg.qformer_dropout).to(device)
    init_queries(model, cfg.query_init, cfg.seed)
    if rank == 0:  # created once the inputs have loaded: a missing backbone leaves no empty state folder behind
        claim_dir(cfg.state_dir, STATE_KIND, protect=inputs)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    builder = PromptBuilder.for_backbone(backbone, max_length=cfg.max_length)
    llm_parameters = sum(p.numel() for p in model.language_model.parameters())  # for model-TFLOP/s
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peak memory of training, not of building the model

    # -- data ------------------------------------------------------------------------------------------------
    # Examples are indexed, not loaded; the vision features of every image are computed once, before the first
    # step (a share on each rank when they go to disk); DataLoader workers build each step's batches.
    data = Path(cfg.data)
    data_files = [data / SYNTHETIC_PAIRS, data / SYNTHETIC_CAPTIONS]
    synthetic, captions = (ExampleFile(f) for f in data_files)
    train_syn, heldout = synthetic.split(cfg.heldout_fraction)
    train_cap, _ = captions.split(cfg.heldout_fraction)
    sampler = JointSampler(len(train_syn), len(train_cap), cfg.synthetic_batch, cfg.caption_batch, cfg.seed)
    local_rank, local_world = distributed.local_rank_and_size()
    store = build_feature_store(
        cfg.feature_cache, [synthetic, captions], encode=lambda px: model.vision_features(px.to(device)),
        image_processor=backbone.image_processor,
        weights_key=feature_key(backbone.model.vision_model, backbone.image_processor)
        if cfg.feature_cache not in (None, "memory") else "",
        dtype=model.backbone.vision_model.post_layernorm.weight.dtype if cfg.feature_dtype == "auto"
        else FEATURE_DTYPES[cfg.feature_dtype],
        workers=cfg.workers, rank=rank, world=world, local_rank=local_rank, local_world=local_world,
        barrier=distributed.barrier, log=print if rank == 0 else lambda _: None)
    collate = Collator(builder, store, backbone.image_processor)
    steps_data = StepBatches(sampler, [(synthetic, train_syn), (captions, train_cap)], collate, cfg.steps, rank,
                             world, cfg.gradient_accumulation)
    held = ExampleBatches(synthetic, heldout[rank::world], collate)

    # -- engine ----------------------------------------------------------------------------------------------
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.steps, cfg.schedule))
    ds_config = distributed.deepspeed_config(
        micro_batch=micro, accumulation=cfg.gradient_accumulation, zero_stage=cfg.zero_stage,
        precision=cfg.precision, grad_clip=cfg.grad_clip, persist_numel=model.vpgc.query_tokens.numel() + 1,
        bucket_numel=sum(p.numel() for p in model.vpgc.parameters()), world=world, user=cfg.deepspeed_config)
    if rank == 0:  # the config the engine really ran with, next to the state (and logged with the stage's run)
        atomic_write_json(Path(cfg.state_dir) / "deepspeed_config.json", ds_config)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)

    # -- resume: the newest intact checkpoint, read as tensors and data only (cheetah/train/state.py) -----------
    # The backbone's weights too: a base stage that reran (same architecture, other weights) must not be resumed on.
    directory = params.model.backbone_dir
    digest = weights_digest(directory) if directory and not params.model.random_backbone else None
    state = TrainingState(cfg.state_dir, cfg.keep_checkpoints, rank,
                          fingerprint(params, data_files, ds_config, backbone=digest), world=world)
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
    from cheetah.tracking import log_steps

    if start == 0 and len(heldout):
        evals.append({"step": 0, **heldout_eval(engine, held, device, cfg.workers)})
    bar = StageBar("train VPG-C", cfg.steps, "steps", initial=start, disable=rank != 0)
    pending_metrics: list[tuple[int, dict[str, float]]] = []
    step_batches = batches(steps_data, range(start, cfg.steps), cfg.workers, pin_memory=device.type == "cuda")
    # One host synchronisation per optimiser step: everything the loop decides or logs about a step (its loss,
    # tokens, non-finite losses, and whether the previous update left non-finite weights) is gathered into
    # `stats` on the device and read once, after the step's last forward. Batch sizes are read on the host from
    # the batches themselves (numpy), before they move to the device.
    weights_bad = torch.zeros((), dtype=torch.float64, device=device)  # the last update's non-finite weights
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        micro_batches = next(step_batches)  # this rank's share of the step, built ahead by the workers
        reduce = LossReduction.for_step(cfg.loss_reduction, world * cfg.gradient_accumulation,
                                        cfg.synthetic_batch + cfg.caption_batch,
                                        sum(int((b["labels"][:, 1:].numpy() != IGNORE_INDEX).sum())
                                            for groups in micro_batches for b in groups), device)
        # loss numerator, denominator, tokens, non-finite losses, non-finite weights after the previous update
        stats = torch.zeros(5, dtype=torch.float64, device=device)
        stats[4] = weights_bad
        checked: list[tuple[list[str], torch.Tensor]] = []  # (example ids, their losses are finite)
        for m, groups in enumerate(micro_batches):
            # One forward per source: synthetic and caption examples differ in length, so padding them into
            # one batch would waste compute. The loss still averages over the whole micro-batch.
            outputs = []
            for batch in groups:
                names = batch.pop("example_ids")
                stats[2] += int(batch["attention_mask"].numpy().sum())
                batch = _to_device(batch, device)
                outputs.append(engine(**batch, return_sample_losses=True))
                finite = torch.isfinite(outputs[-1].sample_losses.detach())
                stats[3] += (~finite).sum()
                checked.append((names, finite))
            loss, logged = reduce(outputs)
            stats[:2] += logged
            if m == len(micro_batches) - 1:  # before the update: a step with a non-finite loss is never applied
                dist.all_reduce(stats)
                numerator, denominator, tokens, bad_losses, bad_weights = stats.tolist()  # the step's one sync
                if bad_weights:
                    raise _weights_diverged(step, cfg)
                if bad_losses:
                    nonfinite = _on_any_rank([n for names, ok in checked for n, fine in zip(names, ok.tolist())
                                              if not fine], device)
                    if len(skipped) >= cfg.max_skipped_steps or len(micro_batches) > 1:
                        raise DivergenceError(
                            f"train: non-finite loss at step {step + 1} on example(s) {', '.join(nonfinite[:8])}"
                            f"{' ...' if len(nonfinite) > 8 else ''} (after {len(skipped)} skipped step(s); "
                            f"train.max_skipped_steps={cfg.max_skipped_steps}). Lower train.lr, check these "
                            "examples, or allow skipping; no weights or metrics were written")
                    break
            engine.backward(loss)
            engine.step()
        if bad_losses:  # skipped (accumulation is 1, so nothing was applied): the schedule still follows the step
            skipped.append({"step": step + 1, "examples": nonfinite})
            scheduler.step()
            if rank == 0:
                log.warning("train: skipped step %d: non-finite loss on %s (%d of %d skips allowed)", step + 1,
                            ", ".join(nonfinite[:8]), len(skipped), cfg.max_skipped_steps)
            bar.update()
            continue
        weights_bad = _nonfinite_weight_count(model)  # read with the next step's stats (or below, before use)
        elapsed = time.perf_counter() - t0
        record = {"step": step + 1, "loss": numerator / denominator, "lr": scheduler.get_last_lr()[0],
                  "samples_per_s": denominator / elapsed, "tokens_per_s": tokens / elapsed,
                  # 2N FLOPs per token forward + N for the input gradients of the upper half (N = LLM
                  # parameters), as benchmarks/train_step.py and the GPU anchors count.
                  "model_tflops": 3 * llm_parameters * tokens / elapsed / 1e12}
        history.append(record)
        bar.postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", samples_s=f"{record['samples_per_s']:.1f}")
        pending_metrics.append((step + 1, {k: v for k, v in record.items() if k != "step"}))
        evaluate_now = len(heldout) and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps)
        checkpoint_now = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps
        if evaluate_now or checkpoint_now:  # (periodic) weights are read or kept: they must be finite now
            _check_weights(weights_bad, step + 1, cfg, device)
        if evaluate_now:
            evals.append({"step": step + 1, **heldout_eval(engine, held, device, cfg.workers)})
            if not math.isfinite(evals[-1]["heldout_loss"]):
                raise DivergenceError(f"train: the held-out loss after step {step + 1} is "
                                      f"{evals[-1]['heldout_loss']}; no weights or metrics were written")
            pending_metrics.append((step + 1, {k: v for k, v in evals[-1].items() if k != "step"}))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log_steps(pending_metrics)
            pending_metrics = []
        if checkpoint_now:
            checkpoint(step + 1)
        bar.update()
    bar.close()

    # -- export ------------------------------------------------------------------------------------------
    weights = _full_fp32(model)
    metrics = {
        "steps": cfg.steps,
        "final_train_loss": history[-1]["loss"] if history else None,
        "heldout_loss_init": evals[0]["heldout_loss"] if evals and evals[0]["step"] == 0 else None,
        "heldout_loss_final": evals[-1]["heldout_loss"] if evals else None,
        "heldout_examples": len(heldout),
        # The guide against the queries at the end (point 14): a guided-query cosine near 1 means no query can fetch.
        **{f"heldout_{name}_final": evals[-1][name] if evals else None for name in HELDOUT_FIELDS[1:]},
        "train_examples": {"synthetic": len(train_syn), "caption": len(train_cap)},
        "samples_per_s": _median(history, "samples_per_s"),
        "model_tflops": _median(history, "model_tflops"),
        "peak_device_memory_gb": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                                  else None),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "skipped_steps": len(skipped),
        "world_size": world,
        "zero_stage": cfg.zero_stage,
        "precision": cfg.precision,
        "preset": params.model.preset,
        "launcher": cfg.launcher,
        "offload_optimizer": ds_config["zero_optimization"].get("offload_optimizer", {}).get("device", "none"),
    }
    if rank == 0:
        save_vpgc(model, cfg.out, state_dict=weights, extra={"training": metrics, PROVENANCE_FIELD: provenance},
                  protect=[cfg.state_dir, cfg.metrics, cfg.curve, cfg.curve_image, *inputs])
        write_metrics(cfg.metrics, metrics)
        _write_curve(cfg.curve, cfg.curve_image, history, evals)
    distributed.barrier()
    return metrics if rank == 0 else None


def _median(history: list[dict[str, float]], key: str) -> float | None:
    """The median of the last 50 steps (the first steps of a run include warm-up)."""
    values = [h[key] for h in history[-50:] if key in h]
    return float(np.median(values)) if values else None


def _write_curve(path: str | Path, image: str | Path, history: list[dict[str, float]],
                 evals: list[dict[str, float]]) -> None:
    """CSV for `dvc plots` (step, loss, lr) and a PNG with the held-out loss on top."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", "loss", "lr"], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_output_file(path, buf.getvalue().encode("utf-8"), CURVE_KIND)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", lw=1)
    if evals:
        ax.plot([e["step"] for e in evals], [e["heldout_loss"] for e in evals], "o-", label="held-out difference loss")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_output_file(image, png.getvalue(), CURVE_IMAGE_KIND)

