"""DEMON (Li et al., ICLR 2024): the table of tasks and a loader for the official on-disk format.

On disk, one folder per task (dataset):

    <root>/<Dataset>/core/core.json        {"metadata": {...}, "data": [...]}   (`full/full.json` for DEMON-Full)
    <root>/<Dataset>/core/images/<file>    images; `images_path` entries are relative to `images/`

`metadata.task_instruction` holds the instruction templates; every record of `data` has `sample_id`,
`task_instruction_id`, `task_instance.{context, images_path[, choice_list]}` and `response`. Images stand in the
context as `{image#k}` or `{table#k}` (tables are pre-rendered PNGs); k counts through `images_path` from 1.

The model input follows the official inference script (`Cheetah/i4_cheetah_llama2.py`): the chosen instruction
template, then the context, then - when the record has a `choice_list` - `Choice list:['a', 'b']. Your answer is:`.
Every placeholder becomes the project's `<image>` and contributes `images_path[k-1]` to the image list, so the
images always follow the placeholders. (The official script replaces the placeholders but feeds `images_path` in
list order, which misaligns images whenever the placeholders are not written in ascending order.)
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import logging
import re
from pathlib import Path
from typing import Any, Literal

from cheetah.formats import IMAGE_TOKEN, demon_document_problem
from cheetah.io import DataError, atomic_write_json, read_json, safe_join

log = logging.getLogger(__name__)


Metric = Literal["rouge_l", "accuracy"]
Split = Literal["core", "full"]

# The score script's category keys (`DEMON Benchmark/scripts/i4_score.py`), in the order of the paper's Table 2.
CATEGORIES: dict[str, str] = {
    "multi_modal_dialogue": "Multimodal Dialogue",
    "visual_story_telling_list": "Visual Storytelling",
    "visual_relation_inference": "Visual Relation Inference",
    "multi_modal_cloze": "Multimodal Cloze",
    "knowledge_grounded_qa": "Knowledge Grounded QA",
    "text_rich_images_qa": "Text-Rich Images QA",
    "multi_image_reasoning": "Multi-Image Reasoning",
}


@dataclasses.dataclass(frozen=True)
class DemonTaskInfo:
    """One row of the task table: what a dataset folder is, and how it is scored."""

    dataset: str
    """Official folder name (the key of `pred.json` folders and of the category lists)."""
    task: str
    category: str
    """A key of CATEGORIES."""
    metric: Metric
    image_choice: bool = False
    """Options are images ("Image A" ... "Image D"): scored by the answer's opening words, not by TF-IDF."""
    core_n: int | None = None
    """Instances in DEMON-Core; None for the Full-only tasks (Gibson, ManyModalQA) and the embedded tasks."""
    full_n: int | None = None
    embedded: bool = False
    """Written by `cheetah.evaluate.embedded` from the procedural world (folder names start with `World_`)."""


def _t(dataset: str, task: str, category: str, metric: Metric, core_n: int | None, full_n: int | None,
       image_choice: bool = False, embedded: bool = False) -> DemonTaskInfo:
    return DemonTaskInfo(dataset, task, category, metric, image_choice, core_n, full_n, embedded)


_ROWS: list[DemonTaskInfo] = [
    # cheetah-method.md §4 (paper Table 6 + the per-task READMEs). ALFRED's metadata has an empty question_type;
    # the paper scores it with ROUGE-L, and so do we.
    _t("ALFRED", "Conversational Embodied Dialogue", "multi_modal_dialogue", "rouge_l", 2294, 107201),
    _t("MMCoQA", "Multimodal Dialogue", "multi_modal_dialogue", "rouge_l", 2382, 4925),
    _t("AESOP", "Animated Story Completion", "visual_story_telling_list", "rouge_l", 500, 7015),
    _t("PororoSV", "Animated Story Completion", "visual_story_telling_list", "rouge_l", 500, 12399),
    _t("FlintstonesSV", "Animated Story Completion", "visual_story_telling_list", "rouge_l", 500, 22441),
    _t("VIST", "Sequential Photo Storytelling", "visual_story_telling_list", "rouge_l", 500, 26126),
    _t("DiDeMoSV", "Sequential Photo Storytelling", "visual_story_telling_list", "rouge_l", 500, 14924),
    _t("Spot-the-Diff", "Visual Change Captioning", "visual_relation_inference", "rouge_l", 500, 10874),
    _t("CLEVR-Change", "Visual Change Captioning", "visual_relation_inference", "rouge_l", 500, 3985),
    _t("IEdit", "Visual Relationship Expressing", "visual_relation_inference", "rouge_l", 500, 2000),
    _t("Birds-to-Words", "Subtle Difference Expressing", "visual_relation_inference", "rouge_l", 500, 14381),
    _t("COMICS_Dialogue", "Comic Dialogue Identification", "multi_modal_cloze", "accuracy", 500, 6000),
    _t("COMICS_Panel", "Comic Panel Identification", "multi_modal_cloze", "accuracy", 500, 6000, image_choice=True),
    _t("RecipeQA_TextCloze", "Recipe Completion", "multi_modal_cloze", "accuracy", 500, 9761),
    _t("RecipeQA_VisualCloze", "Visual Step Cloze", "multi_modal_cloze", "accuracy", 500, 8834, image_choice=True),
    _t("WebQA", "Webpage QA", "knowledge_grounded_qa", "accuracy", 500, 9438),
    _t("TQA", "Textbook QA", "knowledge_grounded_qa", "accuracy", 500, 9786),
    _t("MultiModalQA", "Complex Multimodal QA", "knowledge_grounded_qa", "accuracy", 500, 4577),
    _t("ManyModalQA", "Complex Multimodal QA", "knowledge_grounded_qa", "accuracy", None, 3104),
    _t("SlideVQA", "Slide QA", "text_rich_images_qa", "accuracy", 500, 1987),
    _t("OCR-VQA", "OCR QA", "text_rich_images_qa", "accuracy", 500, 2000),
    _t("DocVQA", "Document QA", "text_rich_images_qa", "accuracy", 500, 2000),
    _t("Gibson", "Image-Set QA", "multi_image_reasoning", "accuracy", None, 91479),
    _t("nuScenes", "Image-Set QA", "multi_image_reasoning", "accuracy", 500, 9906),
    _t("VISION", "Industrial Inspection", "multi_image_reasoning", "accuracy", 500, 2000),
    _t("Fashion200K", "Fashion QA", "multi_image_reasoning", "accuracy", 500, 2000),
    _t("MIT-States_PropertyCoherence", "Property Coherence", "multi_image_reasoning", "accuracy", 500, 2000),
    _t("MIT-States_StateCoherence", "State Transformation Coherence", "multi_image_reasoning", "accuracy", 500, 2000),
    _t("RecipeQA_ImageCoherence", "Visual Step Matching", "multi_image_reasoning", "accuracy", 500, 8799,
       image_choice=True),
    _t("NLVR2", "Multi-Image Visual Entailment", "multi_image_reasoning", "accuracy", 500, 37208),
    _t("VizWiz", "Ambiguity Analysis", "multi_image_reasoning", "accuracy", 500, 5000),
    # The embedded benchmark (cheetah/evaluate/embedded.py): held-out scenes of the procedural world. The `World_`
    # prefix keeps them apart from the real tasks in every table and folder.
    _t("World_SpotTheChange", "Visual Change Captioning", "visual_relation_inference", "rouge_l", None, None,
       embedded=True),
    _t("World_WhichImage", "Image-Set QA", "multi_image_reasoning", "accuracy", None, None, embedded=True),
    _t("World_PropertyCoherence", "Property Coherence", "multi_image_reasoning", "accuracy", None, None,
       embedded=True),
    _t("World_ImageCloze", "Visual Step Cloze", "multi_modal_cloze", "accuracy", None, None, image_choice=True,
       embedded=True),
    _t("World_TextCloze", "Caption Completion", "multi_modal_cloze", "accuracy", None, None, embedded=True),
    _t("World_Dialogue", "Multimodal Dialogue", "multi_modal_dialogue", "rouge_l", None, None, embedded=True),
    _t("World_Story", "Sequential Scene Storytelling", "visual_story_telling_list", "rouge_l", None, None,
       embedded=True),
]

TASKS: dict[str, DemonTaskInfo] = {row.dataset: row for row in _ROWS}
"""Every known DEMON task (31 official + the embedded ones), keyed by folder name."""
OFFICIAL_TASKS: tuple[str, ...] = tuple(r.dataset for r in _ROWS if not r.embedded)
CORE_TASKS: tuple[str, ...] = tuple(r.dataset for r in _ROWS if not r.embedded and r.core_n is not None)


def resolve_dataset(name: str) -> DemonTaskInfo:
    """The task-table row for a folder name. Casing variants are accepted when they name one task only
    (the official scripts write `nuscenes` for the `nuScenes` folder); anything else is refused with suggestions."""
    if name in TASKS:
        return TASKS[name]
    folded = [d for d in TASKS if d.lower() == name.lower()]
    if len(folded) == 1:
        return TASKS[folded[0]]
    close = difflib.get_close_matches(name, list(TASKS), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known tasks: {', '.join(TASKS)}"
    raise DataError(f"unknown DEMON dataset {name!r}{hint}")


# ---------------------------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DemonSample:
    """One instruction, ready for a model: `prompt` holds one `<image>` per entry of `images`, in order."""

    dataset: str
    sample_id: int | str
    """As written in the data (the official `pred.json` keeps its type); compare via `key`."""
    prompt: str
    images: tuple[Path, ...]
    choice_list: tuple[str, ...] | None
    """The options of a multi-choice task: the record's `choice_list`, else the list written in the context."""
    response: str
    """Ground truth."""

    @property
    def key(self) -> str:
        return str(self.sample_id)


@dataclasses.dataclass(frozen=True)
class DemonTask:
    """One loaded dataset folder."""

    info: DemonTaskInfo
    split: Split
    path: Path
    """The `<split>.json` file."""
    folder: str
    """The folder name as found on disk (may differ in case from `info.dataset`)."""
    question_type: str
    samples: tuple[DemonSample, ...]

    @property
    def dataset(self) -> str:
        return self.info.dataset


_PLACEHOLDER = re.compile(r"\{(image|table)#(\d+)\}")
# The README examples write the options into the context as "Choice List:['a', 'b']".
_INLINE_CHOICES = re.compile(r"Choice List\s*:\s*(\[.*?\])", re.IGNORECASE | re.DOTALL)


def choice_suffix(choices: list[str] | tuple[str, ...]) -> str:
    """The text the official inference script appends for a record with a `choice_list`."""
    return "Choice list:['" + "', '".join(choices) + "']. Your answer is:"


def _inline_choices(context: str) -> tuple[str, ...] | None:
    m = _INLINE_CHOICES.search(context)
    if not m:
        return None
    try:
        value = ast.literal_eval(m.group(1))
    except (ValueError, SyntaxError):
        return None
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def image_roots(split_dir: Path) -> list[Path]:
    # The official script joins `images_path` to `<split>/images`; a copy without that level keeps them beside
    # the json. Both roots are tried, each one refusing paths that escape it.
    images = split_dir / "images"
    return [images, split_dir] if images.is_dir() else [split_dir]


def _resolve_image(roots: list[Path], rel: Any, where: str) -> Path:
    tried = []
    for root in roots:
        full = safe_join(root, rel, what=where)
        if full.is_file():
            return full
        tried.append(str(full))
    raise DataError(f"{where}: image {rel!r} not found (looked for {' and '.join(tried)})")


def build_sample(info: DemonTaskInfo, rec: Any, index: int, instructions: list[str], roots: list[Path],
                 path: Path) -> DemonSample:
    """Record `index` of `path` as a sample, or DataError naming it (the validation suite reports these too)."""
    where = f"{path}: data[{index}]"
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    for field in ("sample_id", "task_instance", "response"):
        if field not in rec:
            raise DataError(f"{where}: missing field {field!r}")
    sid = rec["sample_id"]
    where = f"{path}: sample_id {sid!r}"
    if not isinstance(sid, (int, str)) or isinstance(sid, bool):
        raise DataError(f"{where}: sample_id must be an integer or a string")
    inst = rec["task_instance"]
    if not isinstance(inst, dict) or not isinstance(inst.get("context"), str):
        raise DataError(f"{where}: task_instance.context must be a string")
    images_path = inst.get("images_path")
    if not isinstance(images_path, list):
        raise DataError(f"{where}: task_instance.images_path must be a list")
    tid = rec.get("task_instruction_id", 0)
    if not isinstance(tid, int) or isinstance(tid, bool) or not 0 <= tid < len(instructions):
        raise DataError(f"{where}: task_instruction_id {tid!r} is not an index into the "
                        f"{len(instructions)} task_instruction templates")
    raw_choices = inst.get("choice_list")
    if raw_choices is not None and (not isinstance(raw_choices, list)
                                    or not all(isinstance(c, str) for c in raw_choices)):
        raise DataError(f"{where}: task_instance.choice_list must be a list of strings")

    text = instructions[tid] + inst["context"]
    if raw_choices is not None:
        text += choice_suffix(raw_choices)
    # A literal `<image>` in the source text would be taken for an image slot downstream.
    text = text.replace(IMAGE_TOKEN, "< image >")

    images: list[Path] = []
    used: set[int] = set()

    def place(m: re.Match[str]) -> str:
        k = int(m.group(2))
        if not 1 <= k <= len(images_path):
            raise DataError(f"{where}: placeholder {m.group(0)} but images_path has {len(images_path)} entries")
        images.append(_resolve_image(roots, images_path[k - 1], f"{where}: images_path[{k - 1}]"))
        used.add(k)
        return IMAGE_TOKEN

    prompt = _PLACEHOLDER.sub(place, text)
    unused = sorted(set(range(1, len(images_path) + 1)) - used)
    if unused:
        raise DataError(f"{where}: images_path entries {unused} (1-based) have no {{image#k}}/{{table#k}} "
                        f"placeholder in the context")

    choices = tuple(raw_choices) if raw_choices is not None else _inline_choices(inst["context"])
    if info.metric == "accuracy" and not info.image_choice and not choices:
        raise DataError(f"{where}: a multi-choice task needs task_instance.choice_list "
                        f"(or a 'Choice List:[...]' in the context)")
    response = rec["response"]
    if response is None or isinstance(response, (dict, list)):
        raise DataError(f"{where}: response must be text, got {response!r}")
    return DemonSample(info.dataset, sid, prompt, tuple(images), choices, str(response))


def find_split_file(root: str | Path, dataset: str, split: Split = "core") -> tuple[DemonTaskInfo, Path, str]:
    """(task row, `<root>/<folder>/<split>/<split>.json`, folder) for a dataset name, tolerating casing variants
    of the folder on disk."""
    info = resolve_dataset(dataset)
    root = Path(root)
    candidates = [info.dataset] + ([dataset] if dataset != info.dataset else [])
    if root.is_dir():
        candidates += [p.name for p in root.iterdir() if p.is_dir() and p.name.lower() == info.dataset.lower()]
    for folder in dict.fromkeys(candidates):
        path = root / folder / split / f"{split}.json"
        if path.is_file():
            return info, path, folder
    raise DataError(f"{root / info.dataset / split / f'{split}.json'}: file not found "
                    f"(DEMON task {info.dataset}, split {split})")


def load_demon_task(root: str | Path, dataset: str, split: Split = "core") -> DemonTask:
    """Load one DEMON dataset folder, checking every record, placeholder and image."""
    info, path, folder = find_split_file(root, dataset, split)
    doc = read_json(path)
    problem = demon_document_problem(doc)
    if problem:
        raise DataError(f"{path}: {problem}")
    meta = doc["metadata"]
    instructions = meta["task_instruction"]
    question_type = meta.get("question_type") or ""
    expected = "open-ended" if info.metric == "rouge_l" else "multi-choice"
    if question_type and question_type != expected:
        log.warning("%s: metadata.question_type is %r but the task table scores %s with %s; using the table",
                    path, question_type, info.dataset, info.metric)
    roots = image_roots(path.parent)
    samples = [build_sample(info, rec, i, instructions, roots, path)
               for i, rec in enumerate(doc["data"])]
    seen: dict[str, int] = {}
    for i, s in enumerate(samples):
        if s.key in seen:
            raise DataError(f"{path}: sample_id {s.sample_id!r} appears twice (data[{seen[s.key]}] and data[{i}])")
        seen[s.key] = i
    if not samples:
        raise DataError(f"{path}: 'data' is empty")
    return DemonTask(info, split, path, folder, question_type, tuple(samples))


def list_demon_datasets(root: str | Path, split: Split = "core") -> list[str]:
    """Canonical names of the dataset folders under `root` that hold a `<split>/<split>.json`, in table order.
    A folder with such a file but an unknown name is refused (it would otherwise be silently left out)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: DEMON data folder not found")
    found: dict[str, str] = {}
    for p in sorted(root.iterdir()):
        if p.is_dir() and (p / split / f"{split}.json").is_file():
            info = resolve_dataset(p.name)
            if info.dataset in found:
                raise DataError(f"{root}: folders {found[info.dataset]!r} and {p.name!r} both hold {info.dataset}")
            found[info.dataset] = p.name
    if not found:
        raise DataError(f"{root}: no DEMON dataset folder with {split}/{split}.json")
    return [name for name in TASKS if name in found]


def load_demon(root: str | Path, datasets: list[str] | None = None, split: Split = "core") -> list[DemonTask]:
    """Every dataset under `root` (or the named ones), in task-table order."""
    names = list_demon_datasets(root, split) if datasets is None else [resolve_dataset(d).dataset for d in datasets]
    return [load_demon_task(root, name, split) for name in names]


# ---------------------------------------------------------------------------------------------------------------
# Writing (the embedded benchmark and tests produce the same format the loader reads)
# ---------------------------------------------------------------------------------------------------------------


def write_demon_task(root: str | Path, dataset: str, instructions: list[str], records: list[dict[str, Any]],
                     images: dict[str, bytes], split: Split = "core") -> Path:
    """Write `<root>/<dataset>/<split>/<split>.json` and its `images/` in the official format; returns the json.

    `records` are official `data` entries; `images` maps each `images_path` entry to the file's bytes. The
    dataset must be in the task table, so whatever is written can be scored."""
    info = resolve_dataset(dataset)
    folder = Path(root) / info.dataset / split
    for rel, data in images.items():
        path = safe_join(folder / "images", rel, what=f"{info.dataset} image")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    meta = {"dataset": info.dataset, "split": split, "num_sample": len(records), "task_instruction": instructions,
            "question_type": "open-ended" if info.metric == "rouge_l" else "multi-choice"}
    return atomic_write_json(folder / f"{split}.json", {"metadata": meta, "data": records}, indent=1)
