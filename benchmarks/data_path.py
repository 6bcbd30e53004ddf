"""Host cost and memory of the training data path at the paper's data sizes, without a GPU.

Writes a data set of `--synthetic` two-image difference examples and `--captions` one-image caption examples (the
paper: 64k + 500k) with tiny images (hard links to one small PNG: every image is its own path) and a feature store of
synthetic features in the real on-disk format (sharded .npy; random values, `--feature-shape`, `--dtype`), then runs
what `cheetah train` runs for each step — `JointSampler`, `StepBatches` (read, tokenise and pad the step's examples,
gather their features from the store) through DataLoader workers — at the paper's batch (`--batch 24,64`).

Measured, in the process that runs the steps (the training process):
- `host_ms_per_step`: median time a step waits for its batches (what the training loop pays; workers build ahead);
- `build_ms_per_step`: median time to build one step in-process (`--workers 0`): the CPU cost per step;
- `sampler_us_per_step`: the sampler alone;
- `peak_rss_mb`: peak resident memory of that process (index, sampler, store lookups; the data set is generated in a
  child process first, so it does not count); `worker_peak_rss_mb`: the largest worker's.

    python benchmarks/data_path.py --synthetic 64000 --captions 500000
    python benchmarks/data_path.py --synthetic 6400 --captions 50000       # 10x smaller: peak_rss_mb within 20 %
Prints the figures as JSON on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

INSTRUCTIONS = ["Image 1: <image> Image 2: <image> Describe the difference between the images.",
                "Image 1: <image> Image 2: <image> What has changed in the second image?",
                "Image 1: <image> Image 2: <image> Tell me what is different in the second picture."]
CAPTION_PROMPTS = ["<image> Describe the image briefly.", "<image> What is in this picture?",
                   "<image> Write a short caption for this image."]


def generate(folder: Path, n_syn: int, n_cap: int, shape: tuple[int, int], dtype: str, seed: int) -> None:
    """The data set and its feature store (run in a child process: its memory is not the training process')."""
    import torch

    from cheetah.model.backbones import PRESETS  # noqa: F401 - (imports as training does)
    from cheetah.train.data import FEATURE_DTYPES, ExampleFile, _to_numpy, shard_path, store_directory
    from cheetah.world import caption, generate_scene, png_bytes, render

    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    png = png_bytes(render(generate_scene(seed, 0, image_size=16)).image)
    captions = [caption(generate_scene(seed, i, image_size=16)) for i in range(200)]
    linked = [0]

    def image(name: str) -> str:
        template = folder / f"template-{linked[0] // 60_000}.png"  # (a file system allows ~65k links per file)
        if not template.exists():
            template.write_bytes(png)
        os.link(template, images / name)
        linked[0] += 1
        return f"images/{name}"

    with open(folder / "synthetic.jsonl", "w") as f:
        for i in range(n_syn):
            rec = {"id": f"syn-{i}", "images": [image(f"s{i}a.png"), image(f"s{i}b.png")], "source_id": f"src-{i}",
                   "instruction": INSTRUCTIONS[i % 3],
                   "response": f"In the second image, {captions[rng.integers(200)]}."}
            f.write(json.dumps(rec) + "\n")
    with open(folder / "captions.jsonl", "w") as f:
        for i in range(n_cap):
            rec = {"id": f"cap-{i}", "images": [image(f"c{i}.png")], "source_id": f"cap-src-{i}",
                   "instruction": CAPTION_PROMPTS[i % 3], "response": captions[rng.integers(200)]}
            f.write(json.dumps(rec) + "\n")
    keys = np.unique(np.concatenate([ExampleFile(folder / name).image_keys
                                     for name in ("synthetic.jsonl", "captions.jsonl")]))
    torch_dtype = FEATURE_DTYPES[dtype]
    store = store_directory(folder / "features", "synthetic", torch_dtype, keys)
    store.mkdir(parents=True)
    shard_size = 1024
    for s in range(-(-len(keys) // shard_size)):
        rows = min(shard_size, len(keys) - s * shard_size)
        out = np.lib.format.open_memmap(shard_path(store, s), mode="w+",
                                        dtype=_to_numpy(torch.zeros(0, dtype=torch_dtype)).dtype, shape=(rows, *shape))
        out[:] = _to_numpy(torch.randn(rows, *shape).to(torch_dtype))
        out.flush()
        del out


def measure(folder: Path, batch: tuple[int, int], steps: int, warmup: int, workers: int, dtype: str,
            seed: int, step_s: float) -> dict:
    import torch

    from cheetah.model.prompts import IMAGE_TOKEN, TEMPLATES, PromptBuilder
    from cheetah.train.data import (FEATURE_DTYPES, Collator, ExampleFile, FeatureStore, JointSampler, StepBatches,
                                    batches)
    from cheetah.world import train_tokenizer

    torch.set_num_threads(1)
    tokenizer = train_tokenizer()
    builder = PromptBuilder(tokenizer, TEMPLATES["vicuna"], 32, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), 512)
    t0 = time.perf_counter()
    syn, cap = ExampleFile(folder / "synthetic.jsonl"), ExampleFile(folder / "captions.jsonl")
    index_s = time.perf_counter() - t0
    train_syn, _ = syn.split(0.05)
    train_cap, _ = cap.split(0.05)
    keys = np.unique(np.concatenate([syn.image_keys, cap.image_keys]))
    store_dir = next((folder / "features").iterdir())
    store = FeatureStore(keys, FEATURE_DTYPES[dtype], directory=store_dir, shard_size=1024)
    sampler = JointSampler(len(train_syn), len(train_cap), batch[0], batch[1], seed)

    t0 = time.perf_counter()
    for s in range(steps):
        sampler.step(s)
    sampler_us = (time.perf_counter() - t0) / steps * 1e6

    dataset = StepBatches(JointSampler(len(train_syn), len(train_cap), batch[0], batch[1], seed),
                          [(syn, train_syn), (cap, train_cap)], Collator(builder, store, None), steps)
    build = []
    for s in range(min(steps, 50)):  # in-process: the CPU cost of one step's batches
        t0 = time.perf_counter()
        dataset[s]
        build.append(time.perf_counter() - t0)
    waits = []
    it = batches(dataset, range(steps), workers)
    for s in range(steps):
        t0 = time.perf_counter()
        micro = next(it)
        waits.append(time.perf_counter() - t0)
        time.sleep(step_s)  # stands in for the GPU step (the paper's: 0.35 s on an H200)
    del it
    shapes = {k: list(v.shape) for k, v in micro[0][0].items() if isinstance(v, torch.Tensor)}
    return {
        "synthetic": len(syn), "captions": len(cap), "unique_images": int(len(keys)),
        "batch": list(batch), "steps": steps, "workers": workers, "simulated_step_ms": step_s * 1e3,
        "index_s": round(index_s, 2),
        "sampler_us_per_step": round(sampler_us, 1),
        "build_ms_per_step": round(float(np.median(build[warmup:])) * 1e3, 2),
        "host_ms_per_step": round(float(np.median(waits[warmup:])) * 1e3, 3),
        "host_ms_per_step_p95": round(float(np.percentile(waits[warmup:], 95)) * 1e3, 3),
        "first_synthetic_batch_shapes": shapes,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", type=int, default=64_000)
    ap.add_argument("--captions", type=int, default=500_000)
    ap.add_argument("--batch", default="24,64", help="synthetic,caption examples per step (default: the paper's)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--step-ms", type=float, default=350,
                    help="simulated GPU step (default %(default)s: the paper's step measured ~350 ms on an H200)")
    ap.add_argument("--feature-shape", default="17x64", help="tokens x width of the synthetic features (EVA: 257x1408)")
    ap.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--dir", default=None, help="where to write the data set (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = tuple(int(x) for x in args.feature_shape.split("x"))
    folder = Path(args.dir or tempfile.mkdtemp(prefix="cheetah-data-path-"))
    if args.generate_only:
        generate(folder, args.synthetic, args.captions, shape, args.dtype, args.seed)
        return
    try:
        if not (folder / "captions.jsonl").exists():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--generate-only", "--dir", str(folder), "--synthetic",
                            str(args.synthetic), "--captions", str(args.captions), "--feature-shape",
                            args.feature_shape, "--dtype", args.dtype, "--seed", str(args.seed)], check=True)
            print(f"generated {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
        result = measure(folder, tuple(int(x) for x in args.batch.split(",")), args.steps, args.warmup,
                         args.workers, args.dtype, args.seed, args.step_ms / 1e3)
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    result.update(feature_shape=list(shape), dtype=args.dtype, cpu_count=os.cpu_count())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
