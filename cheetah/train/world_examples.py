"""What the language model learns from (the language and base stages): examples about world scenes, and scenes as
object tokens.

An example is an instruction with one `<image>` per scene it shows, the scenes, and the response. The same example
can show its scenes two ways:

- as **object tokens** (`ObjectTokens`): each thing in the scene — every object, large or small, and the
  background — is one input vector, the sum of the embeddings of the words that name it ("small red striped star at
  the top left"), in random order, padded to the visual prompt's length. This is the language stage's input: with
  it, the language model learns the world's language and every answer form about every object, as an
  instruction-tuned LLM knows them before it is given eyes. It stands in for Vicuna's general reading: whatever a
  visual prompt encodes, the language model can talk about.
- as **visual prompts**, the Q-Former's output for the scene's rendered image, projected (the base stage's alignment
  phase, and every later stage). The caption-trained Q-Former keeps the large objects and drops the small ones, so
  the same language model, given pixels, misses the details: the gap VPG-C closes.

Every builder draws from a numpy Generator only, so the same seed gives the same examples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from cheetah.formats import IMAGE_TOKEN
from cheetah.world import (
    CAPTION_PROMPTS,
    DIFFERENCE_INSTRUCTIONS,
    PERCEPTION_KINDS,
    Scene,
    caption,
    edit_scene,
    questions,
    where,
    yes_no_pair,
)
from cheetah.world.language import CAPTION_TEMPLATES

YES_NO_KINDS_ASKED = (*PERCEPTION_KINDS, "position")
"""The Yes/No questions the base learns and is measured on: what captions cover, and where a thing is."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One training example: `instruction` holds one `<image>` per scene of `scenes`, in order."""

    instruction: str
    response: str
    scenes: tuple[Scene, ...]


def primary_questions(scene: Scene) -> list[Example]:
    """Open questions about what a caption covers: the large objects (colour, shape, texture, where), how many
    there are, and the background."""
    return [Example(f"{IMAGE_TOKEN} {qa.question}", qa.answer, (scene,)) for qa in questions(scene)
            if qa.kind == "background" or " large " in f" {qa.question} "]


def caption_example(scene: Scene, rng: np.random.Generator) -> Example:
    prompt = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
    return Example(prompt, caption(scene, int(rng.integers(len(CAPTION_TEMPLATES)))), (scene,))


def yes_no_example(scene: Scene, rng: np.random.Generator, size: str | None) -> Example:
    """A Yes/No question (MME's form) of a random kind about an object of `size` (None: either size), its answer
    Yes or No at random."""
    kind = YES_NO_KINDS_ASKED[int(rng.integers(len(YES_NO_KINDS_ASKED)))]
    pair = yes_no_pair(scene, kind, rng, size=size)
    k = int(rng.integers(2))
    return Example(f"{IMAGE_TOKEN} {pair[k]}", ("Yes", "No")[k], (scene,))


def difference_example(scene: Scene, rng: np.random.Generator, size: str) -> Example:
    """The scene beside one visible edit of one of its objects of `size`, with a difference instruction placed after
    the images or before them (DEMON's layout), and the sentence that describes the edit."""
    edited, sentence = edit_scene(scene, rng, size=size)
    instruction = DIFFERENCE_INSTRUCTIONS[int(rng.integers(len(DIFFERENCE_INSTRUCTIONS)))]
    if rng.random() < 0.5:
        images, _, ask = instruction.rpartition(IMAGE_TOKEN)
        instruction = f"{ask.strip()} {images}{IMAGE_TOKEN}"
    return Example(instruction, sentence, (scene, edited))


def named_caption_example(scene: Scene, other: Scene, rng: np.random.Generator) -> Example:
    """Two images, and a caption of the one the instruction names: the instruction, not the number of images,
    decides what an answer is about."""
    which = int(rng.integers(2))
    shown = (scene, other)
    return Example(f"{IMAGE_TOKEN} {IMAGE_TOKEN} Describe the {('first', 'second')[which]} image briefly.",
                   caption(shown[which], int(rng.integers(len(CAPTION_TEMPLATES)))), shown)


def object_phrases(scene: Scene) -> list[str]:
    """What an object token names: every object with its position, then the background."""
    background = scene.background_color if scene.background_texture == "plain" else \
        f"{scene.background_color} {scene.background_texture}"
    return [where(o.attrs()) for o in scene.objects] + [f"{background} background"]


class ObjectTokens:
    """Scenes as object tokens: one vector per object and the background, each the sum of its words' input
    embeddings, in random order, padded with the pad token's embedding to `num_tokens` (the visual prompt's
    length). Differentiable in the embedding table, which learns with the language model."""

    def __init__(self, tokenizer, num_tokens: int):
        self.tokenizer = tokenizer
        self.num_tokens = num_tokens
        self._ids: dict[str, list[int]] = {}

    def _phrase_ids(self, phrase: str) -> list[int]:
        if phrase not in self._ids:
            self._ids[phrase] = self.tokenizer(phrase, add_special_tokens=False)["input_ids"]
        return self._ids[phrase]

    def embed(self, scenes: Sequence[Scene], embedding: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """(len(scenes) x num_tokens, H): the object tokens of every scene, in order."""
        ids, offsets = [], []
        for scene in scenes:
            phrases = object_phrases(scene)
            if len(phrases) > self.num_tokens:
                raise ValueError(f"scene {scene.id} has {len(phrases)} things to name, more than the "
                                 f"{self.num_tokens} tokens of a visual prompt")
            slots: list[list[int]] = [self._phrase_ids(p) for p in phrases]
            slots += [[self.tokenizer.pad_token_id]] * (self.num_tokens - len(slots))
            for k in rng.permutation(self.num_tokens):
                offsets.append(len(ids))
                ids.extend(slots[k])
        return torch.nn.functional.embedding_bag(torch.tensor(ids), embedding, torch.tensor(offsets), mode="sum")
