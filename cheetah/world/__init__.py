"""The embedded procedural world: scenes, rendering, masks, captions, questions and the tokenizer.

Public API:
    generate_scene(seed, index, image_size=64, scene_id=None) -> Scene
    render(scene) -> Rendered(image: PIL.Image, masks: {object name: bool array})
    png_bytes(image) -> bytes                         deterministic PNG encoding
    caption(scene, template=0) -> str                 primary objects and background only
    questions(scene) -> list[QA]; sample_question(scene, rng) -> QA; existence_questions(scene, rng)
    yes_no_pair(scene, kind, rng, size=None) -> (yes_question, no_question)   MME-style
    difference_sentence(edit_type, before, after) -> str
    apply_edit(scene, edit_type, rng, target=, cell=, size=) -> (edited, before, after); edit_scene(scene, rng, size)
    language_corpus() -> list[str]; train_tokenizer(vocab_size=512) -> PreTrainedTokenizerFast
    write_corpus(cfg: WorldConfig) -> Path            `cheetah world`
    corpus_scene(cfg, index) -> Scene; heldout_scenes(cfg, n, start=0) -> Iterator[Scene]
    read_scenes(path) -> {id: Scene}
"""

from cheetah.world.corpus import corpus_caption, corpus_scene, heldout_scenes, read_scenes, write_corpus
from cheetah.world.edit import apply_edit, edit_scene
from cheetah.world.language import (
    CAPTION_PROMPTS,
    DIFFERENCE_INSTRUCTIONS,
    EDIT_TYPES,
    IMAGE_TOKEN,
    PERCEPTION_KINDS,
    POSITION_PHRASES,
    QA,
    SPECIAL_TOKENS,
    YES_NO_KINDS,
    caption,
    describe,
    difference_sentence,
    existence_questions,
    language_corpus,
    questions,
    sample_question,
    train_tokenizer,
    where,
    yes_no_pair,
)
from cheetah.world.render import Rendered, cell_mask, footprint, png_bytes, render
from cheetah.world.scene import CELLS, COLORS, PALETTE, SHAPES, SIZES, TEXTURES, Obj, Scene, generate_scene

__all__ = [
    "CAPTION_PROMPTS", "CELLS", "COLORS", "DIFFERENCE_INSTRUCTIONS", "EDIT_TYPES", "IMAGE_TOKEN", "PALETTE", "PERCEPTION_KINDS",
    "POSITION_PHRASES", "QA", "SHAPES", "SIZES", "SPECIAL_TOKENS", "TEXTURES", "YES_NO_KINDS", "Obj", "Rendered",
    "Scene", "apply_edit", "caption", "cell_mask", "corpus_caption", "corpus_scene", "describe", "difference_sentence", "edit_scene",
    "existence_questions", "footprint", "generate_scene", "heldout_scenes", "language_corpus", "png_bytes",
    "questions", "read_scenes", "render", "sample_question", "train_tokenizer", "where", "write_corpus",
    "yes_no_pair",
]
