"""Synthesis throughput by executor and number of workers: the local executor and a local Dask cluster of N workers.

    python benchmarks/synthesize.py                               # world corpus + tiny random backbone; local, dask 1, 2
    python benchmarks/synthesize.py --n 800 --workers 1 2 4 --backbone data/backbone
    python benchmarks/synthesize.py --address tcp://host:8786 --workers 8      # a running cluster (8 = its size)

Each run is the whole `synthesize()` stage as `cheetah synthesize` runs it (check the corpus, plan the shards, start
the cluster, select by Q-Former attention, edit, render, filter, write the shards, merge atomically), timed end to
end, so a Dask row includes starting its cluster and loading the backends on every worker. "making" is the rate
while shards run: pairs over the time from the first shard's start to the last shard's end (what more pairs per
run would approach). Each run is repeated `--repeats` times and the best is reported (the machine may be shared).
The outputs of every row are checked to be byte-identical. Prints a table, then one line `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cheetah.config import SynthesizeConfig, WorldConfig  # noqa: E402
from cheetah.synthesize import pipeline, synthesize  # noqa: E402
from cheetah.world import train_tokenizer, write_corpus  # noqa: E402


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="synthetic pairs per run")
    parser.add_argument("--captions", type=int, default=0, help="caption samples per run")
    parser.add_argument("--source-n", type=int, default=200, help="scenes in the source corpus")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Dask worker counts")
    parser.add_argument("--no-local", action="store_true", help="skip the local-executor row")
    parser.add_argument("--address", help="a running Dask scheduler instead of local clusters")
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--selector", choices=["attention", "random"], default="attention")
    parser.add_argument("--backbone", help="backbone directory (default: the tiny preset with random weights)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    backbone = None
    if args.selector == "attention":
        if args.backbone:
            backbone = args.backbone
        else:
            from cheetah.model.backbones import build_backbone

            backbone = build_backbone("tiny", tokenizer=train_tokenizer(512), image_size=64, seed=0)

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
    print(f"machine: {machine}, Python {platform.python_version()}")
    print(f"pairs per run: {args.n}, shard size: {args.shard_size}, source scenes: {args.source_n}, "
          f"selector: {args.selector}, backbone: {args.backbone or 'tiny preset (random weights)'}")
    runs = ([] if args.no_local else [("local", 1)]) + [("dask", w) for w in args.workers]
    rows, digests = [], set()
    shards: list[dict] = []
    log_shard = pipeline.log_shard
    pipeline.log_shard = lambda shard, info: shards.append(info) or log_shard(shard, info)  # the shards' timings
    with tempfile.TemporaryDirectory() as tmp:
        source = write_corpus(WorldConfig(out=f"{tmp}/source", n=args.source_n, seed=0))
        for executor, workers in runs:
            best = best_making = float("inf")
            for r in range(args.repeats):
                shards.clear()
                out = Path(tmp) / f"out-{executor}-{workers}-{r}"
                cfg = SynthesizeConfig(source=str(source), out=str(out), n=args.n, captions=args.captions,
                                       executor=executor, workers=workers, selector=args.selector,
                                       shard_size=args.shard_size,
                                       address=args.address if executor == "dask" else None)
                start = time.perf_counter()
                stats = synthesize(cfg, backbone)
                best = min(best, time.perf_counter() - start)
                making = max(s["started"] + s["seconds"] for s in shards) - min(s["started"] for s in shards)
                best_making = min(best_making, making)
                digests.add(_digest(out))
            rows.append({"executor": executor, "workers": workers, "seconds": round(best, 2),
                         "pairs_per_s": round(stats["pairs"] / best, 1),
                         "making_pairs_per_s": round(stats["pairs"] / best_making, 1)})
    base = rows[0]["making_pairs_per_s"]
    print(f"{'executor':>8} {'workers':>7} {'seconds':>8} {'pairs/s':>8} {'making pairs/s':>15} {'vs first':>9}")
    for row in rows:
        print(f"{row['executor']:>8} {row['workers']:>7} {row['seconds']:>8.2f} {row['pairs_per_s']:>8.1f} "
              f"{row['making_pairs_per_s']:>15.1f} {row['making_pairs_per_s'] / base:>8.2f}x")
    identical = len(digests) == 1
    print(f"outputs identical across executors and worker counts: {identical}")
    result = {"machine": machine, "n": args.n, "shard_size": args.shard_size, "selector": args.selector,
              "rows": rows, "identical": identical}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
