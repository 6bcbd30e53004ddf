"""How fast the base stage's vision phase learns to see, on held-out scenes (links 1 and 2 of docs/miniature.md).

The vision phase of `cheetah base` (cheetah/train/vision.py) trains the `tiny` ViT and Q-Former with `TagProbe`: the
ViT's cells must hold every object's shape, colour and texture, the Q-Former's first queries the large objects' (what
captions say). This runs that phase alone (`train_vision`, as the stage does) on `scenes` world scenes rendered in
memory, and every 500 steps prints the base stage's representation probes (`representation_probes`, fitted on 2,000
scenes, scored on 256 held-out ones): `vit_large` / `vit_small` (the ViT tokens) and `qformer_large` /
`qformer_small` (the visual prompt). Warm-up and cosine decay as in the base stage; one thread.

    python benchmarks/vision_probe.py --steps 1500                    # the preset: one 21-pixel patch per cell
    python benchmarks/vision_probe.py --steps 1500 --patch-size 8     # the preset before: 8 x 8 patches
Prints the figures as JSON on its last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from cheetah.config import BaseConfig, WorldConfig
from cheetah.model.backbones import PRESETS, build_backbone
from cheetah.evaluate.backbone import representation_probes
from cheetah.evaluate.probes import PROBE_STREAM
from cheetah.train.vision import TagProbe, train_vision
from cheetah.world import generate_scene, heldout_scenes, render, train_tokenizer

BASE = BaseConfig()  # the base stage's defaults


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=1200, help="training scenes (world seed 0)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64, help="images per step (the base stage: 2 x base.batch_size)")
    ap.add_argument("--lr", type=float, default=BASE.lr)
    ap.add_argument("--warmup", type=int, default=BASE.warmup_steps)
    ap.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    ap.add_argument("--patch-size", type=int, default=None,
                    help="a fixed ViT patch size instead of the preset's one patch per grid cell")
    args = ap.parse_args()
    if args.patch_size:
        tiny = PRESETS["tiny"]
        PRESETS["tiny"] = dataclasses.replace(tiny, vision={**tiny.vision, "patch_size": args.patch_size},
                                              patches_per_side=None)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    backbone = build_backbone("tiny", tokenizer=train_tokenizer(512), image_size=64, seed=0)
    model = backbone.model
    scenes = [generate_scene(0, i, 64) for i in range(args.scenes)]
    pixels = backbone.image_processor([render(s).image for s in scenes], return_tensors="pt")["pixel_values"]
    tags = [TagProbe.targets(s) for s in scenes]
    held = list(heldout_scenes(WorldConfig(), 256))
    fit = [generate_scene(PROBE_STREAM, i, 64) for i in range(2000)]
    vcfg = model.config.vision_config
    probe = TagProbe(vcfg.hidden_size, model.config.qformer_config.hidden_size, backbone.num_query_tokens,
                     vcfg.image_size, vcfg.patch_size)
    curve, started = {}, time.perf_counter()

    def measure(step: int, loss: float) -> None:
        if step % 500 == 0 or step == args.steps:
            model.vision_model.eval(), model.qformer.eval()
            curve[step] = {k: v["mean"] for k, v in representation_probes(model, backbone.image_processor, fit,
                                                                          held).items()}
            print(f"step {step}: loss {loss:.2f}, held-out probes {curve[step]}", flush=True)

    train_vision(model, probe, pixels, tags, np.random.default_rng(0), steps=args.steps, batch_size=args.batch,
                 lr=args.lr, weight_decay=BASE.weight_decay, warmup_steps=args.warmup, schedule=args.schedule,
                 callback=measure)
    print(json.dumps({"scenes": args.scenes, "patch_size": model.config.vision_config.patch_size, "steps": args.steps,
                      "batch": args.batch, "lr": args.lr,
                      "probes_by_step": curve, "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
