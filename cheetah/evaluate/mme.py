"""MME (Fu et al., 2023): the 14 subtasks, a loader for both release layouts, and the results-file format.

Release layouts (`MME_Benchmark_release_version/`, some copies with an extra `MME_Benchmark/` level):

    flat:   <subtask>/<id>.jpg|png           + <subtask>/<id>.txt
    split:  <subtask>/images/<id>.jpg|png    + <subtask>/questions_answers_YN/<id>.txt

Each `.txt` holds exactly two lines `question<TAB>Yes|No`: every image is asked one question whose answer is Yes and
one whose answer is No, and the score's acc+ counts the images with both right.

The official calculation (`eval_tool/calculation.py`) reads one `<subtask>.txt` per subtask, one line per question:
`image<TAB>question<TAB>ground truth<TAB>prediction`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from cheetah.evaluate.demon import IMAGE_TOKEN
from cheetah.io import DataError, atomic_write_text, safe_join

PERCEPTION: tuple[str, ...] = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                               "landmark", "artwork", "OCR")
COGNITION: tuple[str, ...] = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS: tuple[str, ...] = PERCEPTION + COGNITION
"""Official folder (and results-file) names, in the calculation tool's order."""

_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
_LAYOUT_CHARS = re.compile(r"[\t\r\n]")


def resolve_subtask(name: str) -> str:
    """The official subtask name for `name`, matched case-insensitively (`ocr` -> `OCR`)."""
    for s in SUBTASKS:
        if s.lower() == name.lower():
            return s
    raise DataError(f"unknown MME subtask {name!r}; the subtasks are {', '.join(SUBTASKS)}")


@dataclasses.dataclass(frozen=True)
class MMESample:
    """One yes/no question about one image."""

    subtask: str
    image: str
    """The image's file name: the first column of the results file, and what the two questions are paired by."""
    index: int
    """0 or 1: the line of the question file."""
    question: str
    answer: str
    """"Yes" or "No"."""
    image_path: Path

    @property
    def key(self) -> str:
        return f"{self.image}#{self.index}"

    @property
    def sample_id(self) -> str:
        return self.key

    @property
    def prompt(self) -> str:
        # The question already ends with "Please answer yes or no."; the image goes first, as in the Cheetah demos.
        return f"{IMAGE_TOKEN} {self.question}"

    @property
    def images(self) -> tuple[Path, ...]:
        return (self.image_path,)

    @property
    def response(self) -> str:
        return self.answer


def find_root(root: Path) -> Path:
    for candidate in (root, root / "MME_Benchmark"):
        if candidate.is_dir() and any(c.is_dir() and c.name.lower() in {s.lower() for s in SUBTASKS}
                                      for c in candidate.iterdir()):
            return candidate
    raise DataError(f"{root}: no MME subtask folder ({', '.join(SUBTASKS)}) here or under MME_Benchmark/")


def subtask_dirs(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for c in sorted(root.iterdir()):
        if c.is_dir() and c.name.lower() in {s.lower() for s in SUBTASKS}:
            name = resolve_subtask(c.name)
            if name in found:
                raise DataError(f"{root}: folders {found[name].name!r} and {c.name!r} both hold subtask {name}")
            found[name] = c
    return found


def check_yes_no_pair(answers: list[str], where: str) -> None:
    """MME asks about every image twice, once with the answer Yes and once No (that is what acc+ measures); any
    other pair of ground truths is a malformed file, not something to score."""
    if sorted(a.strip().capitalize() for a in answers) != ["No", "Yes"]:
        raise DataError(f"{where}: the ground truths of an image's two questions must be one Yes and one No, got "
                        f"{' and '.join(repr(a) for a in answers)}")


def read_question_file(path: Path) -> list[tuple[str, str]]:
    """The two `(question, "Yes"|"No")` lines of one question file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) != 2:
        raise DataError(f"{path}: expected exactly two lines 'question<TAB>Yes|No' (one image, two questions), "
                        f"found {len(lines)}")
    out = []
    for n, line in enumerate(lines, start=1):
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip():
            raise DataError(f"{path}:{n}: expected 'question<TAB>Yes|No', got {line!r}")
        if IMAGE_TOKEN in parts[0]:  # the prompt puts one in front of the question: a second would be an image slot
            raise DataError(f"{path}:{n}: the question contains the image placeholder {IMAGE_TOKEN}")
        answer = parts[1].strip().capitalize()
        if answer not in ("Yes", "No"):
            raise DataError(f"{path}:{n}: the answer must be Yes or No, got {parts[1]!r}")
        out.append((parts[0], answer))
    check_yes_no_pair([a for _, a in out], str(path))
    return out


@dataclasses.dataclass(frozen=True)
class SubtaskFiles:
    """The files of one subtask folder, in either layout, paired by stem (`<id>.txt` asks about `<id>.jpg|png`)."""

    image_dir: Path
    text_dir: Path
    images: dict[str, Path]
    texts: dict[str, Path]


def subtask_files(folder: Path) -> SubtaskFiles:
    """The images and question files of a subtask folder; two images sharing a stem are refused."""
    split = (folder / "images").is_dir() and (folder / "questions_answers_YN").is_dir()
    image_dir = folder / "images" if split else folder
    text_dir = folder / "questions_answers_YN" if split else folder
    images: dict[str, Path] = {}
    for p in sorted(image_dir.iterdir()):
        if p.is_file() and p.suffix in _IMAGE_SUFFIXES:
            if p.stem in images:
                raise DataError(f"{image_dir}: {images[p.stem].name} and {p.name} share the question file {p.stem}.txt")
            images[p.stem] = p
    texts = {p.stem: p for p in sorted(text_dir.iterdir()) if p.is_file() and p.suffix == ".txt"}
    return SubtaskFiles(image_dir, text_dir, images, texts)


def _under_root(root: Path, path: Path) -> Path:
    """`path` resolved; DataError when a symbolic link on its way leads out of the MME folder `root` (DEMON's
    images are held to their root the same way): a benchmark copy must not make the evaluation read any file."""
    return safe_join(root, path.relative_to(root).as_posix(), what=f"{path} (-> {path.resolve()})")


def _load_subtask(name: str, folder: Path, root: Path) -> list[MMESample]:
    files = subtask_files(folder)
    image_dir, text_dir, images, texts = files.image_dir, files.text_dir, files.images, files.texts
    orphans = sorted(set(images) - set(texts))
    if orphans:
        raise DataError(f"{text_dir}: image(s) {', '.join(images[s].name for s in orphans[:5])} have no question "
                        f"file <id>.txt (every MME image is asked a pair of questions)"
                        + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else ""))
    samples: list[MMESample] = []
    for stem, txt in texts.items():
        if stem not in images:
            raise DataError(f"{txt}: no image {stem}.jpg/.png in {image_dir}")
        image = _under_root(root, images[stem])
        _under_root(root, txt)
        for i, (question, answer) in enumerate(read_question_file(txt)):
            samples.append(MMESample(name, images[stem].name, i, question, answer, image))
    if not samples:
        raise DataError(f"{folder}: no question files")
    return samples


def load_mme(root: str | Path, subtasks: list[str] | None = None) -> dict[str, list[MMESample]]:
    """Every subtask folder under `root` (or the named ones), in the official order: {subtask: samples}.

    The two questions of an image are adjacent in each list, as the official calculation expects them."""
    base = find_root(Path(root))
    dirs = subtask_dirs(base)
    wanted = list(dirs) if subtasks is None else [resolve_subtask(s) for s in subtasks]
    missing = [s for s in wanted if s not in dirs]
    if missing:
        raise DataError(f"{base}: subtask folder(s) not found: {', '.join(missing)}")
    return {s: _load_subtask(s, dirs[s], base) for s in SUBTASKS if s in wanted}


# ---------------------------------------------------------------------------------------------------------------
# Results files (the official calculation's input)
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MMEResult:
    image: str
    question: str
    gt: str
    pred: str
    line: int


def results_line(image: str, question: str, gt: str, pred: str) -> str:
    """One line of a results file. Tabs and line breaks inside fields become spaces: the format has no escaping,
    and a space never changes what the first-four-characters parse finds."""
    return "\t".join(_LAYOUT_CHARS.sub(" ", str(f)) for f in (image, question, gt, pred)) + "\n"


def read_results_file(path: str | Path) -> list[MMEResult]:
    """Rows of one `<subtask>.txt`. The prediction is the rest of the line after the third tab."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    rows = []
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t", 3)
        if len(parts) != 4:
            raise DataError(f"{path}:{n}: expected 'image<TAB>question<TAB>ground truth<TAB>prediction', "
                            f"got {len(parts)} field(s)")
        gt = parts[2].strip()
        if gt.lower() not in ("yes", "no"):
            raise DataError(f"{path}:{n}: the ground truth must be Yes or No, got {parts[2]!r}")
        rows.append(MMEResult(parts[0], parts[1], gt, parts[3], n))
    if not rows:
        raise DataError(f"{path}: no results")
    return rows


def write_mme_subtask(root: str | Path, subtask: str, items: list[tuple[str, bytes, list[tuple[str, str]]]]) -> Path:
    """Write one subtask in the flat layout: `<root>/<subtask>/<image>` and `<stem>.txt` with its two
    `question<TAB>Yes|No` lines. `items` are (image file name, image bytes, [(question, "Yes"|"No")] x 2)."""
    folder = Path(root) / resolve_subtask(subtask)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data, qas in items:
        if len(qas) != 2 or {a for _, a in qas} - {"Yes", "No"}:
            raise ValueError(f"{name}: an MME image takes two (question, 'Yes'|'No') pairs, got {qas!r}")
        image = safe_join(folder, name, what=f"{subtask} image")
        image.write_bytes(data)
        atomic_write_text(image.with_suffix(".txt"),
                          "".join(f"{_LAYOUT_CHARS.sub(' ', q)}\t{a}\n" for q, a in qas))
    return folder
