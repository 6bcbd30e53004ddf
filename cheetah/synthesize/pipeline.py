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

Execution: the pairs are cut into shards (`cheetah.synthesize.shards`: deterministic, keyed by their inputs,
written to a work area as they are made, so a killed run resumes with the missing shards only) and the shards run
in this process (`executor: local`) or on a Dask cluster (`executor: dask`, `cheetah.engine`); the backends are
built once per worker process. The shards are then merged in index order into the output folder; the caption
samples are drawn at the merge, from the source records no stage rejected.

Determinism: everything random about sample i comes from a Generator seeded by (seed, i), work is done with one
torch thread per process, and results are merged in index order, so any number of workers and any shard size
write the same bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cheetah.config import ConfigError, SynthesizeConfig
from cheetah.engine import fan_out
from cheetah.formats import (SOURCE_CAPTIONS, SOURCE_SCENES, SYNTHETIC_CAPTIONS, SYNTHETIC_PAIRS, read_records,
                             source_problem)
from cheetah.io import DataError, atomic_dir, atomic_write_json, check_output, lock_scope, safe_join
from cheetah.progress import StageBar
from cheetah.synthesize.apply import Applier, InpaintApplier, WorldApplier
from cheetah.synthesize.common import Reject, SourceItem
from cheetah.synthesize.contact_sheet import write_contact_sheets
from cheetah.synthesize.edits import Editor, LabelEditor, WorldEditor
from cheetah.synthesize.filters import Clip, ClipFilter, EditFilter, PixelFilter
from cheetah.synthesize.masks import MaskSource, SamMasks, WorldMasks
from cheetah.synthesize.select import AttentionSelector, RandomSelector, TargetSelector
from cheetah.synthesize.shards import SHARD_KIND, SHARD_INFO, Shard, ShardFailed, WorkArea, plan_shards, run_key
from cheetah.world.corpus import read_scenes
from cheetah.world.language import CAPTION_PROMPTS, DIFFERENCE_INSTRUCTIONS
from cheetah.world.render import png_bytes

# Seed-stream tags: each kind of randomness gets its own (seed, tag, ...) stream, so adding samples or changing
# one step never shifts the random choices of another.
_PAIR_STREAM, _CAPTION_STREAM, _PAIR_ORDER, _CAPTION_ORDER = 1, 2, 3, 4
# Rejects that condemn a source record itself, not one edit candidate: no other sample (pair or caption) may use
# its image. (Undecodable images are already rejected when the corpus is read, before any sample is made.)
SYNTHETIC_KIND = "synthetic set"  # the kind of output folder this stage writes (cheetah.io.atomic_dir)
_UNUSABLE_IMAGE = frozenset({"undecodable_image", "scene_mismatch"})

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Source corpus
# ---------------------------------------------------------------------------------------------------------------


def _check_image(path: Path) -> tuple[str | None, str | None]:
    """(sha256 of the file, None) if the image decodes completely, else (None, why not).

    A full decode, not PIL's `verify()` (which only checks the chunk structure): an image that passes here is one
    every later step can read, so no stage has to reject it halfway through (and the caption samples never draw
    an image the pairs could not use)."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG":
                im.draft("RGB", (im.width // 8 or 1, im.height // 8 or 1))  # decodes every block, 8x fewer pixels
            im.load()
    except Exception as e:  # PIL raises many types for corrupt files
        return None, str(e) or type(e).__name__
    return hashlib.sha256(data).hexdigest(), None


def load_source(root: str | Path, need_scenes: bool) -> tuple[list[SourceItem], list[dict[str, Any]], int]:
    """Usable records of a source corpus, the rejected ones (with reasons) and the number of records read.

    A record that is not in the format (`cheetah.formats.source_problem`: not UTF-8, malformed JSON, a missing or
    non-string field, the image placeholder in a caption) is fatal (DataError naming the file, line, id and field),
    as in every stage that reads a corpus and in its validation. A usable record whose image is not (a duplicate
    id, an image path outside the folder, a missing image or one that does not decode completely, no scene graph
    when one is needed) is rejected, not fatal: it is listed in the quarantine. A missing captions.jsonl, or
    scenes.jsonl when the world backends need it, is fatal. Images are decoded by a few threads at once (PIL
    releases the GIL).
    """
    root = Path(root)
    captions_path = root / SOURCE_CAPTIONS
    if not captions_path.exists():
        raise DataError(f"{captions_path}: file not found (a source corpus is a folder with {SOURCE_CAPTIONS} and "
                        "images)")
    records = read_records(captions_path, source_problem)
    scenes = {}
    if need_scenes:
        if not (root / SOURCE_SCENES).exists():
            raise DataError(f"{root / SOURCE_SCENES}: file not found; masks: world needs the scene graphs written "
                            f"by `cheetah world` (for real images use masks: sam and apply: inpaint)")
        scenes = read_scenes(root / SOURCE_SCENES)

    rejects: list[dict[str, Any]] = []
    seen: set[str] = set()
    n_records = len(records)

    def reject(lineno: int, rec_id: Any, code: str, detail: str) -> dict[str, Any]:
        return {"stage": "source", "file": SOURCE_CAPTIONS, "line": lineno,
                "id": rec_id if isinstance(rec_id, str) else None, "reason": code, "detail": detail}

    # First the checks on the record itself, in file order; then the images, decoded in parallel.
    entries: list[dict[str, Any] | tuple[int, dict[str, Any], Path]] = []
    for lineno, rec in records:
        if rec["id"] in seen:
            entries.append(reject(lineno, rec["id"], "duplicate_id", f"id {rec['id']!r} appears earlier in the file"))
            continue
        seen.add(rec["id"])
        try:
            path = safe_join(root, rec["image"], what="field image")
        except DataError as e:
            entries.append(reject(lineno, rec["id"], "path_escapes_root", str(e)))
            continue
        if not path.is_file():
            entries.append(reject(lineno, rec["id"], "missing_image", f"field image: {rec['image']} does not exist"))
            continue
        entries.append((lineno, rec, path))

    to_check = [e[2] for e in entries if isinstance(e, tuple)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        checked = iter(pool.map(_check_image, to_check))

    items: list[SourceItem] = []
    for entry in entries:
        if isinstance(entry, dict):
            rejects.append(entry)
            continue
        lineno, rec, path = entry
        sha, problem = next(checked)
        if problem is not None:
            rejects.append(reject(lineno, rec["id"], "undecodable_image",
                                  f"field image: {rec['image']} cannot be read ({problem})"))
            continue
        scene = scenes.get(rec["id"])
        if need_scenes and scene is None:
            rejects.append(reject(lineno, rec["id"], "no_scene_graph", f"id {rec['id']!r} has no scene graph in "
                                                                        f"{SOURCE_SCENES}"))
            continue
        items.append(SourceItem(index=lineno - 1, id=rec["id"], image=rec["image"], path=path,
                                caption=rec["caption"], scene=scene, sha256=sha or ""))
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


def _backbone_parts(backbone: Any, device: str = "cpu") -> tuple[Any, Any]:
    """(model, image_processor) from a Backbone object, or a backbone directory / preset name to load on `device`."""
    if backbone is None:
        raise ConfigError("synthesize.selector is 'attention', which needs the backbone whose Q-Former attention "
                          "picks the targets; pass a backbone directory (or use selector: random)")
    if isinstance(backbone, (str, Path)):
        from cheetah.model.backbones import load_backbone

        try:
            backbone = load_backbone(str(backbone), device=device)
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
                                else AttentionSelector(*_backbone_parts(backbone, cfg.device)))
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


class Draws:
    """Which source record each sample uses: seeded shuffles of the usable records, cycled when n exceeds them."""

    def __init__(self, cfg: SynthesizeConfig, items: list[SourceItem]):
        if not items:
            raise DataError(f"{cfg.source}: no usable source records")
        self.cfg, self.items = cfg, items
        self.pair_order = np.random.default_rng([cfg.seed, _PAIR_ORDER]).permutation(len(items))
        self.caption_order = np.random.default_rng([cfg.seed, _CAPTION_ORDER]).permutation(len(items))

    def pair_item(self, i: int) -> SourceItem:
        return self.items[int(self.pair_order[i % len(self.items)])]

    def caption_samples(self, count: int, excluded: set[str]) -> list[tuple[dict[str, Any], SourceItem]]:
        """Caption samples 0..count-1: a source image, a caption prompt, and the source caption as the response.

        Records in `excluded` (ids whose image a stage rejected) are skipped, so no caption sample uses them."""
        eligible = [self.items[int(k)] for k in self.caption_order if self.items[int(k)].id not in excluded]
        if count and not eligible:
            raise DataError(f"{self.cfg.source}: every usable source image was rejected by a later stage; no "
                            f"caption sample can be made")
        out = []
        for j in range(count):
            rng = np.random.default_rng([self.cfg.seed, _CAPTION_STREAM, j])
            item = eligible[j % len(eligible)]
            out.append(({"id": f"cap-{j:06d}", "images": [original_name(item)],
                         "instruction": CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))],
                         "response": item.caption}, item))
        return out


class Synthesizer:
    """Makes sample i from the config, the backends and the usable source items. Pure given those three."""

    def __init__(self, cfg: SynthesizeConfig, backends: Backends, items: list[SourceItem]):
        self.draws = Draws(cfg, items)
        self.cfg, self.backends, self.items = cfg, backends, items

    def make_pair(self, i: int) -> PairResult:
        cfg, b = self.cfg, self.backends
        rng = np.random.default_rng([cfg.seed, _PAIR_STREAM, i])
        item = self.draws.pair_item(i)
        edit_type = cfg.edit_types[i % len(cfg.edit_types)]
        instruction = DIFFERENCE_INSTRUCTIONS[int(rng.integers(len(DIFFERENCE_INSTRUCTIONS)))]
        sample_id = f"syn-{i:06d}"
        rejects: list[dict[str, Any]] = []

        def reject(stage: str, r: Reject, attempt: int | None = None, edit: Any = None) -> None:
            rejects.append({"stage": stage, "sample": i, "id": sample_id, "source_id": item.id,
                            "edit_type": edit_type, "attempt": attempt, "reason": r.code, "detail": r.detail,
                            "edit": edit})

        # The image decoded completely when the corpus was checked; one that cannot be read now (changed, or not
        # reachable from this worker) fails the shard, naming the record, rather than being skipped here.
        image = item.load_image()
        try:
            objects, background = b.masks.regions(item, image)
        except Reject as r:
            reject("masks", r)
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



# ---------------------------------------------------------------------------------------------------------------
# Shards (run in this process or on a Dask worker)
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SynthesisJob:
    """What every shard of a run needs; sent once to each Dask worker, which builds the backends from it once."""

    cfg: SynthesizeConfig
    backbone: Any
    items: list[SourceItem]
    key: str
    work: str
    synthesizer: Synthesizer | None = None
    """Already built (the local executor builds it in this process); None: built where the shards run."""

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "synthesizer": None}  # the models are built on the worker, never pickled


_PROCESS_SYNTHESIZER: tuple[str, Synthesizer] | None = None  # (run key, synthesizer) built in this worker process


def _synthesizer(job: SynthesisJob) -> Synthesizer:
    """The job's synthesizer, with its backends (SAM, inpainting, CLIP, the backbone) loaded once per process."""
    global _PROCESS_SYNTHESIZER
    if job.synthesizer is not None:
        return job.synthesizer
    if _PROCESS_SYNTHESIZER is None or _PROCESS_SYNTHESIZER[0] != job.key:
        _PROCESS_SYNTHESIZER = None  # free the previous run's models first
        _single_thread_torch()
        _PROCESS_SYNTHESIZER = (job.key, Synthesizer(job.cfg, build_backends(job.cfg, job.backbone), job.items))
    return _PROCESS_SYNTHESIZER[1]


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def run_shard(job: SynthesisJob, shard: Shard, report: Any = lambda k: None) -> dict[str, Any]:
    """Make the pairs of `shard` into its folder in the work area (images written as they are made); returns the
    shard's summary. An exception on a sample fails the shard with `ShardFailed`, naming the source record."""
    synth = _synthesizer(job)
    started_at = time.time()
    started = time.perf_counter()
    pairs, rejects, sources = 0, 0, set()
    with atomic_dir(Path(job.work) / shard.name, kind=SHARD_KIND) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / SYNTHETIC_PAIRS, "w", encoding="utf-8") as pair_file, \
                open(tmp / "quarantine.jsonl", "w", encoding="utf-8") as quarantine_file:
            for i in range(shard.start, shard.stop):
                try:
                    result = synth.make_pair(i)
                except Exception as e:  # noqa: BLE001 - named and re-raised: which record broke which shard
                    item = synth.draws.pair_item(i)
                    record = {"id": item.id, "line": item.index + 1, "image": item.image}
                    raise ShardFailed(
                        f"shard {shard.index} (pairs {shard.start}-{shard.stop - 1}) failed at pair {i} on source "
                        f"record id {item.id!r} ({Path(job.cfg.source) / SOURCE_CAPTIONS} line {item.index + 1}, "
                        f"image {item.image}): {type(e).__name__}: {e}",
                        shard.index, i, record, traceback.format_exc()) from None
                if result.record is not None and result.png is not None and result.source is not None:
                    (tmp / result.record["images"][1]).write_bytes(result.png)
                    pair_file.write(_dumps(result.record))
                    pairs += 1
                    sources.add(result.source.index)
                for q in result.rejects:
                    quarantine_file.write(_dumps(q))
                rejects += len(result.rejects)
                report(1)
        seconds = time.perf_counter() - started
        info = {"shard": shard.index, "start": shard.start, "stop": shard.stop, "key": shard.key, "pairs": pairs,
                "quarantined": rejects, "sources": sorted(sources), "seconds": round(seconds, 3),
                "started": round(started_at, 3), "host": os.uname().nodename, "pid": os.getpid()}
        atomic_write_json(tmp / SHARD_INFO, info)
    return info


def log_shard(shard: Shard, info: dict[str, Any]) -> None:
    """The rate of a finished shard, in the log of the process that runs the stage."""
    seconds = info["seconds"]
    log.info("shard %d (pairs %d-%d): %d pairs in %.1f s (%.2f samples/s) on %s pid %s", shard.index, shard.start,
             shard.stop - 1, info["pairs"], seconds, len(shard) / seconds if seconds else 0.0, info["host"],
             info["pid"])


def _single_thread_torch() -> None:
    # Results must not depend on the thread count (matmul reductions may be split differently), and N workers
    # on N cores should not each start N threads.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread in this process meanwhile (as on every worker), then the previous thread count."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    _single_thread_torch()
    try:
        yield
    finally:
        if torch and threads:
            torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------

# Settings recorded in stats.json: what shapes the output (not paths, not the worker count, which never does).
_RECORDED = ("n", "captions", "seed", "edit_types", "selector", "masks", "apply", "filters", "min_changed_fraction",
             "max_attempts")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same file system (the work area is the output's sibling): no copy
    except OSError:
        shutil.copyfile(src, dst)


def default_backbone(params: Any, override: str | None = None) -> str | None:
    """The backbone `cheetah synthesize` selects targets with: `override` (`--backbone`), else model.backbone_dir,
    else model.preset; None when `synthesize.selector` is random."""
    if params.synthesize.selector != "attention":
        return None
    return override or params.model.backbone_dir or params.model.preset


@dataclasses.dataclass
class SynthesisRun:
    """A planned run: the checked corpus, its shards, which of them are still to make, and the job they share."""

    cfg: SynthesizeConfig
    draws: Draws
    source_rejects: list[dict[str, Any]]
    n_records: int
    shards: list[Shard]
    todo: list[Shard]
    work: WorkArea
    job: SynthesisJob

    @property
    def done_before(self) -> int:
        return self.cfg.n - sum(len(s) for s in self.todo)


def plan(cfg: SynthesizeConfig, backbone: Any = None) -> SynthesisRun:
    """Check the corpus, cut the pairs into shards, open the work area and see which shards an earlier run made."""
    items, source_rejects, n_records = load_source(cfg.source, need_scenes=cfg.masks == "world")
    if not items:
        first = "; ".join(f"line {r['line']}: {r['reason']}" for r in source_rejects[:3])
        raise DataError(f"{cfg.source}: none of {n_records} source records is usable ({first})")
    if cfg.selector == "attention" and backbone is None:
        _backbone_parts(None)  # the ConfigError that says what is missing, before any work starts
    draws = Draws(cfg, items)
    key = run_key(cfg, backbone, items)
    shards = plan_shards(cfg.n, cfg.shard_size, key, [draws.pair_item(i) for i in range(cfg.n)])
    work = WorkArea(cfg.out).open()
    todo = [s for s in shards if not work.is_done(s)]
    if todo and cfg.executor == "dask" and backbone is not None and not isinstance(backbone, (str, Path)):
        # A model in this process's memory reaches the workers as a directory they load (once each), like one given
        # by path; it is kept in the work area, which the workers (and so a cluster's shared storage) reach anyway.
        from cheetah.model.backbones import save_backbone

        if not (work.path / "backbone").is_dir():
            save_backbone(backbone, work.path / "backbone")
        backbone = str(work.path / "backbone")
    log.info("synthesize: %d pairs in %d shard(s) of up to %d; %d to run%s (executor %s%s)", cfg.n, len(shards),
             cfg.shard_size, len(todo), f", {len(shards) - len(todo)} done before" if len(todo) < len(shards) else "",
             cfg.executor, f", {cfg.workers} worker(s)" if cfg.executor == "dask" and not cfg.address
             else f" at {cfg.address}" if cfg.address else "")
    return SynthesisRun(cfg, draws, source_rejects, n_records, shards, todo, work,
                        SynthesisJob(cfg, backbone, items, key, str(work.path)))


def shard_failures(run: SynthesisRun, failed: list[tuple[Shard, BaseException]]) -> ShardFailed:
    """One error naming every failed shard's source record (each shard's traceback goes to the log)."""
    for shard, error in failed:
        log.error("synthesis shard %d failed: %s\n%s", shard.index, error, getattr(error, "trace", ""))
    lines = [str(e) if isinstance(e, ShardFailed) else f"shard {s.index} (pairs {s.start}-{s.stop - 1}): "
             f"{type(e).__name__}: {e}" for s, e in failed]
    records = [e.record for _, e in failed if isinstance(e, ShardFailed)]
    return ShardFailed(f"synthesis: {len(failed)} of {len(run.shards)} shard(s) failed; the other shards' outputs "
                       f"are kept in {run.work.path} and a rerun makes only the missing ones:\n  " + "\n  ".join(lines),
                       failed[0][0].index, getattr(failed[0][1], "pair", None), records[0] if records else None)


def synthesize(cfg: SynthesizeConfig, backbone: Any = None) -> dict[str, Any]:
    """Write the synthetic set for `cfg` to `cfg.out`; returns the statistics also written to stats.json.

    `backbone` is needed by `selector: attention`: a backbone directory or preset name (loaded with
    `cheetah.model.backbones.load_backbone`, once per worker) or an already loaded object with `.model` (a Hugging
    Face Blip2ForConditionalGeneration) and `.image_processor`.

    Shards finished by an earlier, interrupted run with the same inputs are reused. If shards fail, the others'
    outputs are kept and `ShardFailed` names each failed shard's source record; a rerun runs only the missing shards.
    The work area and the output folder are locked for the run (a second run on them is refused by name) and
    released when it ends (`cheetah.io.lock_scope`).
    """
    with lock_scope():
        return _synthesize(cfg, backbone)


def _synthesize(cfg: SynthesizeConfig, backbone: Any) -> dict[str, Any]:
    # Before any work: the output folder replaces only an earlier synthetic set, never its inputs.
    check_output(cfg.out, SYNTHETIC_KIND, protect=_inputs(cfg, backbone))
    run = plan(cfg, backbone)
    failed: list[tuple[Shard, BaseException]] = []
    with one_torch_thread(), StageBar("synthesize", cfg.n, "pairs", initial=run.done_before) as bar:
        if run.todo and cfg.executor == "local":
            run.job.synthesizer = Synthesizer(cfg, build_backends(cfg, run.job.backbone), run.job.items)
        outcomes = fan_out(run_shard, run.job, run.todo, executor=cfg.executor, workers=cfg.workers,
                           address=cfg.address, gpu=cfg.device != "cpu", report=bar.update, name="synthesize",
                           fatal=(ConfigError,), done=log_shard)
        run.job.synthesizer = None
        failed = [(shard, error) for shard, _, error in outcomes if error is not None]
        bar.set(cfg.n - sum(len(shard) for shard, _ in failed))
    if failed:
        raise shard_failures(run, failed)
    return merge(run)


def _inputs(cfg: SynthesizeConfig, backbone: Any) -> list[str | Path]:
    """What the output folder must not contain: the corpus and a backbone given by its directory."""
    return [cfg.source] + ([backbone] if isinstance(backbone, (str, Path)) and Path(backbone).is_dir() else [])


def merge(run: SynthesisRun) -> dict[str, Any]:
    """The output folder from the finished shards, in index order (streamed: one record in memory at a time), then
    the work area is removed. Returns the statistics written to stats.json."""
    cfg, draws, shards, work = run.cfg, run.draws, run.shards, run.work
    source_rejects, n_records = run.source_rejects, run.n_records
    by_index = {item.index: item for item in draws.items}
    used: set[int] = set()
    unusable: set[str] = set()
    reasons: Counter[str] = Counter(q["reason"] for q in source_rejects)
    edit_counts = {t: 0 for t in cfg.edit_types}
    pairs = quarantined = 0
    with atomic_dir(cfg.out, kind=SYNTHETIC_KIND, protect=_inputs(cfg, run.job.backbone)) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / SYNTHETIC_PAIRS, "w", encoding="utf-8") as pair_file, \
                open(tmp / "quarantine.jsonl", "w", encoding="utf-8") as quarantine_file:
            for q in source_rejects:
                quarantine_file.write(_dumps(q))
            quarantined += len(source_rejects)
            for shard in shards:
                folder = work.shard_dir(shard)
                with open(folder / SYNTHETIC_PAIRS, encoding="utf-8") as f:
                    for line in f:
                        record = json.loads(line)
                        pair_file.write(line)
                        _link_or_copy(folder / record["images"][1], tmp / record["images"][1])
                        edit_counts[record["edit"]["type"]] += 1
                        pairs += 1
                with open(folder / "quarantine.jsonl", encoding="utf-8") as f:
                    for line in f:
                        q = json.loads(line)
                        quarantine_file.write(line)
                        reasons[q["reason"]] += 1
                        quarantined += 1
                        if q["reason"] in _UNUSABLE_IMAGE:
                            unusable.add(q["source_id"])
                used.update(work.info(shard)["sources"])
        captions = draws.caption_samples(cfg.captions, excluded=unusable)
        with open(tmp / SYNTHETIC_CAPTIONS, "w", encoding="utf-8") as f:
            for record, item in captions:
                f.write(_dumps(record))
                used.add(item.index)
        for index in sorted(used):
            shutil.copyfile(by_index[index].path, tmp / original_name(by_index[index]))
        stats = {
            "pairs": pairs,
            "captions": len(captions),
            "requested_pairs": cfg.n,
            "unfilled_pairs": cfg.n - pairs,
            "source_records": n_records,
            "source_usable": len(draws.items),
            "edit_types": edit_counts,
            "rejects": dict(sorted(reasons.items())),
            "quarantined": quarantined,
            "settings": {k: getattr(cfg, k) for k in _RECORDED},
        }
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        write_contact_sheets(tmp)  # pictures of the finished set, published with it
    work.remove()
    return stats
