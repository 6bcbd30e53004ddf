"""Writing the source corpus (`cheetah world`) and drawing held-out scenes.

The source corpus is a folder in the format a user brings for real data (CC3M-style):

    <out>/images/<id>.png       one image per record
    <out>/captions.jsonl        {"id", "image", "caption"} per line; `image` is relative to <out>
    <out>/scenes.jsonl          {"id", "scene": <scene graph>} per line (the embedded world only)
    <out>/world.json            how it was generated (seed, n, image size)

The folder is built next to its final place and renamed in one step, so a failed run never replaces a good
corpus.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cheetah.config import WorldConfig
from cheetah.formats import SOURCE_CAPTIONS, SOURCE_SCENES, iter_jsonl
from cheetah.io import DataError, atomic_dir
from cheetah.world.language import CAPTION_TEMPLATES, caption
from cheetah.world.render import png_bytes, render
from cheetah.world.scene import Scene, generate_scene

CORPUS_KIND = "world corpus"  # the kind of output folder `cheetah world` writes (cheetah.io.atomic_dir)


def corpus_scene(cfg: WorldConfig, index: int) -> Scene:
    """Scene `index` of the training corpus described by `cfg` (its id is the zero-padded index)."""
    return generate_scene(cfg.seed, index, cfg.image_size, scene_id=f"{index:06d}")


def corpus_caption(cfg: WorldConfig, index: int, scene: Scene) -> str:
    """The caption of corpus scene `index`; its template is drawn from a stream of its own, (seed, index, 1)."""
    template = int(np.random.default_rng([cfg.seed, index, 1]).integers(len(CAPTION_TEMPLATES)))
    return caption(scene, template)


def heldout_scenes(cfg: WorldConfig, n: int, start: int = 0) -> Iterator[Scene]:
    """Scenes `start .. start+n-1` of the held-out stream (`cfg.heldout_seed`), for benchmarks and evaluation.

    They come from a seed stream the training corpus never uses (`WorldConfig` refuses `heldout_seed == seed`),
    and their ids start with `heldout-` so they cannot be confused with corpus ids.
    """
    for index in range(start, start + n):
        yield generate_scene(cfg.heldout_seed, index, cfg.image_size, scene_id=f"heldout-{index:06d}")


def write_corpus(cfg: WorldConfig) -> Path:
    """Write `cfg.n` scenes to `cfg.out` (images, captions.jsonl, scenes.jsonl, world.json); returns the folder."""
    out = Path(cfg.out)
    with atomic_dir(out, kind=CORPUS_KIND) as tmp:
        (tmp / "images").mkdir()
        captions, scenes = [], []
        for index in range(cfg.n):
            scene = corpus_scene(cfg, index)
            image_rel = f"images/{scene.id}.png"
            (tmp / image_rel).write_bytes(png_bytes(render(scene).image))
            captions.append({"id": scene.id, "image": image_rel, "caption": corpus_caption(cfg, index, scene)})
            scenes.append({"id": scene.id, "scene": scene.to_dict()})
        (tmp / SOURCE_CAPTIONS).write_text("".join(json.dumps(r) + "\n" for r in captions), encoding="utf-8")
        (tmp / SOURCE_SCENES).write_text("".join(json.dumps(r) + "\n" for r in scenes), encoding="utf-8")
        manifest = {"generator": "cheetah.world", "n": cfg.n, "seed": cfg.seed, "image_size": cfg.image_size}
        (tmp / "world.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out


def read_scenes(path: str | Path) -> dict[str, Scene]:
    """`scenes.jsonl` as {id: Scene}; a malformed line raises DataError naming the file, line and field."""
    path = Path(path)
    scenes: dict[str, Scene] = {}
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(rec.get("id"), str):
            raise DataError(f"{where}: field id must be a string")
        if rec["id"] in scenes:
            raise DataError(f"{where}: duplicate id {rec['id']!r}")
        scenes[rec["id"]] = Scene.from_dict(rec.get("scene"), where=f"{where} (id {rec['id']}) scene")
    return scenes
