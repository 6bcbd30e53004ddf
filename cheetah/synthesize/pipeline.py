"""`cheetah synthesize`: synthetic discriminative training data from a source image-caption corpus.

For sample i (of `cfg.n`) the pipeline takes a source image, finds candidate regions (objects, or empty
background areas for `add`), asks the selector which one the backbone attends to least, proposes an edit of
type `edit_types[i % len]` on it, applies it, and filters the result. A rejected candidate goes to the
quarantine with its reason and the next-least-attended candidate is tried, up to `max_attempts`.

Output folder (written atomically: a failed run leaves any previous output untouched):

    images/src-<k>.<ext>   originals, copied byte for byte from the source (k = line in captions.jsonl - 1)
    images/syn-<i>.png     edited images
    synthetic.jsonl        {id, images: [original, edited], instruction, response, edit: {type, object,
                            before, after, region}, source_id}
    captions.jsonl         {id, images: [original], instruction, response}: the joint caption regulariser
    quarantine.jsonl       every rejected source record and edit candidate, with stage, reason and detail
    stats.json             counts by edit type and rejects by reason, and the settings that shaped the output
    contact_sheet/<type>.png  a few pairs of each edit type, to look at (cheetah/synthesize/contact_sheet.py)

Determinism: everything random about sample i comes from a Generator seeded by (seed, i), work is done with one
torch thread per process, and results are merged in index order, so any number of workers writes the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cheetah.config import ConfigError, SynthesizeConfig
from cheetah.io import DataError, atomic_dir, check_output, safe_join
from cheetah.synthesize.apply import Applier, InpaintApplier, WorldApplier
from cheetah.synthesize.common import Reject, SourceItem
from cheetah.synthesize.contact_sheet import write_contact_sheets
from cheetah.synthesize.edits import Editor, LabelEditor, WorldEditor
from cheetah.synthesize.filters import Clip, ClipFilter, EditFilter, PixelFilter
from cheetah.synthesize.masks import MaskSource, SamMasks, WorldMasks
from cheetah.synthesize.select import AttentionSelector, RandomSelector, TargetSelector
from cheetah.world.corpus import read_scenes
from cheetah.world.language import CAPTION_PROMPTS, DIFFERENCE_INSTRUCTIONS
from cheetah.world.render import png_bytes

# Seed-stream tags: each kind of randomness gets its own (seed, tag, ...) stream, so adding samples or changing
# one step never shifts the random choices of another.
_PAIR_STREAM, _CAPTION_STREAM, _PAIR_ORDER, _CAPTION_ORDER = 1, 2, 3, 4


# ---------------------------------------------------------------------------------------------------------------
# Source corpus
# ---------------------------------------------------------------------------------------------------------------


def load_source(root: str | Path, need_scenes: bool) -> tuple[list[SourceItem], list[dict[str, Any]], int]:
    """Usable records of a source corpus, the rejected ones (with reasons) and the number of records read.

    A bad record (malformed JSON, a missing or non-string field, a duplicate id, an image path outside the
    folder, a missing or unreadable image, no scene graph when one is needed) is rejected, not fatal: it is
    listed in the quarantine. A missing captions.jsonl, or scenes.jsonl when the world backends need it, is
    fatal (DataError).
    """
    root = Path(root)
    captions_path = root / "captions.jsonl"
    if not captions_path.exists():
        raise DataError(f"{captions_path}: file not found (a source corpus is a folder with captions.jsonl and images)")
    scenes = {}
    if need_scenes:
        if not (root / "scenes.jsonl").exists():
            raise DataError(f"{root / 'scenes.jsonl'}: file not found; masks: world needs the scene graphs written "
                            f"by `cheetah world` (for real images use masks: sam and apply: inpaint)")
        scenes = read_scenes(root / "scenes.jsonl")

    items: list[SourceItem] = []
    rejects: list[dict[str, Any]] = []
    seen: set[str] = set()
    n_records = 0

    def reject(lineno: int, rec_id: Any, code: str, detail: str) -> None:
        rejects.append({"stage": "source", "file": "captions.jsonl", "line": lineno,
                        "id": rec_id if isinstance(rec_id, str) else None, "reason": code, "detail": detail})

    for lineno, line in enumerate(captions_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        n_records += 1
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            reject(lineno, None, "malformed_record", f"malformed JSON: {e.msg}")
            continue
        if not isinstance(rec, dict):
            reject(lineno, None, "malformed_record", f"expected a JSON object, got {type(rec).__name__}")
            continue
        bad = [f for f in ("id", "image", "caption") if not isinstance(rec.get(f), str) or not rec[f].strip()]
        if bad:
            reject(lineno, rec.get("id"), "malformed_record", f"field {bad[0]} must be a non-empty string")
            continue
        if rec["id"] in seen:
            reject(lineno, rec["id"], "duplicate_id", f"id {rec['id']!r} appears earlier in the file")
            continue
        seen.add(rec["id"])
        try:
            path = safe_join(root, rec["image"], what="field image")
        except DataError as e:
            reject(lineno, rec["id"], "path_escapes_root", str(e))
            continue
        if not path.is_file():
            reject(lineno, rec["id"], "missing_image", f"field image: {rec['image']} does not exist")
            continue
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:  # PIL raises many types for corrupt files
            reject(lineno, rec["id"], "undecodable_image", f"field image: {rec['image']} cannot be read ({e})")
            continue
        scene = scenes.get(rec["id"])
        if need_scenes and scene is None:
            reject(lineno, rec["id"], "no_scene_graph", f"id {rec['id']!r} has no scene graph in scenes.jsonl")
            continue
        items.append(SourceItem(index=lineno - 1, id=rec["id"], image=rec["image"], path=path,
                                caption=rec["caption"], scene=scene))
    return items, rejects, n_records


def original_name(item: SourceItem) -> str:
    """Where the synthetic set keeps a copy of a source image (inside its own folder, so it is self-contained)."""
    return f"images/src-{item.index:06d}{item.path.suffix.lower() or '.png'}"


# ---------------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Backends:
    """One implementation per step; `build_backends` picks them from the config."""

    masks: MaskSource
    selector: TargetSelector
    editor: Editor
    applier: Applier
    filters: list[EditFilter]


def _backbone_parts(backbone: Any) -> tuple[Any, Any]:
    """(model, image_processor) from a Backbone object, or a backbone directory / preset name to load."""
    if backbone is None:
        raise ConfigError("synthesize.selector is 'attention', which needs the backbone whose Q-Former attention "
                          "picks the targets; pass a backbone directory (or use selector: random)")
    if isinstance(backbone, (str, Path)):
        from cheetah.model.backbones import load_backbone

        try:
            backbone = load_backbone(str(backbone))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"cannot load the backbone for attention-guided selection: {e}") from None
    return backbone.model, backbone.image_processor


def build_backends(cfg: SynthesizeConfig, backbone: Any = None) -> Backends:
    needs_clip = "clip" in cfg.filters or (cfg.masks == "sam" and bool(cfg.clip_dir))  # SAM masks get CLIP names
    clip = Clip(cfg.clip_dir, device=cfg.device) if needs_clip else None
    if cfg.masks == "world":
        masks: MaskSource = WorldMasks()
        editor: Editor = WorldEditor()
    else:
        masks = SamMasks(cfg.sam_dir, cfg.sam_points, cfg.sam_min_score, clip=clip, labels=cfg.labels,
                         device=cfg.device)
        editor = LabelEditor(cfg.labels)
    selector: TargetSelector = (RandomSelector() if cfg.selector == "random"
                                else AttentionSelector(*_backbone_parts(backbone)))
    applier: Applier = (WorldApplier() if cfg.apply == "world"
                        else InpaintApplier(cfg.inpaint_dir, cfg.inpaint_steps, cfg.inpaint_guidance, cfg.device))
    filters: list[EditFilter] = []
    for name in cfg.filters:
        if name == "pixel":
            filters.append(PixelFilter(cfg.min_changed_fraction))
        else:
            assert clip is not None  # built above whenever a clip filter is configured
            filters.append(ClipFilter(clip, cfg.clip_min_similarity))
    return Backends(masks, selector, editor, applier, filters)


# ---------------------------------------------------------------------------------------------------------------
# One sample
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PairResult:
    """Sample i's record and edited PNG (None if every candidate was rejected), and what was rejected on the way."""

    record: dict[str, Any] | None
    png: bytes | None
    source: SourceItem | None
    rejects: list[dict[str, Any]]


class Synthesizer:
    """Makes sample i from the config, the backends and the usable source items. Pure given those three."""

    def __init__(self, cfg: SynthesizeConfig, backends: Backends, items: list[SourceItem]):
        if not items:
            raise DataError(f"{cfg.source}: no usable source records")
        self.cfg, self.backends, self.items = cfg, backends, items
        # Which source each pair / caption sample uses: a seeded shuffle, cycled when n exceeds the corpus.
        self.pair_order = np.random.default_rng([cfg.seed, _PAIR_ORDER]).permutation(len(items))
        self.caption_order = np.random.default_rng([cfg.seed, _CAPTION_ORDER]).permutation(len(items))

    def make_pair(self, i: int) -> PairResult:
        cfg, b = self.cfg, self.backends
        rng = np.random.default_rng([cfg.seed, _PAIR_STREAM, i])
        item = self.items[int(self.pair_order[i % len(self.items)])]
        edit_type = cfg.edit_types[i % len(cfg.edit_types)]
        instruction = DIFFERENCE_INSTRUCTIONS[int(rng.integers(len(DIFFERENCE_INSTRUCTIONS)))]
        sample_id = f"syn-{i:06d}"
        rejects: list[dict[str, Any]] = []

        def reject(stage: str, r: Reject, attempt: int | None = None, edit: Any = None) -> None:
            rejects.append({"stage": stage, "sample": i, "id": sample_id, "source_id": item.id,
                            "edit_type": edit_type, "attempt": attempt, "reason": r.code, "detail": r.detail,
                            "edit": edit})

        try:
            image = item.load_image()
            objects, background = b.masks.regions(item, image)
        except Reject as r:
            reject("masks", r)
            return PairResult(None, None, None, rejects)
        except OSError as e:
            reject("source", Reject("undecodable_image", f"{item.image}: {e}"))
            return PairResult(None, None, None, rejects)

        candidates = background if edit_type == "add" else objects
        if not candidates:
            what = "empty background area" if edit_type == "add" else "object"
            reject("select", Reject("no_candidate", f"no {what} to {edit_type} in {item.image}"))
            return PairResult(None, None, None, rejects)
        scores = b.selector.scores(image, [c.mask for c in candidates], rng)
        order = sorted(range(len(candidates)), key=lambda k: (scores[k], k))  # least attended first

        for attempt, k in enumerate(order[: cfg.max_attempts], start=1):
            edit = None
            try:
                edit = b.editor.propose(item, image, candidates[k], edit_type, rng)
                edited = b.applier.apply(image, item, edit, rng)
            except Reject as r:
                reject("edit", r, attempt, edit.describe() if edit else None)
                continue
            problem = None
            for f in b.filters:
                problem = f.check(image, edited, edit)
                if problem is not None:
                    break
            if problem is not None:
                reject("filter", problem, attempt, edit.describe())
                continue
            record = {
                "id": sample_id,
                "images": [original_name(item), f"images/{sample_id}.png"],
                "instruction": instruction,
                "response": edit.sentence,
                "edit": edit.describe(),
                "source_id": item.id,
            }
            return PairResult(record, png_bytes(edited), item, rejects)
        reject("sample", Reject("no_valid_edit", f"all {min(len(order), cfg.max_attempts)} candidate edits were "
                                                 f"rejected"))
        return PairResult(None, None, None, rejects)

    def caption_sample(self, j: int) -> tuple[dict[str, Any], SourceItem]:
        """Caption sample j: a source image, a caption prompt, and the source caption as the response."""
        rng = np.random.default_rng([self.cfg.seed, _CAPTION_STREAM, j])
        item = self.items[int(self.caption_order[j % len(self.items)])]
        return {
            "id": f"cap-{j:06d}",
            "images": [original_name(item)],
            "instruction": CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))],
            "response": item.caption,
        }, item


# ---------------------------------------------------------------------------------------------------------------
# Parallel execution
# ---------------------------------------------------------------------------------------------------------------

_WORKER: Synthesizer | None = None


def _single_thread_torch() -> None:
    # Results must not depend on the thread count (matmul reductions may be split differently), and N workers
    # on N cores should not each start N threads.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _init_worker(synth: Synthesizer) -> None:
    global _WORKER
    _WORKER = synth
    _single_thread_torch()


def _work(i: int) -> PairResult:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.make_pair(i)


def run_pairs(synth: Synthesizer, n: int, workers: int) -> list[PairResult]:
    """make_pair(0..n-1), in index order, with `workers` processes (1: in this process)."""
    if workers <= 1:
        torch = sys.modules.get("torch")
        threads = torch.get_num_threads() if torch else None
        _single_thread_torch()
        try:
            return [synth.make_pair(i) for i in range(n)]
        finally:
            if torch and threads:
                torch.set_num_threads(threads)
    # fork shares the loaded models with the workers for free; elsewhere they are pickled to each worker.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    chunk = max(1, min(32, n // (workers * 4)))
    with ctx.Pool(workers, initializer=_init_worker, initargs=(synth,)) as pool:
        return list(pool.imap(_work, range(n), chunksize=chunk))


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------

# Settings recorded in stats.json: what shapes the output (not paths, not the worker count, which never does).
_RECORDED = ("n", "captions", "seed", "edit_types", "selector", "masks", "apply", "filters", "min_changed_fraction",
             "max_attempts")


def _dumps(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def synthesize(cfg: SynthesizeConfig, backbone: Any = None) -> dict[str, Any]:
    """Write the synthetic set for `cfg` to `cfg.out`; returns the statistics also written to stats.json.

    `backbone` is needed by `selector: attention`: a backbone directory or preset name (loaded with
    `cheetah.model.backbones.load_backbone`) or an already loaded object with `.model` (a Hugging Face
    Blip2ForConditionalGeneration) and `.image_processor`.
    """
    inputs = [cfg.source] + ([backbone] if isinstance(backbone, (str, Path)) and Path(backbone).is_dir() else [])
    check_output(cfg.out, "synthetic", protect=inputs)  # before any work: never replace what it did not write
    items, source_rejects, n_records = load_source(cfg.source, need_scenes=cfg.masks == "world")
    if not items:
        first = "; ".join(f"line {r['line']}: {r['reason']}" for r in source_rejects[:3])
        raise DataError(f"{cfg.source}: none of {n_records} source records is usable ({first})")
    synth = Synthesizer(cfg, build_backends(cfg, backbone), items)
    results = run_pairs(synth, cfg.n, cfg.workers)

    pairs = [r.record for r in results if r.record is not None]
    quarantine = source_rejects + [q for r in results for q in r.rejects]
    used: dict[int, SourceItem] = {r.source.index: r.source for r in results if r.source is not None}
    captions = []
    for j in range(cfg.captions):
        record, item = synth.caption_sample(j)
        captions.append(record)
        used[item.index] = item

    stats = {
        "pairs": len(pairs),
        "captions": len(captions),
        "requested_pairs": cfg.n,
        "unfilled_pairs": cfg.n - len(pairs),
        "source_records": n_records,
        "source_usable": len(items),
        "edit_types": {t: sum(1 for p in pairs if p["edit"]["type"] == t) for t in cfg.edit_types},
        "rejects": dict(sorted(Counter(q["reason"] for q in quarantine).items())),
        "quarantined": len(quarantine),
        "settings": {k: getattr(cfg, k) for k in _RECORDED},
    }
    with atomic_dir(cfg.out, kind="synthetic", protect=inputs) as tmp:
        (tmp / "images").mkdir()
        for item in sorted(used.values(), key=lambda it: it.index):
            shutil.copyfile(item.path, tmp / original_name(item))
        for r in results:
            if r.record is not None and r.png is not None:
                (tmp / r.record["images"][1]).write_bytes(r.png)
        (tmp / "synthetic.jsonl").write_text(_dumps(pairs), encoding="utf-8")
        (tmp / "captions.jsonl").write_text(_dumps(captions), encoding="utf-8")
        (tmp / "quarantine.jsonl").write_text(_dumps(quarantine), encoding="utf-8")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        write_contact_sheets(tmp)  # pictures of the finished set, published with it
    return stats
