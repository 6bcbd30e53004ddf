"""Synthesis throughput: samples per second per worker, and the scaling from 1 to N workers on this machine.

    python benchmarks/synthesize.py                      # world corpus + tiny random backbone, 1..cpu_count workers
    python benchmarks/synthesize.py --n 800 --workers 1 2 4 --backbone data/backbone

Each run is the whole `synthesize()` stage (read the corpus, select by Q-Former attention, edit, render,
filter, write atomically), timed end to end and repeated `--repeats` times (the best time is reported, as
the machine may be shared). The outputs of all worker counts are checked to be byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cheetah.config import SynthesizeConfig, WorldConfig  # noqa: E402
from cheetah.synthesize import synthesize  # noqa: E402
from cheetah.world import train_tokenizer, write_corpus  # noqa: E402


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="synthetic pairs per run")
    parser.add_argument("--captions", type=int, default=0, help="caption samples per run")
    parser.add_argument("--source-n", type=int, default=200, help="scenes in the source corpus")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts (default: 1..cpu_count)")
    parser.add_argument("--selector", choices=["attention", "random"], default="attention")
    parser.add_argument("--backbone", help="backbone directory (default: the tiny preset with random weights)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    workers = args.workers or list(range(1, (os.cpu_count() or 1) + 1))

    backbone = None
    if args.selector == "attention":
        if args.backbone:
            backbone = args.backbone
        else:
            from cheetah.model.backbones import build_backbone

            backbone = build_backbone("tiny", tokenizer=train_tokenizer(512), image_size=64, seed=0)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"Python {platform.python_version()}")
    print(f"pairs per run: {args.n}, source scenes: {args.source_n}, selector: {args.selector}, "
          f"backbone: {args.backbone or 'tiny preset (random weights)'}")
    with tempfile.TemporaryDirectory() as tmp:
        source = write_corpus(WorldConfig(out=f"{tmp}/source", n=args.source_n, seed=0))
        rows, digests, base = [], set(), None
        for w in workers:
            best = float("inf")
            for r in range(args.repeats):
                out = Path(tmp) / f"out-{w}-{r}"
                cfg = SynthesizeConfig(source=str(source), out=str(out), n=args.n, captions=args.captions,
                                       workers=w, selector=args.selector)
                start = time.perf_counter()
                stats = synthesize(cfg, backbone)
                best = min(best, time.perf_counter() - start)
                digests.add(_digest(out))
            rate = stats["pairs"] / best
            base = base or rate
            rows.append((w, best, rate, rate / w, rate / base))
    print(f"{'workers':>7} {'seconds':>8} {'samples/s':>10} {'samples/s/worker':>17} {'speedup':>8}")
    for w, seconds, rate, per_worker, speedup in rows:
        print(f"{w:>7} {seconds:>8.2f} {rate:>10.1f} {per_worker:>17.1f} {speedup:>7.2f}x")
    print(f"outputs identical across worker counts: {len(digests) == 1}")


if __name__ == "__main__":
    main()
