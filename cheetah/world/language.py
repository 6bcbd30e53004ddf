"""The world's language: captions, questions, difference sentences, prompt templates and the tokenizer.

Everything the pipeline says about a picture is built here from the scene vocabulary, so one corpus
(`language_corpus()`) covers every word any stage can produce, and the tokenizer trained on it
(`train_tokenizer()`) encodes all of it compactly.

Attribute dicts. Text helpers take plain dicts rather than scene objects, so the same sentences serve the
embedded world and real images: a world object is `{"size", "color", "texture", "shape", "position"}`
(`Obj.attrs()`); an object on a real image is `{"label", "position"}`, optionally with `"color"`.

Captions describe the large primary objects and the background only. That is deliberate: it is the caption
bias the paper is about (a caption-trained visual prompt generator learns to ignore the details).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from cheetah.formats import IMAGE_TOKEN
from cheetah.world.scene import CELLS, COLORS, N_LARGE, N_SMALL, SHAPES, SIZES, TEXTURES, Obj, Scene, generate_scene

# ---------------------------------------------------------------------------------------------------------------
# Phrases
# ---------------------------------------------------------------------------------------------------------------

# How a sentence says "where": "the small red star at the top left", "the large circle in the center".
POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
EDIT_TYPES: tuple[str, ...] = ("modify", "swap", "delete", "add")

# Instructions for the inter-image discriminative task. `<image>` stands for one image, in order.
DIFFERENCE_INSTRUCTIONS: tuple[str, ...] = (
    "Image 1: <image> Image 2: <image> Describe the difference between the images.",
    "Image 1: <image> Image 2: <image> What is different in the second image?",
    "<image> <image> Describe the difference between the two images.",
    "Here are two images. First: <image> Second: <image> What has changed?",
    "Image 1: <image> Image 2: <image> Spot the difference between the images and describe it.",
    "<image> <image> Tell me what changed from the first image to the second one.",
)
# Prompts for caption samples (the joint caption regulariser): one image each.
CAPTION_PROMPTS: tuple[str, ...] = (
    "<image> Describe this image briefly.",
    "<image> Write a short caption for this image.",
    "<image> What does this image show?",
    "Image: <image> Give a one sentence description of the image.",
)
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{objects} on {background}",
    "a picture of {objects} on {background}",
    "an image of {objects} on {background}",
)
# Chat markers and benchmark phrasing other stages put around this language (templates, DEMON, MME).
CHAT_AND_BENCHMARK_TEXT: tuple[str, ...] = (
    "###Human: <Img><image></Img> Describe this image briefly. ###Assistant: a large red circle on a blue "
    "background###",
    "[INST] <<SYS>>\n\n<</SYS>>\n\n<Img><image></Img> What does this image show? [/INST] a large square </s>",
    "Yes", "No", "yes", "no", "Please answer yes or no.",
    "image a", "image b", "image c", "image d", "Image A", "Image B", "Image C", "Image D",
    "Image 1:", "Image 2:", "Image 3:", "Image 4:", "{image#1}", "{image#2}", "{image#3}", "{image#4}",
    "Choice list:['image a', 'image b', 'image c', 'image d']. Your answer is:",
    "Which image is different from the others?",
    "Which image shows the same objects as the first one?",
    "What is the difference between the first and the second image?",
)


def article(phrase: str) -> str:
    """'a' or 'an' for the phrase that follows."""
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def describe(attrs: Mapping[str, str]) -> str:
    """'small red striped star' (world objects; a plain texture is not said) or 'blue dog' (labelled objects)."""
    words = [attrs.get("size"), attrs.get("color")]
    if attrs.get("texture") not in (None, "plain"):
        words.append(attrs["texture"])
    words.append(attrs.get("shape") or attrs.get("label") or "object")
    return " ".join(w for w in words if w)


def where(attrs: Mapping[str, str]) -> str:
    """'small red star at the top left' (the description with its position, which makes it unique)."""
    position = attrs.get("position")
    return f"{describe(attrs)} {POSITION_PHRASES[position]}" if position else describe(attrs)


def caption(scene: Scene, template: int = 0) -> str:
    """Caption of the primary (large) objects and the background, e.g.
    'a large red striped circle and a large blue square on a green background'."""
    parts = [f"{article(describe(o.attrs()))} {describe(o.attrs())}" for o in scene.primary]
    background = scene.background_color
    if scene.background_texture != "plain":
        background += f" {scene.background_texture}"
    return CAPTION_TEMPLATES[template % len(CAPTION_TEMPLATES)].format(
        objects=" and ".join(parts), background=f"{article(background)} {background} background"
    )


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


# ---------------------------------------------------------------------------------------------------------------
# Difference sentences (the target of the inter-image discriminative task)
# ---------------------------------------------------------------------------------------------------------------


def difference_sentence(edit_type: str, before: Mapping[str, str] | None, after: Mapping[str, str] | None) -> str:
    """One sentence naming the object and the attributes that changed between image 1 and image 2.

    modify: 'In the second image, the small red star at the top left is now blue.'
    swap:   'In the second image, the small red star at the top left is replaced by a small green circle.'
    delete: 'In the second image, the small red star at the top left is gone.'
    add:    'In the second image, there is a new small green circle at the top left.'
    """
    if edit_type == "add":
        if after is None:
            raise ValueError("an add edit needs the added object (after)")
        return f"In the second image, there is a new {where(after)}."
    if before is None:
        raise ValueError(f"a {edit_type} edit needs the target object (before)")
    subject = f"In the second image, the {where(before)}"
    if edit_type == "delete":
        return f"{subject} is gone."
    if after is None:
        raise ValueError(f"a {edit_type} edit needs the new object (after)")
    if edit_type == "swap":
        new = describe(after)
        return f"{subject} is replaced by {article(new)} {new}."
    if edit_type == "modify":
        changed = [k for k in ("color", "texture", "shape", "label") if after.get(k) != before.get(k)]
        if len(changed) != 1:
            raise ValueError(f"a modify edit changes exactly one attribute, got {changed}")
        key = changed[0]
        value = after[key]
        if key in ("shape", "label"):
            return f"{subject} is now {article(value)} {value}."
        return f"{subject} is now {value}."
    raise ValueError(f"unknown edit type {edit_type!r}; expected one of {list(EDIT_TYPES)}")


# ---------------------------------------------------------------------------------------------------------------
# Single-image questions (the base model's pretraining) and yes/no pairs (MME-style benchmarks)
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QA:
    """A question about one scene, its short answer, and its kind (color, shape, texture, position, ...)."""

    question: str
    answer: str
    kind: str


def _unique(scene: Scene, **attrs: str) -> list[Obj]:
    return [o for o in scene.objects if all(getattr(o, k) == v for k, v in attrs.items())]


def questions(scene: Scene) -> list[QA]:
    """Every open question this module can ask about `scene`, with its answer, in a fixed order.

    Kinds: `color` ('What color is the small star at the top left?' -> 'red'), `shape`, `texture`, `position`
    ('Where is the small red star?' -> 'top left', asked only when the description is unique), `count`
    ('How many small objects are there?' -> 'four') and `background` ('What color is the background?').
    Answers are single words or a position name.
    """
    out: list[QA] = []
    for o in scene.objects:
        pos = POSITION_PHRASES[o.cell]
        out.append(QA(f"What color is the {o.size} {o.shape} {pos}?", o.color, "color"))
        out.append(QA(f"What shape is the {o.size} {o.color} object {pos}?", o.shape, "shape"))
        out.append(QA(f"What pattern does the {o.size} {o.color} {o.shape} {pos} have?", o.texture, "texture"))
        if len(_unique(scene, size=o.size, color=o.color, shape=o.shape)) == 1:
            out.append(QA(f"Where is the {o.size} {o.color} {o.shape}?", o.cell, "position"))
        if len(_unique(scene, size=o.size, shape=o.shape)) == 1:
            out.append(QA(f"What color is the {o.size} {o.shape}?", o.color, "color"))
    for size in SIZES:
        out.append(QA(f"How many {size} objects are there?", number_word(len(_unique(scene, size=size))), "count"))
    out.append(QA("What color is the background?", scene.background_color, "background"))
    return out


def existence_questions(scene: Scene, rng: np.random.Generator) -> list[QA]:
    """'Is there a small star?' -> 'yes' for one present (size, shape), and -> 'no' for one that is absent."""
    present = {(o.size, o.shape) for o in scene.objects}
    absent = [(s, sh) for s in SIZES for sh in SHAPES if (s, sh) not in present]
    size, shape = sorted(present)[int(rng.integers(len(present)))]
    out = [QA(f"Is there {article(size)} {size} {shape}?", "yes", "existence")]
    if absent:
        size, shape = absent[int(rng.integers(len(absent)))]
        out.append(QA(f"Is there {article(size)} {size} {shape}?", "no", "existence"))
    return out


def sample_question(scene: Scene, rng: np.random.Generator) -> QA:
    """One question drawn uniformly from `questions(scene)` plus the existence questions."""
    pool = questions(scene) + existence_questions(scene, rng)
    return pool[int(rng.integers(len(pool)))]


YES_NO_SUFFIX = "Please answer yes or no."
YES_NO_KINDS: tuple[str, ...] = ("existence", "count", "position", "color")
"""The MME perception subtasks the world can pose (the embedded MME-format benchmark)."""
PERCEPTION_KINDS: tuple[str, ...] = ("existence", "color", "shape", "texture", "count")
"""What a caption covers about its objects, asked as yes/no questions: the base stage learns these about the large
objects, and `metrics/base.json` measures them on held-out scenes (large objects) and on the details."""
# How many objects of each size a scene can hold (inclusive), for count questions whose wrong number is plausible.
_COUNTS = {"large": N_LARGE, "small": N_SMALL}


def _count_phrase(n: int, size: str) -> str:
    return f"Is there one {size} object" if n == 1 else f"Are there {number_word(n)} {size} objects"


def yes_no_pair(scene: Scene, kind: str, rng: np.random.Generator, size: str | None = None) -> tuple[str, str]:
    """(question whose answer is Yes, question whose answer is No) about `scene`, MME-style.

    Both end with 'Please answer yes or no.'. Kinds: existence ('Is there a small red star in the image?'), count
    ('Are there four small objects in the image?'), position ('Is the small red star at the top left of the
    image?'), color ('Is the small star at the top left red?'), shape ('Is the small red object at the top left a
    star?') and texture ('Is the small red star at the top left striped?'); the first four are MME's perception
    subtasks the world can pose (YES_NO_KINDS).

    `size` ("large" or "small") asks about an object of that size only — the large ones are what captions
    describe (primary), the small ones what they never mention (details); None draws among all objects, so the
    details (3-6 of a scene's 4-8 objects) are asked about more often than not. The wrong value of the
    No-question is always one the scene could hold: a count in the range of that size, a colour other than the
    background's, an absent object of the same size.
    """
    if size is not None and size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)} or None, got {size!r}")
    objs = [o for o in scene.objects if size in (None, o.size)]
    if not objs:
        raise ValueError(f"scene {scene.id} has no {size} object")
    o = objs[int(rng.integers(len(objs)))]
    at = POSITION_PHRASES[o.cell]
    if kind == "existence":
        present = {(x.size, x.color, x.shape) for x in scene.objects}
        absent = [(o.size, c, sh) for c in COLORS for sh in SHAPES
                  if (o.size, c, sh) not in present and c != scene.background_color]
        s, c, sh = absent[int(rng.integers(len(absent)))]
        yes = f"Is there {article(o.size)} {o.size} {o.color} {o.shape} in the image?"
        no = f"Is there {article(s)} {s} {c} {sh} in the image?"
    elif kind == "count":
        size_ = size or SIZES[int(rng.integers(len(SIZES)))]
        n = len(_unique(scene, size=size_))
        lo, hi = _COUNTS[size_]
        wrong = [k for k in range(lo, hi + 1) if k != n]
        m = wrong[int(rng.integers(len(wrong)))]
        yes = f"{_count_phrase(n, size_)} in the image?"
        no = f"{_count_phrase(m, size_)} in the image?"
    elif kind == "position":
        # Not where a twin (same size, colour and shape) is: the No-question would be true.
        twins = {x.cell for x in _unique(scene, size=o.size, color=o.color, shape=o.shape)}
        others = [c for c in CELLS if c not in twins]
        wrong = others[int(rng.integers(len(others)))]
        yes = f"Is the {o.size} {o.color} {o.shape} {at} of the image?"
        no = f"Is the {o.size} {o.color} {o.shape} {POSITION_PHRASES[wrong]} of the image?"
    elif kind == "color":
        others = [c for c in COLORS if c not in (o.color, scene.background_color)]
        wrong = others[int(rng.integers(len(others)))]
        yes = f"Is the {o.size} {o.shape} {at} {o.color}?"
        no = f"Is the {o.size} {o.shape} {at} {wrong}?"
    elif kind == "shape":
        others = [s for s in SHAPES if s != o.shape]
        wrong = others[int(rng.integers(len(others)))]
        yes = f"Is the {o.size} {o.color} object {at} {article(o.shape)} {o.shape}?"
        no = f"Is the {o.size} {o.color} object {at} {article(wrong)} {wrong}?"
    elif kind == "texture":
        others = [t for t in TEXTURES if t != o.texture]
        wrong = others[int(rng.integers(len(others)))]
        yes = f"Is the {o.size} {o.color} {o.shape} {at} {o.texture}?"
        no = f"Is the {o.size} {o.color} {o.shape} {at} {wrong}?"
    else:
        raise ValueError(f"unknown yes/no kind {kind!r}; expected one of {[*YES_NO_KINDS, 'shape', 'texture']}")
    return f"{yes} {YES_NO_SUFFIX}", f"{no} {YES_NO_SUFFIX}"


# ---------------------------------------------------------------------------------------------------------------
# Corpus and tokenizer
# ---------------------------------------------------------------------------------------------------------------

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
# The chat templates' markers, in every training and evaluation example: one token each (added after the learned
# vocabulary). A 512-entry BPE spends its merges on the world's words and left "###Assistant: " at 10 tokens, so
# the template was ~40 % of a Yes/No example's tokens, and of the compute (docs/base.md point 7).
TEMPLATE_MARKERS: tuple[str, ...] = ("###Human:", "###Assistant:", "<Img>", "</Img>", "[INST]", "[/INST]", "<<SYS>>",
                                     "<</SYS>>")

# The corpus is built from this fixed stream of scenes, so it (and the tokenizer) never changes with params.
_CORPUS_SEED = 20240116
_CORPUS_SCENES = 300


def _vocabulary_lines() -> list[str]:
    """Every single word and phrase of the world, once each, so even rare ones are seen in training."""
    words = [*SHAPES, *COLORS, *TEXTURES, *SIZES, *CELLS, *POSITION_PHRASES.values(), *NUMBER_WORDS, *EDIT_TYPES]
    words += [f"{s}s" for s in SHAPES] + [f"{article(w)} {w}" for w in (*SHAPES, *COLORS, *SIZES)]
    return words


def language_corpus(n_scenes: int = _CORPUS_SCENES) -> list[str]:
    """Text covering everything the world and the synthesis stage can say, deterministic.

    It holds the vocabulary, captions (all templates), every question and answer, yes/no pairs, difference
    sentences for every edit type, all instruction and caption-prompt templates, and the chat markers and
    benchmark phrasing (`###Human:`, `[INST]`, `<Img>`, 'Please answer yes or no.', 'image a', ...).
    """
    lines: list[str] = []
    lines += _vocabulary_lines()
    lines += list(DIFFERENCE_INSTRUCTIONS) + list(CAPTION_PROMPTS) + list(CHAT_AND_BENCHMARK_TEXT)
    for i in range(n_scenes):
        scene = generate_scene(_CORPUS_SEED, i, image_size=64)
        rng = np.random.default_rng([_CORPUS_SEED, i, 1])
        lines.append(caption(scene, template=i))
        # Prompts appear once per sample in the training data, so they appear once per scene here too.
        lines.append(DIFFERENCE_INSTRUCTIONS[i % len(DIFFERENCE_INSTRUCTIONS)])
        lines.append(CAPTION_PROMPTS[i % len(CAPTION_PROMPTS)])
        lines.append(CHAT_AND_BENCHMARK_TEXT[i % 2])
        for qa in questions(scene) + existence_questions(scene, rng):
            lines += [qa.question, qa.answer]
        for kind in ("position", *PERCEPTION_KINDS):
            lines += yes_no_pair(scene, kind, rng, size=SIZES[i % 2])
        # One sentence of each edit type about a random object, with random new attributes.
        o = scene.objects[int(rng.integers(len(scene.objects)))].attrs()
        new_color = COLORS[int(rng.integers(len(COLORS)))]
        new_texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        new_shape = SHAPES[int(rng.integers(len(SHAPES)))]
        for key, value in (("color", new_color), ("texture", new_texture), ("shape", new_shape)):
            if value != o[key]:
                lines.append(difference_sentence("modify", o, {**o, key: value}))
        swapped = {**o, "shape": new_shape, "color": new_color, "texture": new_texture}
        lines.append(difference_sentence("swap", o, swapped))
        lines.append(difference_sentence("delete", o, None))
        cells = scene.empty_cells()
        lines.append(difference_sentence("add", None, {**swapped, "size": "small", "position": cells[0]}))
    return lines


def train_tokenizer(vocab_size: int = 512, extra_texts: Iterable[str] = ()):
    """A byte-level BPE tokenizer trained on `language_corpus()` (+ `extra_texts`), as a transformers tokenizer.

    Special tokens, with ids 0-4 in this order: `<pad>` (pad), `<s>` (bos), `</s>` (eos), `<unk>` (unk) and
    `<image>`, an additional special token that marks where an image goes; after the `vocab_size` learned entries,
    the chat templates' markers (TEMPLATE_MARKERS), one token each. Byte-level BPE can encode any text,
    so `<unk>` is never produced. No BOS/EOS is added automatically: the prompt builder decides. The same
    corpus always gives the same tokenizer. Save it with `save_pretrained(dir)` next to the backbone.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([*language_corpus(), *extra_texts], trainer=trainer)
    tk.add_tokens([AddedToken(m, normalized=False) for m in TEMPLATE_MARKERS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens=[IMAGE_TOKEN],
    )

