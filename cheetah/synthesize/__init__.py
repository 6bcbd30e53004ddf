"""Synthetic discriminative training data (paper §2.2): attention-guided edits of source images.

Public API:
    synthesize(cfg: SynthesizeConfig, backbone=None) -> dict     `cheetah synthesize`; returns stats.json
    load_source(root, need_scenes) -> (items, rejects, n_records)
    build_backends(cfg, backbone=None) -> Backends; Synthesizer(cfg, backends, items).make_pair(i)
    run_shard(job, shard) -> dict                               one shard into the work area (cheetah.synthesize.shards)

Steps and their backends (each behind a small Protocol):
    masks     MaskSource.regions(item, image)            WorldMasks (ground truth) | SamMasks (real images)
    select    TargetSelector.scores(image, masks, rng)   AttentionSelector (Q-Former) | RandomSelector
    edit      Editor.propose(item, image, target, type, rng)   WorldEditor | LabelEditor
    apply     Applier.apply(image, item, edit, rng)      WorldApplier (re-render) | InpaintApplier (diffusers)
    filter    EditFilter.check(before, after, edit)      PixelFilter | ClipFilter
"""

from cheetah.synthesize.apply import Applier, InpaintApplier, WorldApplier, blend
from cheetah.synthesize.common import Edit, Region, Reject, SourceItem, bbox
from cheetah.synthesize.edits import Editor, LabelEditor, WorldEditor
from cheetah.synthesize.filters import Clip, ClipFilter, EditFilter, PixelFilter
from cheetah.synthesize.masks import MaskSource, SamMasks, WorldMasks
from cheetah.synthesize.pipeline import (Backends, Draws, Synthesizer, build_backends, load_source, run_shard,
                                        synthesize)
from cheetah.synthesize.shards import ShardFailed
from cheetah.synthesize.select import AttentionSelector, RandomSelector, TargetSelector, qformer_attention_map

__all__ = [
    "Applier", "AttentionSelector", "Backends", "Clip", "ClipFilter", "Edit", "EditFilter", "Editor",
    "InpaintApplier", "LabelEditor", "MaskSource", "PixelFilter", "RandomSelector", "Region", "Reject",
    "SamMasks", "SourceItem", "Synthesizer", "TargetSelector", "WorldApplier", "WorldEditor", "WorldMasks",
    "ShardFailed", "bbox", "blend", "build_backends", "Draws", "load_source", "qformer_attention_map", "run_shard",
    "synthesize",
]
