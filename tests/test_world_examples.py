"""The base stage's examples and object tokens (cheetah/train/world_examples.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cheetah.train.language import language_example
from cheetah.train.world_examples import (ObjectTokens, difference_example, object_phrases,
                                          primary_questions)
from cheetah.world import IMAGE_TOKEN, generate_scene, train_tokenizer
from cheetah.world.scene import N_LARGE, N_SMALL


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(512)


def test_object_tokens_are_the_summed_words_of_every_object_and_the_background(tokenizer):
    scene = generate_scene(0, 7)
    tokens = ObjectTokens(tokenizer, 8)
    embedding = torch.randn(len(tokenizer), 16, dtype=torch.float64)
    out = tokens.embed([scene, scene], embedding, np.random.default_rng(0))
    assert out.shape == (16, 16)

    def summed(phrase: str) -> torch.Tensor:
        return embedding[tokenizer(phrase, add_special_tokens=False)["input_ids"]].sum(0)

    expected = [summed(p) for p in object_phrases(scene)] + [embedding[tokenizer.pad_token_id]] * (
        8 - len(scene.objects) - 1)
    for image in (out[:8], out[8:]):  # every thing once, in a random order of its own per image
        remaining = list(expected)
        for row in image:
            k = next(i for i, e in enumerate(remaining) if torch.allclose(e, row))
            remaining.pop(k)
    assert not torch.equal(out[:8], out[8:])
    assert object_phrases(scene)[0].startswith(("large ", "small "))
    assert object_phrases(scene)[-1].endswith(" background")


def test_every_scene_and_its_edits_fit_the_visual_prompt(tokenizer):
    # at most N_LARGE + N_SMALL objects, one more after an `add` edit, and the background: 8 tokens
    assert N_LARGE[1] + N_SMALL[1] + 1 + 1 <= 8
    rng = np.random.default_rng(0)
    tokens = ObjectTokens(tokenizer, 8)
    scenes = [generate_scene(5, i) for i in range(50)]
    for k in range(200):
        example = language_example(scenes[k % len(scenes)], rng)
        assert example.instruction.count(IMAGE_TOKEN) == len(example.scenes)
        tokens.embed(example.scenes, torch.zeros(len(tokenizer), 4), rng)
    with pytest.raises(ValueError, match="more than the 3 tokens"):
        ObjectTokens(tokenizer, 3).embed(scenes[:1], torch.zeros(len(tokenizer), 4), rng)


def test_examples_are_about_what_they_say(tokenizer):
    rng = np.random.default_rng(0)
    scene = generate_scene(0, 3)
    assert all(" large " in e.instruction or "background" in e.instruction for e in primary_questions(scene))
    for size in ("large", "small"):
        example = difference_example(scene, rng, size)
        assert len(example.scenes) == 2 and example.scenes[0] is scene
        assert f" {size} " in f" {example.response} "
