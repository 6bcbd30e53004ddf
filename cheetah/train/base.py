"""The base stage of the embedded default: pretrain the `tiny` backbone into a caption-trained multimodal LLM.

This plays the part of the frozen BLIP-2-family model of the paper (a CLIP-pretrained ViT, a Q-Former trained on
captions, an instruction-tuned LLM joined to it by a projection), built in two phases:

1. **Vision** (cheetah/train/vision.py): the ViT learns to see every object, small ones included; the Q-Former learns,
   from the same features, only what a caption says — the large objects and the background.
2. **Language model**: the middle stage's (cheetah/train/language.py, cheetah/train/middle_layer.py: pretrained on
   scenes given as object tokens, it can talk about any object its input holds, as an instruction-tuned LLM can, and
   about small objects whose vectors arrive at its middle layer), trained further with the projection on three
   inputs at once: the corpus images (captions and questions about what captions cover), fresh scenes as object
   tokens with every answer form (so it keeps what it knew), and fresh images whose small objects' vectors are
   added at the middle layer (`PromptWithDetails`: so it reads there, on its visual prompt, what VPG-C will add).
   The projection learns to turn the visual prompt into what the language model reads.

The result answers about what captions cover and misses the small details: its visual prompt dropped them, not its
language model. That is the world the paper assumes, and each link is measured on held-out scenes
(cheetah/evaluate/backbone.py; docs/miniature.md).

Output: a backbone directory (weights, tokenizer trained on the world's language, image processor) that
`cheetah.model.backbones.load_backbone` reads like any real checkpoint, and `metrics/base.json`.

That is `base.init: pretrain`. The stage is the pipeline's one source of the backbone at every scale
(`base_stage`): with `init: checkpoint` it brings a real checkpoint directory (e.g. the official Vicuna-7B release
after `cheetah model import`) into `base.out`, so DVC versions the exact weights later stages read; with
`init: random` it saves a preset's shapes with random weights (the CPU test of the real-scale path, and planning).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cheetah.config import BaseConfig, ConfigError, Params
from cheetah.devices import torch_threads
from cheetah.formats import SOURCE_CAPTIONS, SOURCE_SCENES, read_records, source_problem
from cheetah.io import (METRICS_KIND, DataError, atomic_dir, atomic_write_json, check_output, check_output_file,
                        lock_output, read_json, safe_join, write_metrics)
from cheetah.model.backbones import (BACKBONE_KIND, BACKBONE_META_FILE, build_backbone, load_backbone,
                                      save_backbone)
from cheetah.evaluate.backbone import scene_pixels
from cheetah.model.prompts import PromptBuilder
from cheetah.progress import StageBar
from cheetah.train.data import load_pixels
from cheetah.train.vision import TagProbe, qformer_output, train_vision
from cheetah.train.schedule import lr_lambda
from cheetah.train.language import fresh_scenes, language_example, lm_loss, log_phase
from cheetah.train.middle_layer import MiddleLayer, detail_phrases, late_vectors, middle_layer_index, shown_loss
from cheetah.train.world_examples import (Example, ObjectTokens, caption_example, difference_example,
                                          named_caption_example, primary_questions, yes_no_example)
from cheetah.world import Scene, generate_scene, heldout_scenes, read_scenes, render, train_tokenizer

log = logging.getLogger(__name__)



def _read_source(source: Path) -> tuple[list[dict[str, Any]], dict[str, Scene]]:
    """The corpus' caption records and the scene graph of every one of them (the base stage learns from both)."""
    records = [rec for _, rec in read_records(source / SOURCE_CAPTIONS, source_problem)]
    scenes = read_scenes(source / SOURCE_SCENES)
    missing = [r["id"] for r in records if r["id"] not in scenes]
    if missing:
        raise DataError(f"{source / SOURCE_SCENES}: no scene graph for image id(s) {missing[:5]} (the base stage "
                        "learns from the world's scene graphs)")
    return records, scenes


def base_stage(params: Params) -> dict[str, Any]:
    """`cheetah base`: write the backbone to `base.out` as `base.init` says; returns the metrics."""
    cfg = params.base
    if cfg.init == "pretrain":
        with torch_threads(cfg.threads):
            return pretrain_base(params)
    metrics = random_base(params) if cfg.init == "random" else checkpoint_base(params)
    write_metrics(cfg.metrics, metrics)
    return metrics


def random_base(params: Params) -> dict[str, Any]:
    """`model.preset`'s shapes with random weights (seed `base.seed`) in `model.dtype`, a tokenizer trained on the
    world's language, saved as a checkpoint directory: every later stage reads it as it would a 7B one."""
    import torch as _torch

    cfg = params.base
    tokenizer = train_tokenizer(cfg.vocab_size)
    backbone = build_backbone(params.model.preset, tokenizer=tokenizer, seed=cfg.seed,
                              image_size=params.world.image_size if params.model.preset == "tiny" else None,
                              dtype=getattr(_torch, params.model.dtype), template=params.model.template)
    save_backbone(backbone, cfg.out, extra_meta={"init": "random", "seed": cfg.seed})  # nothing to protect: no inputs
    return {"init": "random", "preset": params.model.preset, "fingerprint": backbone.fingerprint(),
            "parameters": sum(p.numel() for p in backbone.model.parameters())}


def checkpoint_base(params: Params) -> dict[str, Any]:
    """Bring the checkpoint directory `base.checkpoint` into `base.out`: checked to load as a BLIP-2-family backbone
    (config, tokenizer, image token; on the meta device, so in seconds), then hard-linked file by file (copied where
    the file system cannot link). A different checkpoint path reruns the stage; to have DVC notice weights replaced
    in place, `dvc repro --force base`."""
    cfg = params.base
    if not cfg.checkpoint:
        raise ConfigError("base.init is `checkpoint` but base.checkpoint names no directory")
    source = Path(cfg.checkpoint)
    try:
        backbone = load_backbone(source, device="meta")
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"base.checkpoint: {e}") from None
    files = sorted(p for p in source.rglob("*") if p.is_file())
    with atomic_dir(cfg.out, kind=BACKBONE_KIND, protect=[source]) as tmp:
        for f in files:
            target = tmp / f.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)
        meta = {"template": backbone.template.name, "preset": params.model.preset}
        if (source / BACKBONE_META_FILE).is_file():
            meta.update(read_json(source / BACKBONE_META_FILE))
        meta.update(init="checkpoint", checkpoint=str(source.resolve()))
        atomic_write_json(tmp / BACKBONE_META_FILE, meta)
    return {"init": "checkpoint", "checkpoint": str(source.resolve()), "fingerprint": backbone.fingerprint(),
            "parameters": sum(p.numel() for p in backbone.model.parameters()), "files": len(files),
            "bytes": sum(f.stat().st_size for f in files)}


def pretrain_base(params: Params) -> dict[str, Any]:
    """Train the tiny backbone (vision from scratch, then the language model from the middle stage's); write it to
    `base.out`."""
    cfg, world = params.base, params.world
    if params.model.preset != "tiny":
        raise ConfigError(f"base.init `pretrain` trains the embedded `tiny` preset only; for {params.model.preset!r} "
                          "use base.init `checkpoint` (with base.checkpoint) or `random`")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    source, language_dir = Path(world.out), Path(params.middle.out)
    # Before any work: never replace what it did not write, and one writer at a time.
    check_output(cfg.out, BACKBONE_KIND, protect=[source, language_dir])
    lock_output(cfg.out)
    check_output_file(cfg.metrics, METRICS_KIND)

    records, scene_by_id = _read_source(source)  # a bad corpus is refused before anything is loaded
    backbone = language_backbone(language_dir, world.image_size, cfg.seed)
    tokenizer, model = backbone.tokenizer, backbone.model
    builder = PromptBuilder.for_backbone(backbone, max_length=128)
    scenes = [scene_by_id[r["id"]] for r in records]  # image i shows scenes[i]
    pixels = torch.stack([load_pixels(safe_join(source, r["image"], what=f"{source / SOURCE_CAPTIONS} (id "
                                                f"{r['id']!r}): image"), backbone.image_processor) for r in records])
    t_start = time.perf_counter()

    # -- 1. vision: the ViT sees every object, the Q-Former learns what captions say -------------------------
    vcfg = model.config.vision_config
    probe = TagProbe(vcfg.hidden_size, model.config.qformer_config.hidden_size, backbone.num_query_tokens,
                     vcfg.image_size, vcfg.patch_size)
    vision_losses = train_vision(model, probe, pixels, [TagProbe.targets(s) for s in scenes], rng,
                                 steps=cfg.vision_steps, batch_size=2 * cfg.batch_size, lr=cfg.lr,
                                 weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps)
    for p in (*model.vision_model.parameters(), *model.qformer.parameters(), model.query_tokens):
        p.requires_grad_(False)

    # -- 2. the language model: every answer form about every object, from pixels and from object tokens ------
    examples, edited = pixel_examples(scenes, [r["caption"] for r in records], rng)
    with torch.no_grad():  # frozen: every image's visual prompt is computed once
        shown = torch.cat([pixels, scene_pixels(edited, backbone.image_processor)])
        prompts = torch.cat([qformer_output(model, model.vision_model(pixel_values=shown[i:i + 128]).last_hidden_state)
                             for i in range(0, len(shown), 128)])
    prompts_by_id = {s.id: p for s, p in zip([*scenes, *edited], prompts, strict=True)}
    tokens = ObjectTokens(tokenizer, backbone.num_query_tokens)
    with MiddleLayer(model, middle_layer_index(model, params.model.update_layer)) as middle:
        with_details = PromptWithDetails(model, backbone.image_processor, tokens, middle, params.middle.scale)
        losses = train_language_model(model, builder, tokens, with_details, scenes, examples, prompts_by_id, cfg,
                                      rng)
        train_seconds = time.perf_counter() - t_start

        model.eval()
        model.requires_grad_(False)
        metrics = {
            "vision_steps": cfg.vision_steps,
            "steps": cfg.steps,
            "train_seconds": round(train_seconds, 1),
            "final_vision_loss": _tail_mean(vision_losses),
            "final_loss": _tail_mean([a for a, _, _ in losses]),
            "final_yes_no_loss": _tail_mean([b for _, b, _ in losses]),
            "final_middle_loss": _tail_mean([c for _, _, c in losses]),
            **measure_backbone(backbone, builder, tokens, with_details, world, cfg),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
    save_backbone(backbone, cfg.out, extra_meta={"init": "pretrain", "base_metrics": _headline(metrics)},
                  protect=[source, language_dir])
    write_metrics(cfg.metrics, metrics)
    return _headline(metrics)


def language_backbone(language_dir: Path, image_size: int, seed: int) -> Any:
    """A fresh `tiny` backbone (vision side initialised by `seed`) holding the middle stage's language model and
    tokenizer (`language_dir`, `middle.out`), as a BLIP-2 starts from a pretrained LLM."""
    if not language_dir.is_dir():
        raise DataError(f"{language_dir}: no pretrained language model here (middle.out); run `cheetah language` "
                        "and `cheetah middle` first (`dvc repro` and `make run` do)")
    language = load_backbone(language_dir)
    backbone = build_backbone("tiny", tokenizer=language.tokenizer, image_size=image_size, seed=seed)
    try:
        backbone.model.language_model.load_state_dict(language.model.language_model.state_dict())
    except RuntimeError as e:
        raise DataError(f"{language_dir}: its language model does not fit the `tiny` preset ({str(e)[:200]})") from None
    return backbone


class PromptWithDetails:
    """Scenes as the base shows them — the visual prompt of the rendered scene (its frozen ViT and Q-Former, then its
    projection) — with the small objects' vectors (x `scale`) added at the middle layer (`middle`) on random image
    positions: what a perfect VPG-C adds to what the caption-trained visual prompt kept."""

    def __init__(self, model: Any, image_processor: Any, tokens: ObjectTokens, middle: MiddleLayer, scale: float):
        self.model, self.image_processor = model, image_processor
        self.tokens, self.middle, self.scale = tokens, middle, scale

    def embed(self, scenes: Sequence[Scene], embedding: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        n = self.tokens.num_tokens
        later: list[str | None] = []
        for scene in scenes:
            details = detail_phrases(scene)[:n]
            slots = details + [None] * (n - len(details))
            later += [slots[k] for k in rng.permutation(n)]
        self.middle.queue(late_vectors(self.tokens, later, embedding, self.scale))
        with torch.no_grad():  # the vision side is frozen
            prompt = qformer_output(self.model, self.model.vision_model(
                pixel_values=scene_pixels(scenes, self.image_processor)).last_hidden_state)
        return self.model.language_projection(prompt).flatten(0, 1)


def _tail_mean(losses: list[float]) -> float | None:
    return float(np.mean(losses[-20:])) if losses else None


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics without their long tails (examples, per-kind tables)."""
    return {k: v for k, v in metrics.items()
            if k not in ("examples", "yes_no", "yes_no_object_tokens", "differences_object_tokens", "probes",
                         "yes_no_middle", "differences_middle")}


def _optimizer(params: list[torch.nn.Parameter], lr: float, cfg: BaseConfig, steps: int):
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, steps, "cosine"))


def train_language_model(model: Any, builder: PromptBuilder, tokens: ObjectTokens, with_details: PromptWithDetails,
                         corpus: list[Scene], pixel_examples: list[Example], prompts: dict[str, torch.Tensor],
                         cfg: BaseConfig, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Phase 2: the language model (the middle stage's), its embeddings and the projection, on three kinds of input
    at once.

    Per step, `batch_size` mixed examples: three quarters show **pixels** (the frozen visual prompts,
    `prompts[scene id]`) — captions of the corpus images, questions about their large objects, two-image prompts
    (`pixel_examples`, fixed) — and a quarter show **object tokens** of fresh scenes (`tokens`) — every answer form
    about every object, large or small (`language_example`, the language stage's mix), so the language model keeps
    what it knows, and the projection learns to turn the visual prompt into what it reads. And `yes_no_batch` Yes/No
    questions about the large objects of the corpus images (drawn afresh), with a loss term of their own: mixed in,
    the one-token answers weigh too little (docs/base.md). And `middle_batch` examples of fresh scenes shown as
    pixels with their small objects added at the middle layer (`with_details`), every answer form: the language
    model keeps reading details that arrive there (the middle stage taught it), now on its visual prompt, where
    VPG-C adds them. Returns (mixed loss, Yes/No loss, middle-layer loss) per step."""
    embedding = model.get_input_embeddings()
    params = [*model.language_projection.parameters(), *model.language_model.parameters()]
    optimizer, scheduler = _optimizer(params, cfg.align_lr, cfg, cfg.steps)
    model.language_model.train()

    def loss_on(seen: list[Example], told: list[Example]) -> torch.Tensor:
        encoded = [builder.encode(e.instruction, len(e.scenes), e.response) for e in (*seen, *told)]
        shown = [model.language_projection(torch.cat([prompts[s.id] for s in e.scenes])) for e in seen]
        shown += [tokens.embed(e.scenes, embedding.weight, rng) for e in told]
        return lm_loss(model, builder, encoded, shown)

    losses = []
    bar = StageBar("base: language model", cfg.steps, "steps")
    for step in range(cfg.steps):
        told = cfg.batch_size // 4
        mixed = loss_on([pixel_examples[int(i)] for i in rng.integers(len(pixel_examples), size=cfg.batch_size - told)],
                        [language_example(s, rng) for s in fresh_scenes(cfg.seed, rng, told)])
        yes_no = loss_on([yes_no_example(corpus[int(i)], rng, "large")
                          for i in rng.integers(len(corpus), size=cfg.yes_no_batch)], [])
        late = shown_loss(model, builder, [language_example(s, rng) for s in
                                           fresh_scenes(cfg.seed, rng, cfg.middle_batch)], with_details, rng) \
            if cfg.middle_batch else torch.zeros(())
        (mixed + yes_no + late).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append((mixed.item(), yes_no.item(), late.item()))
        log_phase(step, cfg.steps, "language_model",
                  {"loss": losses[-1][0], "yes_no_loss": losses[-1][1], "middle_loss": losses[-1][2]}, scheduler)
        bar.update()
    bar.close()
    model.language_model.eval()
    return losses


def pixel_examples(corpus: list[Scene], captions: list[str], rng: np.random.Generator
                   ) -> tuple[list[Example], list[Scene]]:
    """(examples, edited scenes): the fixed examples about the corpus images — each image's caption, the questions
    about its large objects, a two-image prompt asking for the caption of the named one, and the image beside one
    edit of a *large* object of it with a difference instruction. The edited scenes are rendered in memory. An
    instruction-tuned base compares what captions cover; the small details it misses are VPG-C's to recover."""
    examples, edited = [], []
    for i, (scene, text) in enumerate(zip(corpus, captions, strict=True)):
        examples.append(dataclasses.replace(caption_example(scene, rng), response=text))
        examples += primary_questions(scene)
        examples.append(named_caption_example(scene, corpus[int(rng.integers(len(corpus)))], rng))
        difference = difference_example(scene, rng, "large")
        examples.append(difference)
        edited.append(difference.scenes[1])
    return examples, edited


def measure_backbone(backbone: Any, builder: PromptBuilder, tokens: ObjectTokens, with_details: PromptWithDetails,
                     world: Any, cfg: BaseConfig) -> dict[str, Any]:
    """The held-out measurements of metrics/base.json (cheetah/evaluate/backbone.py): the representation probes,
    captions, Yes/No from pixels and from object tokens, descriptions of a small edit from object tokens, and
    Yes/No and small-edit descriptions from pixels with the small objects added at the middle layer (what the base
    does with a perfect VPG-C's correction: the ceiling of links 4-5)."""
    from cheetah.evaluate.backbone import caption_quality, representation_probes, yes_no_accuracy
    from cheetah.evaluate.object_tokens import object_token_differences, object_token_yes_no
    from cheetah.evaluate.probes import PROBE_STREAM

    heldout = list(heldout_scenes(world, cfg.eval_scenes))
    images = [render(s).image for s in heldout]
    fit = [generate_scene(PROBE_STREAM + cfg.seed, i, world.image_size) for i in range(cfg.probe_scenes)]
    probes = representation_probes(backbone.model, backbone.image_processor, fit,
                                   list(heldout_scenes(world, cfg.probe_heldout)))
    quality = caption_quality(backbone, heldout, images)
    yes_no = yes_no_accuracy(backbone, heldout, images)
    told = object_token_yes_no(backbone.model, builder, tokens, heldout)
    told_differences = object_token_differences(backbone.model, builder, tokens, heldout, "small")
    middle = object_token_yes_no(backbone.model, builder, with_details, heldout)
    middle_differences = object_token_differences(backbone.model, builder, with_details, heldout, "small")
    return {
        "heldout_scenes": quality["n"],
        "caption_exact_match": quality["caption_exact_match"],
        "caption_rouge_l": quality["caption_rouge_l"],
        "yes_no_primary_accuracy": yes_no["primary"]["accuracy"],
        "yes_no_detail_accuracy": yes_no["detail"]["accuracy"],
        "object_tokens_yes_no_detail_accuracy": told["detail"]["accuracy"],
        "object_tokens_differences_content": told_differences["content"],
        "middle_yes_no_detail_accuracy": middle["detail"]["accuracy"],
        "middle_differences_content": middle_differences["content"],
        "probe": {name: result["mean"] for name, result in probes.items()},
        "probes": probes,
        "yes_no": yes_no,
        "yes_no_object_tokens": told,
        "yes_no_middle": middle,
        "differences_middle": middle_differences,
        "differences_object_tokens": told_differences,
        "examples": quality["examples"],
    }
