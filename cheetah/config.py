"""Typed configuration: one dataclass per section of `params.yaml`, and one loader.

The same classes serve the CLI (`--set section.key=value` overrides), `dvc.yaml` (which reads `params.yaml`)
and the Python API (`load_params()` or constructing a section directly). Validation is pydantic's: an unknown
key, a wrong type or an impossible value fails with a message naming the file, the section and the field.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from cheetah.errors import CheetahError

_STRICT = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)
"""Every section: unknown keys refused, assignments validated, and each field's docstring as its description (the
CLI's help text, cheetah/options.py)."""


class ConfigError(CheetahError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or impossible."""


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------


@dataclass(config=_STRICT)
class ModelConfig:
    """Which backbone VPG-C is attached to, and where VPG-C reads and writes."""

    preset: str = "tiny"
    """A preset name (`tiny`, `vicuna-7b`, `llama2-7b`, `opt-2.7b`) or a local Hugging Face BLIP-2/InstructBLIP dir."""
    backbone_dir: str | None = "data/backbone"
    """Directory holding the backbone's weights and tokenizer. For `tiny` it is written by the base stage."""
    update_layer: int | None = None
    """LLM layer whose input VPG-C corrects; None means L/2 (16 for the 32-layer 7B LLMs)."""
    template: Literal["vicuna", "llama2", "vicuna-train", "llama2-train", "plain"] | None = None
    """Chat template (cheetah/model/prompts.py TEMPLATES); None takes the backbone's (its directory records one) or
    the preset's. `vicuna`/`llama2`: the official inference rendering the released checkpoints were evaluated with
    (real presets); `vicuna-train`/`llama2-train`: the training configs' `prompt_template` rendering (`tiny`)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype of the backbone and VPG-C (the real presets default to bfloat16)."""
    random_backbone: bool = False
    """`cheetah train` builds the preset's backbone with random weights (seeded by train.seed) instead of loading
    `backbone_dir` (whose tokenizer is used when it has one): planning and benchmarking at real shapes without a
    checkpoint. The weights card says `random_backbone: true`, and such weights are not for registration."""
    require_gpu: bool = False
    """`train` and `evaluate` refuse to start without a CUDA device, and `train` with more ranks per node than the
    node has GPUs (exit 2, before any rank starts). The real presets default to true: a 7B backbone on a CPU is
    days of compute nobody asked for; false runs it anyway."""

    def __post_init__(self) -> None:
        if self.update_layer is not None and self.update_layer < 1:
            raise ValueError("update_layer must be >= 1 (VPG-C reads the output of at least one LLM layer)")


@dataclass(config=_STRICT)
class WorldConfig:
    """The embedded procedural world: the source image-caption corpus and held-out scenes for evaluation."""

    out: str = "data/source"
    """The source corpus folder `cheetah world` writes (images, captions.jsonl, scenes.jsonl, world.json)."""
    n: int = Field(default=1200, ge=1)
    """Number of scenes (image-caption records) in the corpus."""
    seed: int = Field(default=0, ge=0)
    """Seed of the corpus' scenes (scene i of seed s is always the same)."""
    image_size: int = Field(default=64, ge=16, le=1024)
    """Width and height of every rendered image, in pixels."""
    heldout_seed: int = Field(default=10_000, ge=0)
    """Held-out scenes (benchmarks, base-model evaluation) are drawn from seeds that training never sees."""
    benchmarks: str = "data/benchmarks"
    """Where `cheetah benchmarks` writes the embedded DEMON- and MME-format benchmarks (`<benchmarks>/demon`,
    `<benchmarks>/mme`). Evaluation reads `evaluate.demon_dir` / `mme_dir`: these by default, the real
    benchmarks at scale."""

    @model_validator(mode="after")
    def _heldout_is_disjoint(self) -> "WorldConfig":
        # Scenes are keyed by (seed, index): equal seeds would make held-out scenes copies of training scenes.
        if self.heldout_seed == self.seed:
            raise ValueError("heldout_seed must differ from seed (held-out scenes would repeat training scenes)")
        return self


@dataclass(config=_STRICT)
class LanguageConfig:
    """The language stage (embedded default): the language model pretrained on the world's language alone, as
    Vicuna is before it is given eyes. The base stage starts from it (`base.init: pretrain`). It learns from scenes
    given as object tokens — every object, large or small, one input vector — every answer form about every object:
    differences between two scenes, Yes/No and open questions, captions (cheetah/train/language.py)."""

    out: str = "data/language"
    """Where the pretrained language model is written (a backbone directory: its language model and tokenizer are
    what the base stage takes)."""
    metrics: str = "metrics/language.json"
    """The language stage's metrics JSON (held-out Yes/No and difference descriptions from object tokens)."""
    steps: int = Field(default=16000, ge=1)
    """Training steps. Comparing two scenes' objects is learned late (docs/miniature.md point 8)."""
    batch_size: int = Field(default=32, ge=1)
    """Examples per step."""
    lr: float = Field(default=1e-3, gt=0)
    """AdamW peak learning rate (cosine decay after `warmup_steps`)."""
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(default=200, ge=0)
    """Linear warm-up steps."""
    vocab_size: int = Field(default=512, ge=64)
    """Learned entries of the tokenizer trained on the world's language."""
    seed: int = 0
    """Seed of the weights' initialisation and of the examples."""
    eval_scenes: int = Field(default=64, ge=1)
    """Held-out scenes the language model is asked about for its metrics."""
    threads: int = Field(default=2, ge=1)
    """Torch threads. Floating-point sums depend on the thread count, so it is fixed: the same parameters give the
    same language model on any machine."""


@dataclass(config=_STRICT)
class MiddleConfig:
    """The middle stage (embedded default): the language stage's language model trained further to read the small
    objects arriving at its middle layer (`model.update_layer`), the form of VPG-C's correction; the base stage starts
    from it. Per step `batch_size` examples split like the pipeline splits a scene — large objects and background as
    object tokens at the input, the small objects' vectors added at the middle layer — and `input_batch` ordinary
    object-token examples (cheetah/train/middle_layer.py; docs/miniature.md point 12)."""

    out: str = "data/language-middle"
    """Where the language model is written (a backbone directory, like `language.out`)."""
    metrics: str = "metrics/middle.json"
    """The middle stage's metrics JSON (held-out Yes/No and difference descriptions, the small objects arriving at
    the middle layer, and at the input)."""
    steps: int = Field(default=12000, ge=1)
    """Training steps. Reading the middle layer starts after ~5,000 and reached the input's level by ~10,000
    (docs/miniature.md point 12)."""
    batch_size: int = Field(default=16, ge=1)
    """Split examples per step (the small objects at the middle layer)."""
    input_batch: int = Field(default=16, ge=0)
    """Ordinary object-token examples per step (every object at the input), so the language model keeps reading
    its input."""
    scale: float = Field(default=30.0, gt=0)
    """Factor of the small objects' vectors at the middle layer: the hidden states there are ~30 times an object
    token's norm. The base stage adds them at the same scale."""
    lr: float = Field(default=5e-4, gt=0)
    """AdamW learning rate (constant after `warmup_steps`)."""
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(default=100, ge=0)
    """Linear warm-up steps."""
    seed: int = 0
    """Seed of the examples."""
    eval_scenes: int = Field(default=64, ge=1)
    """Held-out scenes the language model is asked about for its metrics."""
    threads: int = Field(default=2, ge=1)
    """Torch threads (fixed, as `language.threads`)."""


@dataclass(config=_STRICT)
class BaseConfig:
    """The base stage: the frozen backbone every later stage reads, written to `out` (= `model.backbone_dir`)."""

    init: Literal["pretrain", "random", "checkpoint"] = "pretrain"
    """How the backbone is made. `pretrain`: the embedded `tiny` preset, pretrained on the world's captions and
    questions (the fields below), from the language stage's language model (`language.out`). `random`:
    `model.preset`'s shapes with random weights (seeded by `seed`) and a tokenizer trained on the corpus' captions,
    saved like any checkpoint (CPU tests of the real-scale path; planning). `checkpoint`: a real checkpoint
    directory, `checkpoint`, copied in (hard links where the file system allows), so DVC versions the exact weights
    that training and evaluation read."""
    checkpoint: str | None = None
    """`init: checkpoint`: a Hugging Face BLIP-2/InstructBLIP `save_pretrained` directory with its tokenizer, e.g.
    written by `cheetah model import`."""
    out: str = "data/backbone"
    """Where the backbone is written (a Hugging Face directory with its tokenizer); = `model.backbone_dir`."""
    metrics: str = "metrics/base.json"
    """The base stage's metrics JSON (caption quality on held-out scenes; for `dvc metrics`)."""
    vision_steps: int = Field(default=1500, ge=0)
    """Phase 1: ViT (every object) and Q-Former (caption content) on the world's tags; batches of 2 x batch_size."""
    steps: int = Field(default=1500, ge=1)
    """Phase 2: the language model (the language stage's, `language.out`) and the projection, on the corpus images
    (captions, questions about their large objects) and on fresh scenes given as object tokens (every answer form
    about every object): per step `batch_size` examples, a quarter of them object tokens, plus `yes_no_batch` Yes/No
    questions about the images."""
    batch_size: int = Field(default=32, ge=1)
    """Examples per step (pretraining)."""
    middle_batch: int = Field(default=16, ge=0)
    """Phase 2: examples per step shown as pixels with the small objects' vectors added at the middle layer
    (`middle.scale`; cheetah/train/middle_layer.py `PromptWithDetails`), so the base keeps reading details arriving
    there on its visual prompt — the form of VPG-C's correction."""
    yes_no_batch: int = Field(default=32, ge=0)
    """Phase 2: Yes/No questions per step, beside the `batch_size` mixed examples (their own loss term: in the mix
    the one-token answers weigh too little for the language model to learn to compare)."""
    lr: float = Field(default=2e-3, gt=0)
    """AdamW learning rate of the vision phase."""
    align_lr: float = Field(default=1e-3, gt=0)
    """AdamW learning rate of phase 2 (when the language model learned from scratch here: at 2e-3 it did not start
    comparing a Yes/No question with its input within 1200 steps, at 1e-3 it did; docs/base.md)."""
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay of both pretraining phases."""
    warmup_steps: int = Field(default=50, ge=0)
    """Linear warm-up steps of each phase (then cosine decay to zero)."""
    vocab_size: int = Field(default=512, ge=64)
    """Learned entries of the tokenizer trained on the world's language (`pretrain`, `random`); the chat templates'
    markers come on top (cheetah.world.language.TEMPLATE_MARKERS)."""
    seed: int = 0
    """Seed of the weights' initialisation and of the examples' order."""
    eval_scenes: int = Field(default=64, ge=1)
    """Held-out scenes the pretrained backbone is asked about for the metrics (captions, Yes/No questions)."""
    probe_scenes: int = Field(default=2000, ge=1)
    """Scenes (of a stream of their own) the representation probes are fitted on (cheetah/evaluate/probes.py)."""
    probe_heldout: int = Field(default=256, ge=1)
    """Held-out scenes the representation probes are scored on."""
    threads: int | None = Field(default=None, ge=1)
    """Torch CPU threads. Floating-point sums depend on the thread count, so the pipeline fixes it (params.yaml: 2):
    the same parameters give the same numbers on any machine, whatever its core count or OMP_NUM_THREADS say.
    None: torch's default (the core count or OMP_NUM_THREADS): numbers that depend on it."""


@dataclass(config=_STRICT)
class SynthesizeConfig:
    """Attention-guided synthetic discriminative data (paper §2.2), plus caption samples for the joint regulariser."""

    source: str = "data/source"
    """The source corpus folder (captions.jsonl + images; scenes.jsonl for `masks: world`)."""
    out: str = "data/synthetic"
    """The synthetic set's folder (synthetic.jsonl, captions.jsonl, images, quarantine, stats, contact sheets)."""
    n: int = Field(default=2000, ge=1)
    """Number of synthetic (original, edited) pairs to produce."""
    captions: int = Field(default=2000, ge=0)
    """Number of caption samples for the joint caption regulariser."""
    seed: int = Field(default=0, ge=0)
    """Seed of the draws: which source image, edit type, target and caption sample each pair gets."""
    workers: int = Field(default=1, ge=1)
    """Worker processes of the local Dask cluster that `executor: dask` starts when `address` is null (with a GPU
    `device`: one worker per GPU). Any number gives byte-identical output (one seed per sample, merged in order)."""
    executor: Literal["local", "dask"] = "local"
    """Where the shards run: `local` (one after another in this process) or `dask` (a Dask cluster: the one at
    `address`, or a local one with `workers` processes). The model backends are loaded once per worker."""
    address: str | None = None
    """Dask scheduler to connect to (e.g. `tcp://10.0.0.5:8786`, with the workers already started there; see
    docs/scale.md); null: start a local cluster. Only with `executor: dask`."""
    shard_size: int = Field(default=64, ge=1)
    """Pairs per shard: the unit of work, of resume after a kill and of failure. It never changes the output."""
    edit_types: list[Literal["modify", "swap", "delete", "add"]] = dataclasses.field(
        default_factory=lambda: ["modify", "swap", "delete", "add"]
    )
    """Edit types, used in turn (sample i gets edit_types[i % len]), so the set stays balanced."""
    selector: Literal["attention", "random"] = "attention"
    """Target selection: the backbone Q-Former's least-attended object (the paper), or uniform (ablation)."""
    masks: Literal["world", "sam"] = "world"
    """Object masks: the world's ground truth (needs the corpus' scenes.jsonl) or SAM (real images, `sam_dir`)."""
    apply: Literal["world", "inpaint"] = "world"
    """How the edit is made: re-render the edited scene graph, or diffusion inpainting (`inpaint_dir`)."""
    filters: list[Literal["pixel", "clip"]] = dataclasses.field(default_factory=lambda: ["pixel"])
    """Checks an edited image must pass: pixel (visible inside, unchanged outside the region), clip (`clip_dir`)."""
    min_changed_fraction: float = Field(default=0.02, gt=0, le=1)
    """Filter: the fraction of the edit region whose pixels must change for the edit to count as visible."""
    max_attempts: int = Field(default=3, ge=1)
    """Targets tried per sample (least attended first) before the sample is given up and quarantined."""
    sam_dir: str | None = None
    """Local Hugging Face SAM directory (SamModel + SamProcessor) for `masks: sam`."""
    sam_points: int = Field(default=8, ge=1)
    """SAM automatic masks: prompts on a sam_points x sam_points grid."""
    sam_min_score: float = Field(default=0.7, ge=0, le=1)
    """SAM automatic masks: keep masks whose predicted IoU is at least this."""
    inpaint_dir: str | None = None
    """Local diffusers inpainting pipeline directory (e.g. a Stable Diffusion inpainting snapshot)."""
    inpaint_steps: int = Field(default=25, ge=1)
    """Diffusion steps of the inpainting pipeline (`apply: inpaint`)."""
    inpaint_guidance: float = Field(default=7.5, ge=0)
    """Classifier-free guidance scale of the inpainting pipeline (`apply: inpaint`)."""
    clip_dir: str | None = None
    """Local Hugging Face CLIP directory: the `clip` filter, and names for SAM's objects."""
    clip_min_similarity: float = Field(default=0.2, ge=-1, le=1)
    """CLIP filter: least cosine similarity between the edited region and the text of the edit."""
    device: str = "cpu"
    """Where the SAM, CLIP and inpainting models (and the attention backbone) run: "cpu", or "cuda" (with
    `executor: dask`, every worker takes one GPU through the Dask resource GPU=1), "cuda:1", ..."""
    labels: list[str] = dataclasses.field(default_factory=lambda: [
        "person", "dog", "cat", "bird", "car", "bicycle", "ball", "cup", "bottle", "chair", "tree", "flower",
        "hat", "bag", "book", "clock",
    ])
    """Real images: object names CLIP chooses from for SAM's masks, and what swap/add may put in."""

    @model_validator(mode="after")
    def _backends_are_usable(self) -> "SynthesizeConfig":
        if not self.edit_types:
            raise ValueError("edit_types must name at least one edit type")
        if len(set(self.edit_types)) != len(self.edit_types):
            raise ValueError(f"edit_types has repeats: {self.edit_types}")
        if self.apply == "world" and self.masks != "world":
            raise ValueError("apply: world re-renders the scene graph, so it needs masks: world")
        for flag, path, name in ((self.masks == "sam", self.sam_dir, "sam_dir"),
                                 (self.apply == "inpaint", self.inpaint_dir, "inpaint_dir"),
                                 ("clip" in self.filters, self.clip_dir, "clip_dir")):
            if flag and not path:
                raise ValueError(f"{name} must be set to a local model directory for this backend")
        if self.executor == "local" and self.workers > 1:
            raise ValueError(f"workers: {self.workers} needs executor: dask (executor: local runs the shards in this "
                             f"process)")
        if self.executor == "local" and self.address is not None:
            raise ValueError("address names a Dask scheduler: it needs executor: dask")
        if self.masks == "sam" and len(self.labels) < 2:
            raise ValueError("labels needs at least two names (swap replaces one label with another)")
        return self


@dataclass(config=_STRICT)
class ValidateConfig:
    """Great Expectations suites: bounds and tolerances."""

    max_text_chars: int = Field(default=2000, ge=1)
    """Longest caption, instruction or response accepted, in characters."""
    balance_tolerance: float = Field(default=0.1, ge=0, le=1)
    """Each edit type's share may differ from the uniform share by at most this fraction (absolute)."""
    docs_dir: str = "reports/data_docs"
    """Per suite: <docs_dir>/<suite>/ (GX data docs, result.json, quarantine.jsonl) when it passes, and
    <docs_dir>/<suite>-failed/ when it fails, so a failed run never replaces the last passing report."""
    image_size: int | None = None
    """Expected width and height of every image. None: source and synthetic images must all share one size
    (the most common); benchmark images (real ones vary) are then only checked for being present and decodable."""
    max_examples: int = Field(default=5, ge=1)
    """Bad rows shown per failed expectation in the summary."""


@dataclass(config=_STRICT)
class TrainConfig:
    """VPG-C training with DeepSpeed. Defaults are the scaled-down `tiny` recipe; 7B presets use the paper's."""

    data: str = "data/synthetic"
    """The synthetic set to train on (synthetic.jsonl + captions.jsonl + images)."""
    out: str = "checkpoints/vpgc"
    """Final VPG-C weights + card (what evaluation and registration read)."""
    state_dir: str = "checkpoints/vpgc-state"
    """Resumable training state (weights, optimiser, scheduler, RNG, data position); a killed run resumes here."""
    metrics: str = "metrics/train.json"
    """The training metrics JSON (held-out loss before and after, speed, memory; for `dvc metrics`)."""
    curve: str = "plots/train_curve.csv"
    """Learning curve for `dvc plots` (step, loss, lr)."""
    curve_image: str | None = None
    """The same curve with the held-out loss, as an image; None: next to `curve`, as .png."""
    steps: int = Field(default=300, ge=1)
    """Optimiser steps."""
    synthetic_batch: int = Field(default=12, ge=0)
    """Synthetic discriminative examples per step; 0 trains on captions only (the ablation of the paper's Table 4)."""
    caption_batch: int = Field(default=32, ge=0)
    """Caption samples per step (the joint caption regulariser)."""
    lr: float = Field(default=1e-3, gt=0)
    """Peak AdamW learning rate."""
    query_lr: float | None = Field(default=None, gt=0)
    """Peak learning rate of VPG-C's new query tokens; None: `lr` (the official recipe: one rate). The miniature's
    default 1e-3 against `lr` 3e-3 changed little in measurement (docs/miniature.md point 14; `guide_lr` decides)."""
    guide_lr: float | None = Field(default=None, gt=0)
    """Peak learning rate of `qformer_proj`, the instruction guide added to every query; None: `lr`. At the
    projections' rate in the miniature it shifts all queries alike and VPG-C stops fetching (point 14)."""
    query_init: Literal["copy", "random"] = "copy"
    """VPG-C's new queries at the start: "copy", the backbone's caption-trained queries (the official code's
    `init_query_tokens_value`), or "random", drawn from a normal distribution of their standard deviation (seeded by
    `seed`; the paper's "a new set of learnable queries"). In the miniature the copy holds VPG-C to what the caption
    queries read, and on some bases it never fetches the details (docs/miniature.md point 16)."""
    weight_decay: float = Field(default=0.05, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(default=30, ge=0)
    """Linear warm-up steps before the schedule."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule after warm-up: cosine decay to 0, or constant."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's moment decay rates (beta1, beta2), each in [0, 1)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimiser state), 2 (+ gradients), 3 (+ weights)
    partitioned over the ranks."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision: fp32, bf16 or fp16 (loss scaling) mixed precision."""
    gradient_accumulation: int = Field(default=1, ge=1)
    """Micro-batches accumulated per step (the step's batch stays synthetic_batch + caption_batch)."""
    grad_clip: float = Field(default=1.0, ge=0)
    """Gradient norm clipping (0: none)."""
    gradient_checkpointing: bool = False
    """Recompute the LLM's activations in the backward pass (less memory, more compute)."""
    checkpoint_every: int = Field(default=100, ge=1)
    """Steps between saves of the resumable state in `state_dir`."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """Saved states kept in `state_dir` (older ones are removed)."""
    feature_cache: str | None = "memory"
    """Frozen-ViT features of every training image, computed once before the first step: "memory" (in each
    process), a directory (sharded .npy files shared by every rank and node, read without keeping them in RAM;
    each rank computes a share; one store per vision weights' content, dtype and image set, so another backbone's
    features are never reused), or None (the ViT runs on every step's images)."""
    feature_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Precision of cached features; `auto` is the vision tower's (`model.dtype`). Half precision halves the cache."""
    workers: int = Field(default=2, ge=0)
    """DataLoader worker processes per rank that read, tokenise and pad examples, gather cached features and decode
    images (0: in the training process)."""
    launcher: str | None = None
    """How `cheetah train` starts its processes: None (this one process), or a launcher command it re-runs itself
    under, e.g. `torchrun --nproc_per_node 8` or `deepspeed --hostfile hostfile` (so `dvc repro` and the Prefect
    flow train on many GPUs). `$VARS` are expanded. A process started by a launcher (RANK set) never relaunches."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON config merged over the generated one (offload, bucket sizes, overlap, ...). Where it sets
    what other train keys decide (batch sizes, ZeRO stage, precision, clipping, optimiser) it must agree with them.
    The merged config is written to `<state_dir>/deepspeed_config.json` and logged with the run."""
    heldout_fraction: float = Field(default=0.05, ge=0, lt=1)
    """Source images held out of training (all their examples), for the held-out difference-description loss."""
    eval_every: int = Field(default=100, ge=1)
    """Steps between evaluations of the held-out loss."""
    max_length: int = Field(default=256, ge=16)
    """Longest tokenised example; a longer prompt is an error, a longer response is cut."""
    seed: int = 0
    """Seed of the data order, the joint sampler and (with `model.random_backbone`) the backbone's weights."""
    log_every: int = Field(default=10, ge=1)
    """Steps between writes of the learning curve to MLflow."""
    loss_reduction: Literal["sample", "token"] = "sample"
    """How a step's losses are averaged. `token`: the mean over every response token of the step's global batch
    (all ranks, micro-batches and both sources), as the official model's Hugging Face loss (`cheetah_vicuna.py`
    L329-339: `CrossEntropyLoss()` over the batch), so long answers weigh more. `sample`: each sample's mean token
    loss, then the mean over samples. Either way N data-parallel ranks compute the single-process step. The real
    presets default to `token`; the embedded `tiny` default keeps `sample`."""
    qformer_dropout: bool = False
    """Run the frozen Q-Former in training mode during training, so its dropout (0.1) is active in the first pass
    and in VPG-C's re-extraction. The official model freezes the Q-Former's weights but, unlike the ViT, never puts
    it in eval mode (`cheetah_vicuna.py` L87-91 vs L63-71), so its training (unreleased) ran with dropout on. The
    real presets default to true; `tiny` keeps false. With it on, dropout masks depend on the data split, so N ranks
    no longer reproduce one process exactly."""
    max_skipped_steps: int = Field(default=0, ge=0)
    """Steps with a non-finite loss that are skipped (no update) before training stops with a DivergenceError.
    0: the first one stops it. Skipping needs gradient_accumulation 1 (a partly accumulated step cannot be undone).
    A non-finite weight after an update always stops training."""
    threads: int | None = Field(default=None, ge=1)
    """Torch CPU threads per rank. Floating-point sums depend on the thread count, so the pipeline fixes it
    (params.yaml: 2): the same parameters give the same numbers on any machine, whatever its core count or
    OMP_NUM_THREADS say. None: torch's default (the core count or OMP_NUM_THREADS): numbers that depend on it."""

    @model_validator(mode="after")
    def _skipping_needs_whole_steps(self) -> "TrainConfig":
        if self.synthetic_batch + self.caption_batch < 1:
            raise ValueError("synthetic_batch + caption_batch must be at least 1 (a step needs examples)")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must both be in [0, 1) (AdamW's moment decay rates), got {list(self.betas)}")
        if self.max_skipped_steps and self.gradient_accumulation != 1:
            raise ValueError("max_skipped_steps > 0 needs gradient_accumulation: 1 (a step whose earlier "
                             "micro-batches were already accumulated cannot be skipped)")
        return self


    @model_validator(mode="after")
    def _image_next_to_curve(self) -> "TrainConfig":
        if self.curve_image is None:  # (set without validating again: this is the validation)
            object.__setattr__(self, "curve_image", str(Path(self.curve).with_suffix(".png")))
        return self


@dataclass(config=_STRICT)
class EvaluateConfig:
    """DEMON and MME evaluation: embedded benchmark sizes, generation and outputs."""

    demon_dir: str = "data/benchmarks/demon"
    """The DEMON root evaluated (<Dataset>/core/core.json), the embedded one by default."""
    mme_dir: str = "data/benchmarks/mme"
    """The MME root evaluated (one folder per subtask), the embedded one by default."""
    out: str = "reports/eval"
    """The report folder: predictions per model (resumable), scores, report.md, charts, examples."""
    metrics: str = "metrics/eval.json"
    """The evaluation metrics JSON of the evaluated VPG-C model, with the other models under baselines (for `dvc
    metrics` and the registry's gate)."""
    demon_per_task: int = Field(default=80, ge=1)
    """Samples per embedded DEMON-format task (World_*). Generation is cheap at this scale (~130 answers/s), and
    more samples narrow the study's intervals over seeds."""
    mme_per_subtask: int = Field(default=60, ge=2)
    """Images per embedded MME-format subtask, half about a large object, half about a small one; each is asked one
    Yes- and one No-question (MME's existence subtask has 30 images; twice that narrows the intervals)."""
    heldout_differences: bool = False
    """Embedded world: also answer the synthetic pairs training holds out (`train.data`, the share
    `train.heldout_fraction` that training never sees) and score their content (cheetah/evaluate/recovery.py). Off
    for real data, whose descriptions the world's language cannot read back."""
    probe_scenes: int = Field(default=0, ge=0)
    """Embedded world: fit the representation probe on what each model's VPG-C adds, on this many scenes (scored on
    `probe_scenes // 8` held-out ones; cheetah/evaluate/recovery.py); 0 to skip."""
    batch_size: int = Field(default=16, ge=1)
    """Generation batch (length-bucketed). Answers do not depend on it in fp32; see cheetah/evaluate/generation.py
    for what holds in bf16 on a GPU."""
    max_new_tokens: int = Field(default=32, ge=1)
    """The real presets default to 300, the official scripts' `max_new_tokens` (conversation.py L136)."""
    decoding: Literal["official-demon"] | None = None
    """A named decoding setting, which then decides max_new_tokens, do_sample, temperature, top_p and top_k
    (DECODING_SETTINGS; `seed` stays yours, 0 when unset). `official-demon` samples as the official DEMON script
    did (i4_cheetah_llama2.py through Chat.batch_answer), seeded. None: the fields below as they are."""
    do_sample: bool = False
    """Sample answers (with temperature, top_p, top_k and a seed) instead of greedy decoding."""
    seed: int | None = None
    """Required when `do_sample` is true: sampling without a seed is refused."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling only."""
    top_p: float = Field(default=0.9, gt=0, le=1)
    """Sampling only."""
    top_k: int = Field(default=0, ge=0)
    """Sampling only: keep the k most likely tokens before top-p; 0 keeps all."""
    stop_strings: list[str] | None = None
    """Where answers end; None: the chat template's end marker ('###' for Vicuna, the EOS </s> for LLaMA-2, a
    newline for plain prompts), which is each real preset's stop (conversation.py L125-127,
    conversation_llama2.py L150)."""
    demon_option_rule: Literal["official", "strict"] = "official"
    """DEMON multi-choice answers that share no term with any option: `official` takes the argmax of the all-zero
    similarity row, i.e. the first option, as `evaluate.py` L96-105 does (scores compare with the paper's);
    `strict` judges them by exact match instead. Either way their number is reported per task (`no_option`)."""
    device: str = "auto"
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda`, `cuda:1`, ...; the dtype is `model.dtype`."""
    threads: int | None = Field(default=None, ge=1)
    """Torch CPU threads per rank. Floating-point sums depend on the thread count, so the pipeline fixes it
    (params.yaml: 2): the same parameters give the same numbers on any machine, whatever its core count or
    OMP_NUM_THREADS say. None: torch's default (the core count or OMP_NUM_THREADS): numbers that depend on it."""

    @model_validator(mode="after")
    def _sampling_needs_seed(self) -> "EvaluateConfig":
        if self.do_sample and self.seed is None:
            raise ValueError("do_sample=true needs an explicit seed (unseeded sampling is not reproducible)")
        return self

    def generation(self) -> dict[str, Any]:
        """The decoding arguments of `cheetah.evaluate.generation.Generator`: the named setting's, if any."""
        out = {k: getattr(self, k) for k in ("max_new_tokens", "do_sample", "seed", "temperature", "top_p", "top_k",
                                             "stop_strings")}
        if self.decoding is not None:
            out.update(DECODING_SETTINGS[self.decoding])
            out["seed"] = 0 if self.seed is None else self.seed
        return out


@dataclass(config=_STRICT)
class RegisterConfig:
    """MLflow registration and the champion/challenger gate."""

    model_name: str = "cheetah-vpgc"
    """The registered MLflow model's name."""
    experiment: str = "cheetah"
    """The MLflow experiment every stage's run goes to."""
    metric: str = "demon.average"
    """Metric from the evaluation metrics file that decides promotion (higher is better)."""
    margin: float = Field(default=0.0, ge=0)
    """The challenger becomes champion only if it beats the champion's metric by more than this."""

    @model_validator(mode="after")
    def _name_is_usable(self) -> "RegisterConfig":
        # The registry finds a model's versions with an MLflow filter string (name='...'), whose grammar has no
        # escape for quotes; MLflow itself refuses / and : in a name. Refused here, before any work.
        bad = sorted({c for c in self.model_name if c in "'\"/:"})
        if not self.model_name.strip() or bad:
            raise ValueError(f"model_name {self.model_name!r}: a registered model's name must be non-empty and hold "
                             f"none of ' \" / : (found {' '.join(bad) or 'only spaces'})")
        return self


StudyArm = Literal["base", "vpgc_captions", "vpgc_synthetic", "vpgc_random_target", "blind"]
"""An arm of the ablation study (cheetah/study.py ARMS says what each is, in this order)."""
STUDY_ARMS: tuple[str, ...] = get_args(StudyArm)


@dataclass(config=_STRICT)
class StudyConfig:
    """The ablation study (`cheetah study`, the paper's Table 4 in miniature): every arm trained and evaluated once
    per seed with the other sections' settings, then mean and 95 % confidence interval over the seeds."""

    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    """One run of every arm per seed; a seed sets base.seed, synthesize.seed and train.seed (the corpus and the
    benchmarks stay the same)."""
    arms: list[StudyArm] = dataclasses.field(default_factory=lambda: list(STUDY_ARMS))
    """Which arms to run (the ones an arm needs run too: `blind` evaluates the `vpgc_synthetic` weights)."""
    work: str = "data/study"
    """Per seed: the backbone, synthetic data, weights and evaluations; what is there and current is reused."""
    metrics: str = "metrics/study.json"
    """The study's results JSON (every arm's mean and 95 % interval per seed set)."""
    report: str = "reports/study"
    """Folder of the table (study.md) and the plot (study.png)."""

    @model_validator(mode="after")
    def _seeds_and_arms(self) -> "StudyConfig":
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if any(seed < 0 for seed in self.seeds):
            raise ValueError(f"seeds must be 0 or more (numpy's generators refuse negative seeds): {self.seeds}")
        for name, items in (("seeds", self.seeds), ("arms", self.arms)):
            if len(set(items)) != len(items):
                raise ValueError(f"{name} has repeats: {items}")
        if not self.arms:
            raise ValueError("arms must name at least one arm")
        return self


@dataclass(config=_STRICT)
class Params:
    """All of `params.yaml`."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    world: WorldConfig = dataclasses.field(default_factory=WorldConfig)
    language: LanguageConfig = dataclasses.field(default_factory=LanguageConfig)
    middle: MiddleConfig = dataclasses.field(default_factory=MiddleConfig)
    base: BaseConfig = dataclasses.field(default_factory=BaseConfig)
    synthesize: SynthesizeConfig = dataclasses.field(default_factory=SynthesizeConfig)
    validate: ValidateConfig = dataclasses.field(default_factory=ValidateConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
    register: RegisterConfig = dataclasses.field(default_factory=RegisterConfig)
    study: StudyConfig = dataclasses.field(default_factory=StudyConfig)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def _format_errors(err: ValidationError, source: str) -> str:
    """One line per problem (`file: section.key: what`), the first line alone when there is only one."""
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        msg = e["msg"]
        if e["type"] == "unexpected_keyword_argument" or e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {where}: {msg.removeprefix('Value error, ')}{got}")
    if len(lines) == 2:
        return f"{source}: {lines[1].strip()}"
    return "\n".join(lines)


MAX_YAML_VALUES = 100_000
"""The most values a parameters file may expand to. Aliases share nodes, so a few lines of anchors can stand for
billions of values ("billion laughs"): loading is quick, but whatever walks the result (validation, an error
message that prints it) would hang."""


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last), and a
    document whose aliases expand to more than MAX_YAML_VALUES values is refused before anything walks it."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node, {})
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (also on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` stands for once every alias is expanded (shared nodes counted once per use, each
    computed once)."""
    if id(node) in sizes:
        return sizes[id(node)]
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    if size > MAX_YAML_VALUES:
        raise yaml.constructor.ConstructorError(
            None, None, f"expands to more than {MAX_YAML_VALUES} values (YAML aliases); refusing to load it",
            node.start_mark)
    sizes[id(node)] = size
    return size


def read_yaml(path: str | Path) -> Any:
    """A YAML file (parameters, configs) with duplicate keys refused; errors name the file and line."""
    try:
        return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-4` -> ("train.lr", 0.0001). Values are parsed as YAML, so lists and booleans work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw != "" else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {key.strip()!r}: the value is not valid YAML ({problem})") from None
    return key.strip(), value


# The paper's recipe (Appendix C): 18k steps of 24 synthetic + 64 caption samples, AdamW lr 2e-5, weight decay
# 0.05, 2k warm-up steps, cosine decay. It is the default of the real-scale presets: any `train` key that the
# parameters file does not set takes these values when `model.preset` is one of them. The dataclass defaults are
# the scaled-down recipe of the embedded `tiny` preset.
PAPER_RECIPE: dict[str, Any] = {
    "steps": 18_000, "synthetic_batch": 24, "caption_batch": 64, "lr": 2e-5, "weight_decay": 0.05,
    "warmup_steps": 2_000, "schedule": "cosine", "betas": [0.9, 0.999], "precision": "bf16", "zero_stage": 2,
    "gradient_checkpointing": True, "feature_cache": None, "checkpoint_every": 1_000, "eval_every": 1_000,
    "max_length": 512, "log_every": 10, "workers": 4,
}
# What the official model does in training, where it differs from the tiny recipe: the loss is Hugging Face's token
# mean over the batch, and the frozen Q-Former stays in training mode (dropout on). See the TrainConfig fields.
OFFICIAL_TRAINING: dict[str, Any] = {"loss_reduction": "token", "qformer_dropout": True}
# Evaluation as the official scripts: answers up to 300 new tokens (Chat.batch_answer's default, conversation.py
# L136, which i4_cheetah_llama2.py L128 keeps). Decoding stays greedy (set `decoding: official-demon` to sample as
# the official DEMON run did); each preset's stop string comes from its chat template (`stop_strings: null`).
OFFICIAL_EVALUATION: dict[str, Any] = {"max_new_tokens": 300}
_REAL = {"train": {**PAPER_RECIPE, **OFFICIAL_TRAINING}, "evaluate": OFFICIAL_EVALUATION,
         "model": {"dtype": "bfloat16", "backbone_dir": None, "require_gpu": True}, "base": {"init": "checkpoint"}}
PRESET_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "vicuna-7b": _REAL,
    "llama2-7b": _REAL,
    "opt-2.7b": _REAL,
    # The 7B architecture at toy width: the real-scale code path (bf16, checkpointing, ...) on a CPU, with a
    # random backbone written by the base stage. Batches and steps are the config file's (configs/mini-random.yaml).
    "mini": {"train": PAPER_RECIPE, "model": {"dtype": "bfloat16"}, "base": {"init": "random"}},
}
# Named decoding settings (`evaluate.decoding`; EvaluateConfig.generation applies them).
# `official-demon`: Chat.batch_answer (conversation_llama2.py L160-225, called by i4_cheetah_llama2.py L128) samples
# with do_sample=True, top_p=0.9, temperature=1.0, max_new_tokens=300, num_beams=1, and passes no top_k, so the
# transformers 4.31 default it pins (requirement.txt) applies: GenerationConfig.top_k = 50. The official run was
# unseeded (setup_seeds is never called); here `evaluate.seed` (0 when unset) seeds it, and each answer's draw
# depends only on the seed and the sample. Not reproduced: min_length=1, which at most forbids EOS as the very first
# token.
DECODING_SETTINGS: dict[str, dict[str, Any]] = {
    "official-demon": {"do_sample": True, "top_p": 0.9, "temperature": 1.0, "top_k": 50, "max_new_tokens": 300},
}


def _fill(tree: dict[str, Any], section: str, defaults: dict[str, Any]) -> None:
    given = tree.setdefault(section, {})
    if isinstance(given, dict):
        for key, value in defaults.items():
            given.setdefault(key, value)


def _apply_preset_defaults(tree: dict[str, Any]) -> None:
    model = tree.get("model") if isinstance(tree.get("model"), dict) else {}
    for section, defaults in PRESET_DEFAULTS.get(str(model.get("preset", "tiny")), {}).items():
        _fill(tree, section, defaults)


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read `params.yaml` (missing sections take their defaults) and apply `section.key=value` overrides.

    For a real-scale `model.preset`, keys left unset take the preset's defaults (`PRESET_DEFAULTS`: the paper's
    recipe and the official model's training and evaluation behaviour)."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None and Path(path).exists():
        source = str(path)
        loaded = read_yaml(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    elif path is not None and str(path) != "params.yaml":
        raise ConfigError(f"{path}: no such parameters file")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    _apply_preset_defaults(tree)
    _refuse_booleans_as_numbers(tree, source)
    try:
        return Params(**{k: v for k, v in tree.items()}) if tree else Params()
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
    except TypeError as e:  # a section given as a scalar
        raise ConfigError(f"{source}: {e}") from None


def _refuse_booleans_as_numbers(tree: dict[str, Any], source: str) -> None:
    """pydantic reads `true` as 1 for a number field (`train.steps: true` would train one step); a boolean where a
    number belongs is almost surely a slip, so it is an error naming the key."""
    sections = typing.get_type_hints(Params)
    for name, values in tree.items():
        if name not in sections or not isinstance(values, dict):
            continue
        hints = typing.get_type_hints(sections[name])
        for key, value in values.items():
            allowed = set(get_args(hints.get(key))) or {hints.get(key)}
            if isinstance(value, bool) and bool not in allowed and allowed & {int, float}:
                raise ConfigError(f"{source}: {name}.{key}: expected a number, got the boolean {value!r}")


def to_dict(obj: Any) -> dict[str, Any]:
    """A section (or all params) as plain Python data, e.g. for MLflow params."""
    return dataclasses.asdict(obj)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1e-3}}` -> `{"train.lr": 1e-3}`."""
    out: dict[str, Any] = {}
    for k, v in (to_dict(obj) if dataclasses.is_dataclass(obj) else obj).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
