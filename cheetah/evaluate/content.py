"""Content scores: does an answer say what the task is about, whatever its form?

The official DEMON metrics reward an answer's form: ROUGE-L gives "In the second image, the large red circle at the
top is gone." most of its points against "In the second image, the small blue star at the bottom is now striped.",
and a model that sees nothing scores as well as one that sees (docs/miniature.md). A content score asks only what the
world's language lets us check exactly, per task of the embedded benchmarks:

- difference descriptions (World_SpotTheChange, World_Story, held-out synthetic pairs): the answer names the edited
  object — its position, colour and shape — and the change (the edit, and the new colour, texture, shape or
  object). `object` and `change` are reported beside `content` (both right), and `position` (the object's position
  alone: where the change is);
- option tasks (World_WhichImage, World_ImageCloze, World_PropertyCoherence): the answer names the right option and
  no other;
- World_TextCloze: the answer agrees with the right caption on every word where an option differs from it;
- World_Dialogue: the answer names the reference value (a colour, shape, texture, position or number) and no other
  value of its kind.

Every score is a percentage of samples; an answer that cannot be read counts as wrong.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cheetah.evaluate.scoring import normalize_answer
from cheetah.io import DataError
from cheetah.world import CELLS, COLORS, SHAPES, SIZES, TEXTURES
from cheetah.world.language import NUMBER_WORDS, POSITION_PHRASES

# ---------------------------------------------------------------------------------------------------------------
# Difference sentences (cheetah.world.language.difference_sentence), read back
# ---------------------------------------------------------------------------------------------------------------

_WORD = {"size": SIZES, "color": COLORS, "texture": TEXTURES, "shape": SHAPES}
_DESCRIPTION = (rf"(?:(?P<{{p}}size>{'|'.join(SIZES)}) )?(?P<{{p}}color>{'|'.join(COLORS)}) "
                rf"(?:(?P<{{p}}texture>{'|'.join(TEXTURES)}) )?(?P<{{p}}shape>{'|'.join(SHAPES)})")
_POSITION = "(?P<position>" + "|".join(sorted((re.escape(p) for p in POSITION_PHRASES.values()), key=len,
                                              reverse=True)) + ")"
_PREFIX = r"in the (?:second|next) image "
_SUBJECT = _PREFIX + r"the " + _DESCRIPTION.format(p="") + " " + _POSITION
_PATTERNS = {
    "add": re.compile(_PREFIX + r"there is a new " + _DESCRIPTION.format(p="") + " " + _POSITION),
    "delete": re.compile(_SUBJECT + r" is gone"),
    "swap": re.compile(_SUBJECT + r" is replaced by an? " + _DESCRIPTION.format(p="new_")),
    "modify": re.compile(_SUBJECT + rf" is now (?:an? )?(?P<value>{'|'.join((*COLORS, *TEXTURES, *SHAPES))})"),
}
_CELL_OF_PHRASE = {phrase: cell for cell, phrase in POSITION_PHRASES.items()}


@dataclasses.dataclass(frozen=True)
class Change:
    """A difference sentence, read: the edit, the object it names (position, colour, shape; the new object for
    `add`), and what is new (`modify`: the new value; `swap`: the new colour and shape)."""

    edit: str
    position: str
    color: str
    shape: str
    new: tuple[str, ...] = ()


def read_change(text: str) -> Change | None:
    """The first difference sentence in `text`, or None where there is none the world's language could say."""
    normalized = " ".join(normalize_answer(text).split())
    found = [(m.start(), edit, m) for edit, pattern in _PATTERNS.items() if (m := pattern.search(normalized))]
    if not found:
        return None
    _, edit, m = min(found, key=lambda f: f[0])
    new: tuple[str, ...] = ()
    if edit == "modify":
        new = (m["value"],)
    elif edit == "swap":
        new = (m["new_color"], m["new_shape"])
    return Change(edit, _CELL_OF_PHRASE[m["position"]], m["color"], m["shape"], new)


def change_scores(prediction: str, reference: str) -> dict[str, bool]:
    """`object`: the prediction names the reference's object (position, colour and shape); `change`: the same edit
    with the same new value(s); `content`: both; `position`: the object's position alone."""
    truth = read_change(reference)
    if truth is None:
        raise ValueError(f"the reference {reference!r} is not a difference sentence of the world")
    said = read_change(prediction)
    named = said is not None and (said.position, said.color, said.shape) == (truth.position, truth.color, truth.shape)
    changed = said is not None and (said.edit, said.new) == (truth.edit, truth.new)
    return {"object": named, "change": changed, "content": named and changed,
            "position": said is not None and said.position == truth.position}


# ---------------------------------------------------------------------------------------------------------------
# Options and short answers
# ---------------------------------------------------------------------------------------------------------------

def _words(text: str) -> list[str]:
    return normalize_answer(text).split()


def option_named(prediction: str, truth: str, options: Sequence[str]) -> bool:
    """The prediction holds the right option's words in order, and no other option's: "the second image", "Image B",
    "yes"."""
    said = f" {' '.join(_words(prediction))} "

    def holds(option: str) -> bool:
        return f" {' '.join(_words(option))} " in said

    return holds(truth) and not any(holds(o) for o in options if _words(o) != _words(truth))


def caption_chosen(prediction: str, truth: str, options: Sequence[str]) -> bool:
    """The prediction agrees with the right caption wherever an option differs from it: it holds the right
    caption's word and not the option's, for every option."""
    said = set(_words(prediction))
    right = set(_words(truth))
    for option in options:
        other = set(_words(option))
        if other == right:
            continue
        if not (right - other) <= said or (other - right) & said:
            return False
    return True


_VALUES = {"color": COLORS, "shape": SHAPES, "texture": TEXTURES, "position": CELLS, "count": NUMBER_WORDS}


def _values_named(words: list[str], values: Sequence[str]) -> set[str]:
    """The values of one kind the words name, longest first ("top left" is not also "top" and "left")."""
    text, named = f" {' '.join(words)} ", set()
    for value in sorted(values, key=len, reverse=True):
        if f" {value} " in text:
            named.add(value)
            text = text.replace(f" {value} ", " | ")
    return named


def value_named(prediction: str, reference: str) -> bool:
    """The prediction names the reference value (a colour, shape, texture, cell or number word) and no other value
    of its kind."""
    ref = " ".join(_words(reference))
    kinds = [values for values in _VALUES.values() if ref in values]
    if not kinds:
        raise ValueError(f"the reference {reference!r} is not a value the world's questions answer with")
    named = _values_named(_words(prediction), kinds[0])
    return named == {ref}


# ---------------------------------------------------------------------------------------------------------------
# Per task
# ---------------------------------------------------------------------------------------------------------------

DIFFERENCE_TASKS = ("World_SpotTheChange", "World_Story")
OPTION_TASKS = ("World_WhichImage", "World_ImageCloze", "World_PropertyCoherence")
CONTENT_TASKS = (*DIFFERENCE_TASKS, *OPTION_TASKS, "World_TextCloze", "World_Dialogue")


def sample_content(task: str, prediction: str, reference: str, options: Sequence[str] | None) -> dict[str, bool]:
    """The content checks of one answer of an embedded task (`content`, and `object`/`change` for differences)."""
    if task in DIFFERENCE_TASKS:
        return change_scores(prediction, reference)
    if task in OPTION_TASKS:
        return {"content": option_named(prediction, reference, _options(task, options))}
    if task == "World_TextCloze":
        return {"content": caption_chosen(prediction, reference, _options(task, options))}
    if task == "World_Dialogue":
        return {"content": value_named(prediction, reference)}
    raise ValueError(f"no content score for task {task!r}; tasks with one: {list(CONTENT_TASKS)}")


def _options(task: str, options: Sequence[str] | None) -> Sequence[str]:
    if task == "World_ImageCloze":  # its options are images, named "Image A" .. "Image D" in the context
        return [f"Image {letter}" for letter in "ABCD"]
    if not options:
        raise ValueError(f"{task}: a sample without its choice list")
    return options


def content_summary(rows: Sequence[dict[str, bool]]) -> dict[str, float | int]:
    """Percentages of samples per check, and `n`."""
    if not rows:
        raise ValueError("no samples to score")
    out: dict[str, float | int] = {key: round(100.0 * sum(r[key] for r in rows) / len(rows), 2) for key in rows[0]}
    out["n"] = len(rows)
    return out


def demon_content(data_dir: str | Path, predictions_dir: str | Path, datasets: Sequence[str]) -> dict[str, Any]:
    """`{task: content_summary}` for the embedded tasks among `datasets` that have a content score, from each task's
    `<predictions_dir>/<task>/pred.json` (every sample needs its prediction, as for the official scores)."""
    from cheetah.evaluate.demon import load_demon_task
    from cheetah.evaluate.scoring import prediction_file, read_demon_predictions

    out: dict[str, Any] = {}
    for name in datasets:
        if name not in CONTENT_TASKS:
            continue
        task = load_demon_task(data_dir, name)
        source = prediction_file(Path(predictions_dir), task.info)
        if source is None:
            raise DataError(f"{Path(predictions_dir) / name / 'pred.json'}: file not found")
        said = {str(r["sample_id"]): r["pred_response"] for r in read_demon_predictions(source)}
        missing = [s.key for s in task.samples if s.key not in said]
        if missing:
            raise DataError(f"{source}: no prediction for sample(s) {missing[:5]} of {task.path}")
        try:
            out[name] = content_summary([sample_content(name, said[s.key], s.response, s.choice_list)
                                         for s in task.samples])
        except ValueError as e:
            raise DataError(f"{task.path}: {e}") from None
    return out
