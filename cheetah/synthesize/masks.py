"""Where the objects are: candidate regions for editing.

`WorldMasks` reads them off the scene graph (ground truth, the embedded world). `SamMasks` runs SAM's automatic
mask generation (a grid of point prompts) on real images, as the paper does, and names each mask with CLIP when
a CLIP directory is given. Both also return empty background areas, one per free grid cell, which are the
only places the `add` edit may put a new object.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw

from cheetah.synthesize.common import Region, Reject, SourceItem, local_dir
from cheetah.synthesize.filters import Clip
from cheetah.world.render import cell_mask, render
from cheetah.world.scene import CELLS, GRID


class MaskSource(Protocol):
    def regions(self, item: SourceItem, image: Image.Image) -> tuple[list[Region], list[Region]]:
        """(objects, empty background areas) on `image`."""
        ...


class WorldMasks:
    """Ground-truth object masks from the scene graph (the world's stand-in for SAM)."""

    def regions(self, item: SourceItem, image: Image.Image) -> tuple[list[Region], list[Region]]:
        scene = item.scene
        if scene is None:
            raise Reject("no_scene_graph", f"source {item.id} has no scene graph in scenes.jsonl")
        rendered = render(scene)
        # The masks are only true for this image if the scene graph really is this image.
        if rendered.image.size != image.size or not np.array_equal(np.asarray(rendered.image), np.asarray(image)):
            raise Reject("scene_mismatch", f"{item.image} is not the rendering of scene {scene.id}")
        objects = [Region(o.name, rendered.masks[o.name], o.attrs()) for o in scene.objects
                   if rendered.masks[o.name].any()]
        background = [Region(f"cell:{c}", cell_mask(c, scene.image_size), {"position": c})
                      for c in scene.empty_cells()]
        return objects, background


def cell_of(mask: np.ndarray) -> str:
    """The grid cell holding the centre of mass of `mask` (any image shape)."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    col = min(GRID - 1, int(xs.mean() * GRID / w))
    row = min(GRID - 1, int(ys.mean() * GRID / h))
    return CELLS[row * GRID + col]


def cell_area(cell: str, shape: tuple[int, int], fill: float = 1.0) -> np.ndarray:
    """A centred ellipse covering `fill` of a grid cell of an (H, W) image (fill=1: the whole cell box)."""
    h, w = shape
    row, col = divmod(CELLS.index(cell), GRID)
    x0, x1 = col * w / GRID, (col + 1) * w / GRID
    y0, y1 = row * h / GRID, (row + 1) * h / GRID
    mask = Image.new("L", (w, h), 0)
    if fill >= 1.0:
        ImageDraw.Draw(mask).rectangle([round(x0), round(y0), round(x1) - 1, round(y1) - 1], fill=255)
    else:
        mx, my = (x1 - x0) * (1 - fill) / 2, (y1 - y0) * (1 - fill) / 2
        ImageDraw.Draw(mask).ellipse([x0 + mx, y0 + my, x1 - mx - 1, y1 - my - 1], fill=255)
    return np.asarray(mask) > 0


class SamMasks:
    """SAM automatic masks from a point grid, loaded from a local Hugging Face SAM directory.

    Each grid point prompts SAM once (all points in one batch); of SAM's three masks per point the one with the
    best predicted IoU is kept if that IoU reaches `min_score` and the mask covers 0.2%-50% of the image; then
    overlapping masks (IoU > 0.7) are merged greedily, best first. Objects are named with CLIP from `labels` when
    `clip` is given, else called "object".
    """

    def __init__(self, sam_dir: str | None, points: int = 8, min_score: float = 0.7, clip: Clip | None = None,
                 labels: list[str] | None = None, min_area: float = 0.002, max_area: float = 0.5,
                 overlap_iou: float = 0.7, max_objects: int = 12, device: str = "cpu"):
        from transformers import SamModel, SamProcessor

        directory = local_dir(sam_dir, "synthesize.sam_dir")
        self.device = device
        self.model = SamModel.from_pretrained(directory, local_files_only=True).eval().to(device)
        self.processor = SamProcessor.from_pretrained(directory, local_files_only=True)
        self.points, self.min_score = points, min_score
        self.clip, self.labels = clip, list(labels or [])
        self.min_area, self.max_area, self.overlap_iou = min_area, max_area, overlap_iou
        self.max_objects = max_objects

    def masks(self, image: Image.Image) -> list[tuple[np.ndarray, float]]:
        """(mask, predicted IoU) pairs, best first, without near-duplicates."""
        import torch

        w, h = image.size
        grid = [[[(i + 0.5) * w / self.points, (j + 0.5) * h / self.points]]
                for j in range(self.points) for i in range(self.points)]
        inputs = self.processor(images=image.convert("RGB"), input_points=[grid], return_tensors="pt")
        with torch.no_grad():
            out = self.model(pixel_values=inputs["pixel_values"].to(self.device),
                             input_points=inputs["input_points"].to(self.device), multimask_output=True)
        masks = self.processor.image_processor.post_process_masks(
            out.pred_masks.cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"])[0].numpy()
        iou = out.iou_scores[0].cpu().numpy()  # (points, 3)
        candidates = []
        for p in range(masks.shape[0]):
            k = int(np.argmax(iou[p]))
            mask, score = masks[p, k].astype(bool), float(iou[p, k])
            area = mask.mean()
            if score >= self.min_score and self.min_area <= area <= self.max_area:
                candidates.append((mask, score))
        candidates.sort(key=lambda c: -c[1])  # stable: equal scores keep grid order
        kept: list[tuple[np.ndarray, float]] = []
        for mask, score in candidates:
            if all((mask & m).sum() / max(1, (mask | m).sum()) <= self.overlap_iou for m, _ in kept):
                kept.append((mask, score))
            if len(kept) == self.max_objects:
                break
        return kept

    def regions(self, item: SourceItem, image: Image.Image) -> tuple[list[Region], list[Region]]:
        found = self.masks(image)
        objects = []
        for k, (mask, _) in enumerate(found):
            label = self.clip.label(image, mask, self.labels) if self.clip is not None else "object"
            objects.append(Region(f"m{k}", mask, {"label": label, "position": cell_of(mask)}))
        covered = np.zeros((image.height, image.width), dtype=bool)
        for mask, _ in found:
            covered |= mask
        background = []
        for cell in CELLS:
            # A cell counts as background when SAM found (almost) nothing there.
            if covered[cell_area(cell, covered.shape)].mean() < 0.05:
                background.append(Region(f"cell:{cell}", cell_area(cell, covered.shape, fill=0.6),
                                         {"position": cell}))
        return objects, background
