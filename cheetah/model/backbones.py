"""Backbones: Hugging Face BLIP-2 / InstructBLIP models with a decoder-only language model.

A backbone is built from a preset (random weights, or on the `meta` device for counting and planning) or loaded
from a local directory that holds a `save_pretrained` model plus its tokenizer and image processor. Nothing is
ever fetched from a hub. Presets:

- `tiny`: the embedded default (ViT + Q-Former + small LLaMA), pretrained here by the base stage;
- `vicuna-7b`, `llama2-7b`: the official Cheetah shapes (EVA ViT-g/14 as BLIP-2 has it, the BLIP-2 Q-Former with 32
  queries, a 768->4096 projection, a 32-layer LLaMA-7B);
- `opt-2.7b`: BLIP-2 OPT-2.7b;
- `mini`: the `vicuna-7b` architecture (EVA-style ViT with qkv bias, a Q-Former with cross-attention every second
  layer and 32 queries, LLaMA with its 32001-row vocabulary) at toy width: the real-scale code path on a CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    BlipImageProcessorPil,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    PreTrainedModel,
)

from cheetah.io import DataError, check_finite_weights
from cheetah.model.prompts import IMAGE_TOKEN, TEMPLATES, ChatTemplate

BackboneModel = Blip2ForConditionalGeneration | InstructBlipForConditionalGeneration

# EVA ViT-g/14 as LAVIS builds it for BLIP-2 (39 blocks: the last of the 40 is dropped), 224 px -> 16x16+1 tokens.
# initializer_range: Hugging Face's BLIP-2 vision default (1e-10) assumes pretrained weights are always loaded; a ViT
# built from scratch with it outputs constant features and never learns to see.
EVA_VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                 image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, initializer_range=0.02)
# The BLIP-2 Q-Former: BERT-base with cross-attention every second layer.
BLIP2_QFORMER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     cross_attention_frequency=2, encoder_hidden_size=1408, layer_norm_eps=1e-12)
LLAMA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                # LLaMA's 32000 tokens + the `<image>` placeholder (its embedding row is never read).
                vocab_size=32001, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    vision: dict[str, Any]
    qformer: dict[str, Any]
    text: dict[str, Any]
    num_query_tokens: int
    template: str
    image_token_index: int | None
    kind: str = "blip2"  # or "instructblip"
    patches_per_side: int | None = None
    """If set, the ViT's patch size follows the image size: image_size // patches_per_side (the last
    image_size % patches_per_side pixel rows and columns are not seen); else the preset's patch size is fixed."""


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        # One ViT patch per cell of the world's 3 x 3 grid (patches_per_side below; 21 pixels at 64): a large
        # object fills its patch, and the vision phase learns its shape ~4x faster than from 8-pixel patches
        # (docs/base.md, benchmarks/vision_probe.py). The small objects' shapes, jittered inside a patch, are not.
        vision=dict(hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                    image_size=64, patch_size=21, layer_norm_eps=1e-6, qkv_bias=True, initializer_range=0.02),
        qformer=dict(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                     cross_attention_frequency=1, encoder_hidden_size=96, layer_norm_eps=1e-12),
        # vocab_size and the special-token ids come from the tokenizer trained on the world's language. Init 0.1
        # (HF's default is 0.02) and 8 heads: at 0.02 this 128-wide model never learns to compare a Yes/No question
        # with its context (docs/base.md, benchmarks/yes_no_reading.py).
        text=dict(model_type="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512, rms_norm_eps=1e-6,
                  vocab_size=512, tie_word_embeddings=True, initializer_range=0.1),
        num_query_tokens=8,
        # The training configs' rendering, with which the embedded default's recorded results were made.
        template="vicuna-train",
        image_token_index=None,
        patches_per_side=3,  # cheetah.world.GRID, not imported: the model does not depend on the world
    ),
    "vicuna-7b": Preset("vicuna-7b", EVA_VIT_G, BLIP2_QFORMER, LLAMA_7B, 32, "vicuna", 32000),
    "llama2-7b": Preset("llama2-7b", EVA_VIT_G, BLIP2_QFORMER, {**LLAMA_7B, "max_position_embeddings": 4096},
                        32, "llama2", 32000),
    "mini": Preset(
        "mini",
        {**EVA_VIT_G, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "image_size": 56},
        {**BLIP2_QFORMER, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "encoder_hidden_size": 64},
        {**LLAMA_7B, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "max_position_embeddings": 1024},
        32, "vicuna", 32000),
    # Salesforce/blip2-opt-2.7b: OPT's 50272 rows padded to 50304, `<image>` at 50265.
    "opt-2.7b": Preset(
        "opt-2.7b", EVA_VIT_G, {**BLIP2_QFORMER, "encoder_hidden_size": 1408},
        dict(model_type="opt", hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
             max_position_embeddings=2048, word_embed_proj_dim=2560, vocab_size=50304, do_layer_norm_before=True,
             bos_token_id=2, eos_token_id=2, pad_token_id=1),
        32, "plain", 50265,
    ),
}


@dataclasses.dataclass
class Backbone:
    """A frozen multimodal LLM and everything needed to feed it."""

    model: BackboneModel
    tokenizer: Any | None
    image_processor: BlipImageProcessorPil | None
    template: ChatTemplate
    source: str
    """Preset name or directory it came from (recorded in VPG-C weight cards)."""
    qformer_tokenizer: Any | None = None
    """InstructBLIP only: the Q-Former's own (BERT) tokenizer, for the instruction its first pass reads."""
    init: str | None = None
    """How its weights came about: "random" (built here from a preset), or what the directory's
    `cheetah_backbone.json` says ("pretrain", "random", "checkpoint" from the base stage; None otherwise)."""

    @property
    def random_weights(self) -> bool:
        """Random weights that exist in this process only (no checkpoint directory): for planning and benchmarks."""
        return self.init == "random" and self.source in PRESETS

    @property
    def config(self) -> Blip2Config | InstructBlipConfig:
        return self.model.config

    @property
    def is_instructblip(self) -> bool:
        return isinstance(self.model, InstructBlipForConditionalGeneration)

    @property
    def num_query_tokens(self) -> int:
        return self.model.config.num_query_tokens

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_index

    @property
    def num_llm_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers

    def fingerprint(self) -> str:
        """Hash of the architecture (config without volatile fields): two backbones VPG-C weights can move between."""
        cfg = self.model.config.to_dict()
        for section in (cfg, *(cfg.get(sub, {}) for sub in ("vision_config", "qformer_config", "text_config"))):
            for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation_autoset"):
                section.pop(k, None)
        return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def preset_config(name: str, *, tokenizer: Any | None = None, image_size: int | None = None,
                  **text_overrides: Any) -> Blip2Config | InstructBlipConfig:
    """The Hugging Face config of a preset. For `tiny`, the vocabulary and special ids come from `tokenizer`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)} or pass a local directory")
    p = PRESETS[name]
    vision, text = dict(p.vision), {**p.text, **text_overrides}
    image_token_index = p.image_token_index
    if image_size is not None and p.patches_per_side:
        vision.update(image_size=image_size, patch_size=image_size // p.patches_per_side)
    elif image_size is not None:
        if image_size % vision["patch_size"]:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {vision['patch_size']}")
        vision["image_size"] = image_size
    if tokenizer is not None:
        image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_token_index is None or image_token_index == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token")
        # A preset with a fixed vocabulary keeps its rows (real shapes) when the tokenizer is smaller; the rows past
        # the tokenizer are never read, like OPT's padding rows. `tiny` takes the tokenizer's size.
        rows = len(tokenizer) if p.image_token_index is None else max(len(tokenizer), text["vocab_size"])
        text.update(vocab_size=rows, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if image_token_index is None:
        raise ValueError(f"preset {name!r} needs a tokenizer (its vocabulary is trained from the world's language)")
    cls = InstructBlipConfig if p.kind == "instructblip" else Blip2Config
    return cls(vision_config=vision, qformer_config=dict(p.qformer), text_config=text,
               num_query_tokens=p.num_query_tokens, image_token_index=image_token_index)


def _image_processor(image_size: int) -> BlipImageProcessorPil:
    # BLIP's eval transform (`blip_image_eval`): bicubic resize, CLIP mean/std. The PIL implementation needs no
    # torchvision (whose PyPI build does not import beside the CPU torch wheel).
    return BlipImageProcessorPil(size={"height": image_size, "width": image_size})


def init_random_weights(model: BackboneModel) -> None:
    """Random init that trains: HF zero-initialises `query_tokens`, which makes the Q-Former's first LayerNorm see
    zero-variance input (gradient norms of ~1e18). LAVIS uses N(0, 0.02). The projection gets variance-preserving
    init, so visual tokens enter the LLM at the scale of its hidden states instead of ~50x below them (a language
    model trained from scratch then learns to read them; measured on the tiny preset)."""
    torch.nn.init.normal_(model.query_tokens, std=0.02)
    proj = model.language_projection
    torch.nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)


def build_backbone(preset: str, *, tokenizer: Any | None = None, image_size: int | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   template: str | None = None, seed: int | None = None) -> Backbone:
    """A preset with random weights. `device="meta"` allocates nothing (parameter counts, planning)."""
    config = preset_config(preset, tokenizer=tokenizer, image_size=image_size)
    cls = InstructBlipForConditionalGeneration if isinstance(config, InstructBlipConfig) else Blip2ForConditionalGeneration
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = cls(config)
    if str(device) != "meta":
        init_random_weights(model)
    if dtype is not None:
        model.to(dtype)
        # The parts from_pretrained keeps in fp32: `_keep_in_fp32_modules` under fp16, the strict ones under both.
        keep = [*(model._keep_in_fp32_modules_strict or ())] if dtype in (torch.float16, torch.bfloat16) else []
        keep += [*(model._keep_in_fp32_modules or ())] if dtype == torch.float16 else []
        for name in keep:
            part = getattr(model, name)
            if isinstance(part, torch.nn.Parameter):
                part.data = part.data.float()
            else:
                part.float()
    model.eval()
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        image_processor=_image_processor(config.vision_config.image_size),
        template=TEMPLATES[template or PRESETS[preset].template],
        source=preset,
        init="random",
    )


def random_backbone(preset: str, *, tokenizer_dir: str | Path | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, template: str | None = None, seed: int = 0) -> Backbone:
    """A preset at its real shapes with random weights and a usable tokenizer: the one in `tokenizer_dir` when it
    holds one, else the embedded world's byte-level BPE (any text encodes; deterministic, so every rank builds the
    same). Every rank given the same seed builds the same weights."""
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    else:
        from cheetah.world import train_tokenizer

        tokenizer = train_tokenizer()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token
    return build_backbone(preset, tokenizer=tokenizer, device=device, dtype=dtype, template=template, seed=seed)


def _read_backbone_meta(path: Path) -> dict[str, Any]:
    meta_file = path / BACKBONE_META_FILE
    return json.loads(meta_file.read_text()) if meta_file.exists() else {}


PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Weight files that are Python pickles: a backbone folder is shared and downloaded, so it is read from safetensors
only (unpickling runs whatever code the file names, and even PyTorch's weights-only reader is a pickle parser)."""


def _check_weight_files(directory: Path) -> None:
    """A backbone folder must hold safetensors weights; pickled ones alone are refused by file, nothing unpickled."""
    if any(directory.glob("*.safetensors")):
        return  # the safetensors weights are what is read; a pickled copy beside them is never opened
    pickled = sorted(p.name for p in directory.iterdir() if p.is_file() and p.suffix in PICKLED_WEIGHTS)
    if pickled:
        raise DataError(f"{directory / pickled[0]}: pickled weights; a backbone is read from safetensors only (a "
                        "pickle can run code when it is loaded); save it as model.safetensors (save_pretrained "
                        "with safe_serialization=True) where the file is trusted")
    raise DataError(f"{directory}: no model.safetensors (expected a Hugging Face save_pretrained directory)")


def load_backbone(spec: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  random_init: bool = False, backbone_dir: str | Path | None = None,
                  template: str | None = None) -> Backbone:
    """Load a backbone from a local directory, or build a preset.

    `spec` is a preset name or a directory. A preset with `backbone_dir` (or a directory `spec`) loads weights from
    that directory; `random_init=True` (or `device="meta"`) builds the preset's shapes with random weights instead.
    """
    directory: Path | None = None
    if str(spec) in PRESETS:
        if random_init or str(device) == "meta":
            tokenizer = None
            if backbone_dir is not None and (Path(backbone_dir) / "tokenizer_config.json").exists():
                tokenizer = AutoTokenizer.from_pretrained(backbone_dir, local_files_only=True)
            if str(spec) == "tiny" and tokenizer is None:
                # Counting the tiny preset needs a vocabulary size; the default world tokenizer's is used.
                return build_backbone("tiny", image_size=None, device=device, dtype=dtype, template=template,
                                      tokenizer=_placeholder_tokenizer_for_counting())
            return build_backbone(str(spec), tokenizer=tokenizer, device=device, dtype=dtype, template=template)
        if backbone_dir is None:
            raise DataError(
                f"preset {spec!r} has no weights here: pass a local backbone directory (model.backbone_dir), "
                f"or use random weights (--random / --meta)"
            )
        directory = Path(backbone_dir)
    else:
        directory = Path(spec)
    if not directory.is_dir():
        raise DataError(f"{directory}: backbone directory not found")
    if not (directory / "config.json").exists():
        raise DataError(f"{directory}: no config.json (expected a Hugging Face save_pretrained directory)")
    config_dict = json.loads((directory / "config.json").read_text())
    model_type = config_dict.get("model_type")
    cls: type[PreTrainedModel]
    if model_type == "blip-2":
        cls = Blip2ForConditionalGeneration
    elif model_type == "instructblip":
        cls = InstructBlipForConditionalGeneration
    else:
        raise DataError(f"{directory}/config.json: model_type {model_type!r} is not a BLIP-2 or InstructBLIP model")
    if not config_dict.get("use_decoder_only_language_model", True):
        raise DataError(f"{directory}: VPG-C needs a decoder-only language model (this one is encoder-decoder)")
    if str(device) == "meta":
        config = cls.config_class.from_pretrained(directory, local_files_only=True)
        with torch.device("meta"):
            model = cls(config)
    else:
        # Read where they are used: a diverged, truncated or corrupted backbone is refused by file, never evaluated,
        # registered or served (it would answer with garbage, or nothing, and exit 0).
        _check_weight_files(directory)
        check_finite_weights(directory, "backbone weights")
        # use_safetensors: transformers would otherwise fall back to unpickling a pytorch_model.bin.
        model = cls.from_pretrained(directory, local_files_only=True, dtype=dtype or torch.float32,
                                    device_map=None, use_safetensors=True).to(device)
    model.eval()
    if model.config.image_token_index is None:
        raise DataError(f"{directory}/config.json: image_token_index is not set; VPG-C places image tokens by it")
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != model.config.image_token_index:
        raise DataError(
            f"{directory}: the tokenizer's {IMAGE_TOKEN!r} id ({tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}) differs "
            f"from config.image_token_index ({model.config.image_token_index})"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token  # LLaMA has no pad token; the official code pads with <unk>
    qformer_tokenizer = None
    if isinstance(model, InstructBlipForConditionalGeneration):
        qformer_tokenizer = _load_qformer_tokenizer(directory)
    meta = _read_backbone_meta(directory)
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        image_processor=_load_image_processor(directory, model.config.vision_config.image_size),
        template=TEMPLATES[template or meta.get("template") or _default_template(model)],
        source=str(directory),
        qformer_tokenizer=qformer_tokenizer,
        init=meta.get("init"),
    )


QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
BACKBONE_META_FILE = "cheetah_backbone.json"
"""What the project records beside a backbone's weights (template, preset, how it was made, its base metrics)."""
"""Where an InstructBLIP directory keeps the Q-Former's tokenizer (as `InstructBlipProcessor.save_pretrained`)."""


def _load_qformer_tokenizer(directory: Path) -> Any:
    folder = directory / QFORMER_TOKENIZER_DIR
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: an InstructBLIP backbone needs its Q-Former tokenizer there (the layout "
                                "InstructBlipProcessor.save_pretrained writes)")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{folder}: the Q-Former tokenizer has no pad token")
    return tokenizer


def _default_template(model: BackboneModel) -> str:
    # BLIP-2 OPT and InstructBLIP were trained on plain prompts; a LLaMA backbone without a recorded template is
    # taken to be an official Cheetah one (Vicuna v0).
    if model.config.text_config.model_type == "opt" or isinstance(model, InstructBlipForConditionalGeneration):
        return "plain"
    return "vicuna"


def _load_image_processor(directory: Path, image_size: int) -> BlipImageProcessorPil:
    if (directory / "preprocessor_config.json").exists():
        return BlipImageProcessorPil.from_pretrained(directory, local_files_only=True)
    return _image_processor(image_size)


BACKBONE_KIND = "backbone"  # the kind of output folder save_backbone writes (cheetah.io.atomic_dir)


def save_backbone(backbone: Backbone, directory: str | Path, extra_meta: dict[str, Any] | None = None, *,
                  protect: Iterable[str | Path] = ()) -> Path:
    """Write a backbone directory that `load_backbone` (and plain Hugging Face) reads: weights, tokenizer, image
    processor, and a small `cheetah_backbone.json` (template, preset). Written atomically; an existing folder is
    replaced only if it is an earlier backbone output (`cheetah.io.check_output`; `protect`: the caller's inputs)."""
    from cheetah.io import atomic_dir

    with atomic_dir(directory, kind=BACKBONE_KIND, protect=protect) as tmp:
        backbone.model.save_pretrained(tmp)
        if backbone.tokenizer is not None:
            backbone.tokenizer.save_pretrained(tmp)
        if backbone.image_processor is not None:
            backbone.image_processor.save_pretrained(tmp)
        if backbone.qformer_tokenizer is not None:
            backbone.qformer_tokenizer.save_pretrained(tmp / QFORMER_TOKENIZER_DIR)
        meta = {"template": backbone.template.name, "preset": backbone.source, "init": backbone.init,
                **(extra_meta or {})}
        (tmp / BACKBONE_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(directory)


def _placeholder_tokenizer_for_counting() -> Any:
    """A minimal tokenizer with the tiny preset's default vocabulary size, for `--meta`/`--random` summaries of
    `tiny` before the base stage has trained the real one. Never used to train or evaluate."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(len(specials), PRESETS["tiny"].text["vocab_size"]):
        vocab[f"t{i}"] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=[IMAGE_TOKEN])
