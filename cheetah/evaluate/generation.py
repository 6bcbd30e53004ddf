"""Batched, deterministic generation for evaluation (and the serving path's `answer_one`).

One code path for every model: a base backbone is wrapped in a fresh `VPGCModel`, whose zero-initialised VPG-C is
exactly the backbone (its projections are zero, so the residual it adds is exactly 0; `tests/test_model.py` pins
the logits equality), and a trained VPG-C is loaded with its weights. VPG-C fires once, at prefill; the KV cache of
the layers above carries the correction to every decoding step.

Decoding
    Greedy by default. Sampling (temperature, then top-k, then top-p, in Hugging Face's order) only with an explicit
    seed (a `ValueError` otherwise); `evaluate.decoding: official-demon` is the official DEMON script's sampling
    (cheetah/config.py DECODING_SETTINGS). Sampled tokens are drawn by a logits processor with one random generator
    per request, seeded from (seed, the request's key), so a sampled answer depends on the seed and the request, not
    on the batch it lands in or on the order of the run (a resumed evaluation draws the same answers). Generation
    stops at the tokenizer's EOS or the template's end string (`###` for Vicuna, `</s>` for LLaMA-2, a newline for
    plain prompts; `stop_strings` replaces it) and the text is always cut at the first end string, then stripped.
    InstructBLIP backbones also give the Q-Former each request's instruction (`PromptBuilder`).

Batching
    Requests are tokenised first, sorted by prompt length (image blocks included) and cut into batches of
    neighbours (length bucketing: little padding, so little wasted compute), longest batch first (an out-of-memory
    error shows up at once). Prompts are left-padded; the attention mask and the position ids (counted over real
    tokens only) make padding invisible to the model. Answers come back in the order of the requests.

Batch-size independence
    In fp32 on a CPU, batch size 1 and batch size N give token-for-token identical answers: the padded keys get
    exactly zero attention weight, positions ignore the padding, and every other computation is row-wise
    (`tests/test_generation.py` checks it on the embedded DEMON- and MME-format benchmarks with a non-degenerate
    tiny model). On a GPU in bf16 (or fp16) this does not hold exactly: cuBLAS and the attention kernels pick their
    tiling and reduction order by the shape of the batch (and padding changes the sequence length), so the logits
    of one sample move in the last bits with the batch around it, and where the top two tokens are nearly tied the
    argmax - and everything after it - flips. How often depends on the weights: on random 7B weights, where every
    argmax is a near-tie, `shared/research/gpu-anchors.md` measured only 1 of 32 answers identical between batch 1
    and a padded batch of 32; trained models have far fewer near-ties, but a few answers still change. What we do:
    (1) length bucketing keeps padding (and so the shape difference) small and makes a sample's batch depend only
    on the data, not on the order of the run; (2) the reference numbers are the fp32 ones (the embedded pipeline
    runs in fp32), with batch-size independence tested; (3) the evaluation records dtype and decoding settings in
    its prediction files and refuses to resume with others, and the batch size is reported with the scores;
    (4) `benchmarks/generate.py` counts, on any device and dtype, how many batched answers equal the per-sample
    ones token for token, so the effect is measured rather than assumed. For a GPU number that must not move with
    the batch size, evaluate in fp32 (or with batch size 1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from cheetah.io import DataError
from cheetah.model.prompts import IMAGE_TOKEN, PromptBuilder
from cheetah.model.vpgc import VPGCModel

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`auto` (or None): CUDA when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def is_vpgc_dir(spec: str | Path) -> bool:
    from cheetah.model.weights import CARD_FILE

    return Path(spec).is_dir() and (Path(spec) / CARD_FILE).is_file()


def load_model(spec: str | Path, backbone_dir: str | Path | None = None, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None, template: str | None = None) -> VPGCModel:
    """A model to generate with, from a VPG-C weights directory (holding `vpgc.json`) or a backbone (a local
    directory, or a preset whose weights are in `backbone_dir`).

    A backbone is wrapped in a fresh `VPGCModel`: its zero-initialised VPG-C adds exactly nothing, so the base model
    and a trained VPG-C model go through the same prompts, batching and decoding code (one code path, no
    base-model special case to drift apart)."""
    from cheetah.model.backbones import PRESETS, load_backbone
    from cheetah.model.prompts import TEMPLATES
    from cheetah.model.weights import read_card

    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    if str(spec) not in PRESETS and not Path(spec).is_dir():
        raise DataError(f"{spec}: no such model: expected a VPG-C weights directory (with vpgc.json), a backbone "
                        f"directory or a preset name ({', '.join(sorted(PRESETS))})")
    if str(spec) in PRESETS and backbone_dir is None:
        raise DataError(f"preset {spec!r} has no weights here: give its backbone directory (model.backbone_dir)")
    if is_vpgc_dir(spec):
        model = VPGCModel.from_pretrained(spec, device=device, dtype=dtype)
        # The card records the template the weights were trained with; the backbone directory's own default may
        # differ (e.g. trained with `model.template` overridden).
        card_template = template or read_card(spec).get("template")
        if card_template in TEMPLATES and model.backbone_info.template.name != card_template:
            model.backbone_info.template = TEMPLATES[card_template]
    else:
        backbone = load_backbone(spec, backbone_dir=backbone_dir, device=device, dtype=dtype, template=template)
        model = VPGCModel(backbone).to(device)
    model.eval()
    return model


@dataclasses.dataclass
class Request:
    """One instruction with one `<image>` placeholder per image, in order."""

    instruction: str
    images: list[Path | Image.Image] = dataclasses.field(default_factory=list)
    key: str | None = None
    """Stable identity for sampling seeds (e.g. `<task>/<sample_id>`); by default the instruction and images."""


def _request_key(request: Request) -> str:
    if request.key is not None:
        return request.key
    h = hashlib.sha256(request.instruction.encode("utf-8"))
    for image in request.images:
        if isinstance(image, Image.Image):
            h.update(f"\0{image.mode}{image.size}".encode())
            h.update(image.tobytes())
        else:
            h.update(f"\0{image}".encode("utf-8"))
    return h.hexdigest()


def load_image(source: Path | str | Image.Image) -> Image.Image:
    """An RGB PIL image; a missing or undecodable file is a `DataError` naming it."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # forces the full decode, so truncated files fail here
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


class _SeededSampler:
    """Temperature, top-k and top-p sampling (in Hugging Face's order) with one `torch.Generator` per row, as a
    logits processor for greedy search.

    It returns scores that are -inf everywhere but the drawn token, so HF's argmax picks the draw. Each row's
    generator is seeded from its request, so a row's draws do not depend on the other rows of the batch."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, top_k: int = 0):
        self.seeds, self.temperature, self.top_p, self.top_k = list(seeds), temperature, top_p, top_k
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        logits = scores.float() / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= self.top_p  # keep the smallest prefix reaching top_p
            sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
            logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
        probs = logits.softmax(-1)
        picks = torch.cat([torch.multinomial(probs[row], 1, generator=g) for row, g in enumerate(self.generators)])
        out = torch.full_like(scores, -math.inf)
        return out.scatter(-1, picks[:, None], 0.0)


def _seed_for(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode("utf-8")).digest()[:8], "little") & (2**63 - 1)


class Generator:
    """Answers requests with a `VPGCModel`: batched with length bucketing, greedy unless told to sample."""

    def __init__(self, model: VPGCModel, batch_size: int = 16, max_new_tokens: int = 32, do_sample: bool = False,
                 seed: int | None = None, temperature: float = 1.0, top_p: float = 0.9, top_k: int = 0,
                 stop_strings: Sequence[str] | None = None, max_prompt_length: int | None = None,
                 **generate_kwargs: Any):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if do_sample and seed is None:
            raise ValueError("sampling (do_sample=True) needs an explicit seed: unseeded sampling is not reproducible")
        if do_sample and not (temperature > 0 and 0 < top_p <= 1 and top_k >= 0):
            raise ValueError(f"sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0, got {temperature}, "
                             f"{top_p}, {top_k}")
        info = model.backbone_info
        if info.tokenizer is None or info.image_processor is None:
            raise ValueError(f"backbone {info.source!r} has no tokenizer or image processor: it cannot generate")
        self.model = model
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.do_sample = bool(do_sample)
        self.seed = seed
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.generate_kwargs = generate_kwargs
        self.tokenizer = info.tokenizer
        self.template = info.template
        # The length guard is the caller's choice: RoPE models run past max_position_embeddings (with a warning).
        # For InstructBLIP the builder also gives the Q-Former its instruction (the backbone's Q-Former tokenizer).
        self.builder = PromptBuilder.for_backbone(info, max_length=max_prompt_length or 1 << 30)
        self._max_positions = getattr(model.backbone.config.text_config, "max_position_embeddings", None)
        self._warned_long = False
        self.end = self.template.end
        self.stop_override = list(stop_strings) if stop_strings is not None else None
        ends = self.stop_override if self.stop_override is not None else ([self.end] if self.end else [])
        self.ends = [e for e in ends if e]
        """Answers are cut at the first of these; generation stops at them (the template's end by default)."""
        eos = self.tokenizer.eos_token_id
        self.eos_ids: list[int] = [] if eos is None else [int(eos)]
        for end in self.ends:
            end_ids = self.tokenizer(end, add_special_tokens=False)["input_ids"]
            if len(end_ids) == 1 and end_ids[0] not in self.eos_ids and end_ids[0] != self.tokenizer.unk_token_id:
                self.eos_ids.append(int(end_ids[0]))
        # An end string can also come out merged with other characters (BPE), so unless it *is* the EOS token,
        # generation also watches the decoded text for it; the answer is cut at it in any case.
        self.stop_strings = [e for e in self.ends if e != self.tokenizer.eos_token]
        if self.stop_strings:
            from transformers import StopStringCriteria

            try:  # builds (and caches, per vocabulary) the tables generate() will use
                StopStringCriteria(self.tokenizer, self.stop_strings)
            except Exception as e:  # e.g. a tokenizer without a decoder: stop at EOS, cut the text afterwards
                log.warning("generation cannot watch for the end strings %r with this tokenizer (%s); it stops at "
                            "EOS or max_new_tokens and the answer is cut at the end string", self.stop_strings, e)
                self.stop_strings = []

    # -- what was used ---------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_model.get_input_embeddings().weight.dtype

    def settings(self) -> dict[str, Any]:
        """Everything that decides the answers (not the batch size, which must not): for prediction metadata."""
        out: dict[str, Any] = {"decoding": "sample" if self.do_sample else "greedy",
                               "max_new_tokens": self.max_new_tokens, "template": self.template.name,
                               "end": self.end, "dtype": str(self.dtype).replace("torch.", "")}
        if self.do_sample:
            out.update(seed=self.seed, temperature=self.temperature, top_p=self.top_p)
            if self.top_k:
                out["top_k"] = self.top_k
        if self.stop_override is not None:
            out["stop"] = self.stop_override
        return out

    # -- planning --------------------------------------------------------------------------------------------------

    def _encode(self, requests: Sequence[Request]) -> list[Any]:
        encoded = []
        for i, r in enumerate(requests):
            n = len(r.images)
            if r.instruction.count(IMAGE_TOKEN) != n:
                raise DataError(f"request {i}: {r.instruction.count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholder(s) but "
                                f"{n} image(s): {r.instruction[:120]!r}")
            for image in r.images:
                if not isinstance(image, Image.Image) and not Path(image).is_file():
                    raise DataError(f"{image}: image not found (request {i})")
            encoded.append(self.builder.encode(r.instruction, n))
        return encoded

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """Length-bucketed batches of request indices: sorted by length (ties by index), longest batch first."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        return [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]

    # -- generation ------------------------------------------------------------------------------------------------

    def iter_token_ids(self, requests: Sequence[Request]) -> Iterator[tuple[int, list[int]]]:
        """`(index into requests, new token ids)` pairs, batch by batch. The ids run to the first EOS / end token
        (included) or to `max_new_tokens`; a row stopped by the end *string* keeps the batch's padding after it."""
        requests = list(requests)
        encoded = self._encode(requests)
        for batch in self.plan([len(e.input_ids) for e in encoded]):
            rows = self._generate([requests[i] for i in batch], [encoded[i] for i in batch])
            for i, row in zip(batch, rows):
                for k, t in enumerate(row):
                    if t in self.eos_ids:
                        row = row[:k + 1]
                        break
                yield i, row

    def generate_ids(self, requests: Sequence[Request]) -> list[list[int]]:
        """New token ids of every request, in request order (for token-level comparisons)."""
        out: list[list[int]] = [[] for _ in requests]
        for i, row in self.iter_token_ids(requests):
            out[i] = row
        return out

    def iter_answers(self, requests: Sequence[Request]) -> Iterator[tuple[int, str]]:
        """`(index into requests, answer)` pairs, batch by batch as they are generated (for incremental saving)."""
        for i, row in self.iter_token_ids(requests):
            yield i, self.decode(row)

    def answer(self, requests: Sequence[Request]) -> list[str]:
        """Answers in the order of `requests`."""
        out: list[str | None] = [None] * len(requests)
        for i, text in self.iter_answers(requests):
            out[i] = text
        return [t if t is not None else "" for t in out]

    def _pixels(self, requests: Sequence[Request]) -> torch.Tensor | None:
        images = [load_image(im) for r in requests for im in r.images]
        if not images:
            return None
        pixels = self.model.backbone_info.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return pixels.to(self.device)

    @torch.inference_mode()
    def _generate(self, requests: Sequence[Request], encoded: Sequence[Any]) -> list[list[int]]:
        batch = self.builder.collate(list(encoded), "left")
        width = batch["input_ids"].shape[1]
        if self._max_positions and width + self.max_new_tokens > self._max_positions and not self._warned_long:
            log.warning("prompts of up to %d tokens + %d new tokens exceed the LLM's max_position_embeddings=%d",
                        width, self.max_new_tokens, self._max_positions)
            self._warned_long = True
        pixels = self._pixels(requests)
        if pixels is None:
            raise DataError("a batch without any image: every request needs at least one <image>")
        kwargs: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids or None,
                                      # neutralise sampling defaults a generation_config.json may carry
                                      temperature=None, top_p=None, top_k=None)
        if self.stop_strings:
            kwargs.update(stop_strings=self.stop_strings, tokenizer=self.tokenizer)
        if self.do_sample:
            from transformers import LogitsProcessorList

            seeds = [_seed_for(self.seed, _request_key(r)) for r in requests]
            kwargs["logits_processor"] = LogitsProcessorList([_SeededSampler(seeds, self.temperature, self.top_p,
                                                                             self.top_k)])
        kwargs.update(self.generate_kwargs)
        device = self.device
        qformer = {k: batch[k].to(device) for k in ("qformer_input_ids", "qformer_attention_mask") if k in batch}
        out = self.model.generate(input_ids=batch["input_ids"].to(device),
                                  attention_mask=batch["attention_mask"].to(device),
                                  guide_positions=batch["guide_positions"].to(device),
                                  image_counts=batch["image_counts"].to(device),
                                  pixel_values=pixels, **qformer, **kwargs)
        return out.tolist()

    def decode(self, ids: Sequence[int]) -> str:
        """New token ids -> answer: up to the first EOS / end token, special tokens dropped, cut at the first end
        string, stripped."""
        ids = list(ids)
        for k, t in enumerate(ids):
            if t in self.eos_ids:
                ids = ids[:k]
                break
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((text.index(e) for e in self.ends if e in text), default=len(text))
        return text[:cut].strip()


def answer_one(model: VPGCModel, instruction: str, images: Sequence[Path | str | Image.Image],
               **kwargs: Any) -> str:
    """One answer (greedy unless `do_sample=True, seed=...`); keyword arguments go to `Generator`."""
    kwargs.setdefault("batch_size", 1)
    return Generator(model, **kwargs).answer([Request(instruction, [i if isinstance(i, Image.Image) else Path(i)
                                                                    for i in images])])[0]
