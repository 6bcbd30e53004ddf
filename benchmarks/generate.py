"""Samples/s of batched, length-bucketed generation against a per-sample loop, through the evaluation path.

Everything goes through `cheetah.evaluate.generation.Generator` and `VPGCModel.generate` (images -> ViT ->
Q-Former, VPG-C at prefill, left-padded greedy decoding), with random weights for any preset. The defaults mirror
`shared/reference/generate_anchor.py` for the 7B shapes: 32 prompts of 256 - (i % 7) * 8 tokens (image blocks
included), 24 new tokens each (`min_new_tokens` = `max_new_tokens`, so every sample does the same work), greedy.
The measured H200 baseline there (plain Hugging Face LLaMA-7B, bf16, SDPA, no images): 2.2 samples/s one at a
time, 24.9 in one left-padded batch of 32; memory-bandwidth floor about 145; target 70 or more.

The prompts are words of a synthetic one-token-per-word vocabulary (the 7B presets come without a tokenizer), so
their lengths are exact; images are random noise, preprocessed by the backbone's image processor. Besides the speed
it counts how many batched outputs equal the per-sample outputs token for token.

    python benchmarks/generate.py --preset tiny --device cpu                      # CPU smoke run (small shapes)
    python benchmarks/generate.py --preset vicuna-7b --device cuda --dtype bfloat16   # the anchor's shapes
    python benchmarks/generate.py --preset tiny --device cpu --ranks 1 2          # data-parallel, by number of ranks

With `--ranks`, each count k runs under `torchrun --nproc_per_node k` the way `cheetah evaluate` does: every rank
builds the model on its own device, takes every k-th request (the evaluation's deterministic shard), waits at a
barrier, then generates its shard in length-bucketed batches; the time of a row is the slowest rank's, and the
outputs are compared token for token with the 1-rank row. (On a CPU each rank gets `--threads` threads, default 1.)

Prints one line `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cheetah.evaluate.generation import Generator, Request, resolve_dtype  # noqa: E402
from cheetah.model.backbones import PRESETS, build_backbone  # noqa: E402
from cheetah.model.prompts import IMAGE_TOKEN  # noqa: E402
from cheetah.model.vpgc import VPGCModel  # noqa: E402


def word_tokenizer(vocab_size: int, image_token_id: int | None, specials: dict[str, int]):
    """A word-level tokenizer: `w<i>` is token i, so a prompt of k words is k tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    image_id = image_token_id if image_token_id is not None else vocab_size - 1
    vocab = {**specials, IMAGE_TOKEN: image_id}
    taken = set(vocab.values())
    free = [i for i in range(vocab_size) if i not in taken]
    # "abcdef" is the probe Hugging Face's stop-string criterion tokenises to learn how tokens join; with it in the
    # vocabulary the criterion works here as it does with real tokenizers (so its cost is measured too)
    for word in ("abcdef", "#", "###"):  # ... and tokens that spell the Vicuna end string
        vocab[word] = free.pop()
    for i in free:
        vocab[f"w{i}"] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    inv = {v: k for k, v in specials.items()}
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token=inv.get(1, "<s>"),
                                   eos_token="</s>", pad_token=inv.get(specials.get("<pad>", 0), "<unk>"),
                                   additional_special_tokens=[IMAGE_TOKEN])


def build_model(preset: str, device: str, dtype: torch.dtype, seed: int) -> VPGCModel:
    p = PRESETS[preset]
    vocab = p.text["vocab_size"]
    if preset == "tiny":
        specials = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
        tokenizer = word_tokenizer(vocab, None, specials)
    else:  # LLaMA (unk 0, bos 1, eos 2, pad = unk) / OPT (pad 1, bos = eos 2) ids as the presets have them
        if p.text["model_type"] == "opt":
            specials = {"<unk>": 3, "<pad>": 1, "</s>": 2}
        else:
            specials = {"<unk>": 0, "<s>": 1, "</s>": 2}
        tokenizer = word_tokenizer(vocab, p.image_token_index, specials)
    # Built directly in the target dtype on the device: no fp32 copy of 7B weights anywhere.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        backbone = build_backbone(preset, tokenizer=tokenizer, device=device, seed=seed)
        model = VPGCModel(backbone)
    finally:
        torch.set_default_dtype(previous)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    with torch.no_grad():  # a non-zero VPG-C, so the correction really runs (zero projections add nothing)
        for param in model.vpgc.parameters():
            param.copy_((torch.randn(param.shape, generator=g) * 0.02).to(param))
    return model.eval()


def make_requests(model: VPGCModel, n: int, prompt_len: int, images: int, seed: int) -> list[Request]:
    """n requests whose encoded prompts are prompt_len - (i % 7) * 8 tokens long (the anchor's spread)."""
    from PIL import Image

    from cheetah.model.prompts import PromptBuilder

    builder = PromptBuilder.for_backbone(model.backbone_info, max_length=1 << 30)
    rng = np.random.default_rng(seed)
    size = model.backbone.config.vision_config.image_size
    # Sorted: get_vocab()'s order differs from process to process, and so would the prompts of different ranks.
    vocab = sorted(w for w in model.backbone_info.tokenizer.get_vocab() if w.startswith("w"))
    slots = " ".join([IMAGE_TOKEN] * images)
    base = len(builder.encode_prompt(slots, images))
    out = []
    for i in range(n):
        target = prompt_len - (i % 7) * 8
        k = target - base
        if k < 1:
            raise SystemExit(f"--prompt-len {prompt_len} is too short for {images} image(s) ({base} tokens)")
        words = " ".join(vocab[j] for j in rng.integers(len(vocab), size=k))
        text = f"{slots} {words}"
        assert len(builder.encode_prompt(text, images)) == target
        pics = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(images)]
        out.append(Request(text, pics, key=str(i)))
    return out


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--n", type=int, default=32, help="number of prompts")
    ap.add_argument("--prompt-len", type=int, default=256, help="longest prompt in tokens (image blocks included)")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=1, help="images per prompt")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--cache", choices=["dynamic", "static"], default="dynamic",
                    help="KV cache; `static` makes Hugging Face compile the decoding step (CUDA graphs) on a GPU")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each; the median is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ranks", type=int, nargs="+", help="data-parallel mode: these numbers of ranks (torchrun)")
    ap.add_argument("--rank-output", help=argparse.SUPPRESS)  # (a rank of the data-parallel mode writes here)
    args = ap.parse_args(argv)
    if args.ranks:
        return ranks_main(args)
    if args.rank_output:
        return rank_worker(argparse.Namespace(**{**json.loads(Path(f"{args.rank_output}.args.json").read_text()),
                                                 "rank_output": args.rank_output}))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))

    t0 = time.perf_counter()
    model = build_model(args.preset, args.device, dtype, args.seed)
    build_s = time.perf_counter() - t0
    requests = make_requests(model, args.n, args.prompt_len, args.images, args.seed)
    kw: dict = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    if args.cache == "static":
        kw["cache_implementation"] = "static"
    loop = Generator(model, batch_size=1, **kw)
    batched = Generator(model, batch_size=args.batch_size, **kw)
    # Warm-up: kernels, allocator, the stop-string tables (cached per tokenizer).
    loop.generate_ids(requests[:1])
    batched.generate_ids(requests[: min(len(requests), args.batch_size)])

    loop_times, batched_times = [], []
    for _ in range(args.repeats):  # interleaved, so a slow spell of a shared machine hits both
        ids_loop, t = timed(lambda: loop.generate_ids(requests), args.device)
        loop_times.append(t)
        ids_batched, t = timed(lambda: batched.generate_ids(requests), args.device)
        batched_times.append(t)
    t_loop, t_batched = float(np.median(loop_times)), float(np.median(batched_times))
    same = sum(a == b for a, b in zip(ids_loop, ids_batched))
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    result = {
        "preset": args.preset, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
        or platform.machine(),
        "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
        "attn": model.language_model.config._attn_implementation,
        "n": args.n, "prompt": args.prompt_len, "new": args.new_tokens, "images_per_prompt": args.images,
        "bs": args.batch_size, "cache": args.cache,
        "loop_samples_per_s": round(args.n / t_loop, 3), "batched_samples_per_s": round(args.n / t_batched, 3),
        "speedup": round(t_loop / t_batched, 2), "repeats": args.repeats,
        "loop_s": [round(t, 3) for t in loop_times], "batched_s": [round(t, 3) for t in batched_times],
        "identical_to_bs1": f"{same}/{args.n}", "identical_count": same,
        "new_tokens_per_sample": sorted({len(r) for r in ids_batched}),
        "build_s": round(build_s, 2), "peak_gib": None if peak is None else round(peak, 2),
        "torch": torch.__version__,
    }
    print("RESULT " + json.dumps(result), flush=True)
    return result


def rank_worker(args: argparse.Namespace) -> dict:
    """One rank of the data-parallel mode: its shard of the requests, timed after a barrier."""
    from cheetah.evaluate.run import Ranks

    ranks = Ranks()
    torch.set_num_threads(args.threads or 1)
    device = str(ranks.device(args.device))
    dtype = resolve_dtype(args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    model = build_model(args.preset, device, dtype, args.seed)
    requests = make_requests(model, args.n, args.prompt_len, args.images, args.seed)
    mine = list(range(ranks.rank, len(requests), ranks.world))
    generator = Generator(model, batch_size=args.batch_size, max_new_tokens=args.new_tokens,
                          min_new_tokens=args.new_tokens)
    generator.generate_ids(requests[:1])  # warm-up
    ranks.barrier()
    ids, seconds = timed(lambda: generator.generate_ids([requests[i] for i in mine]), device)
    Path(f"{args.rank_output}.{ranks.rank}").write_text(json.dumps({"rank": ranks.rank, "seconds": seconds,
                                                                     "ids": dict(zip(mine, ids))}))
    ranks.close()
    return {}


def ranks_main(args: argparse.Namespace) -> dict:
    import subprocess
    import tempfile

    rows, reference = [], None
    for k in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rank"
            # The settings travel in a file: torchrun's own parser would take `--n` for an abbreviation of its options.
            Path(f"{out}.args.json").write_text(json.dumps({**vars(args), "ranks": None}))
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or 1)}
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(k),
                            __file__, "--rank-output", str(out)], check=True, env=env)
            parts = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(k)]
        ids = {int(i): row for p in parts for i, row in p["ids"].items()}
        reference = reference or ids
        slowest = max(p["seconds"] for p in parts)
        rows.append({"ranks": k, "seconds": round(slowest, 3), "samples_per_s": round(args.n / slowest, 2),
                     "per_rank_s": [round(p["seconds"], 3) for p in parts],
                     "identical_to_first_row": f"{sum(ids[i] == reference[i] for i in ids)}/{args.n}"})
        print(f"ranks {k}: {args.n / slowest:.2f} samples/s (slowest rank {slowest:.2f} s)", flush=True)
    result = {"mode": "ranks", "preset": args.preset, "device": args.device, "n": args.n, "prompt": args.prompt_len,
              "new": args.new_tokens, "bs": args.batch_size, "threads_per_rank": args.threads or 1,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
              "rows": rows, "torch": torch.__version__}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
