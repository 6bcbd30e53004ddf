"""The base stage's held-out Yes/No measurement (metrics/base.json `yes_no`): what is asked, how answers count."""

from __future__ import annotations

import pytest

from cheetah.config import WorldConfig
from cheetah.evaluate.generation import Generator
from cheetah.train.base import YES_NO_KINDS_ASKED, yes_no_accuracy
from cheetah.world import PERCEPTION_KINDS, heldout_scenes


@pytest.fixture(scope="module")
def scenes():
    return list(heldout_scenes(WorldConfig(image_size=32), 3))


@pytest.mark.parametrize("answer, accuracy, yes_share", [("Yes", 50.0, 100.0), ("yes, it is", 50.0, 100.0),
                                                          ("No", 50.0, 0.0), ("A star.", 0.0, 0.0)])
def test_constant_answers_score_as_the_official_parse_says(monkeypatch, tiny_backbone, scenes, answer, accuracy,
                                                            yes_share):
    asked = []

    def constant(self, requests):
        asked.extend(requests)
        return [answer] * len(requests)

    monkeypatch.setattr(Generator, "answer", constant)
    out = yes_no_accuracy(tiny_backbone, scenes)
    # one Yes- and one No-question per scene, object size and kind; every one shows its scene's image
    assert len(asked) == len(scenes) * 2 * len(YES_NO_KINDS_ASKED) * 2
    assert all(len(r.images) == 1 and r.instruction.startswith("<image> ") for r in asked)
    for split in ("primary", "detail"):
        assert out[split]["n"] == len(scenes) * len(PERCEPTION_KINDS) * 2  # position is reported, not scored
        assert out[split]["accuracy"] == accuracy and out[split]["yes_share"] == yes_share
        assert set(out[split]["kinds"]) == set(YES_NO_KINDS_ASKED)
    # MME's parse: "yes" within the first four characters is a Yes; "A star." is neither, so always wrong
    assert all(e["answer"] == answer for e in out["examples"])


def test_questions_are_about_large_objects_for_primary_and_small_for_detail(monkeypatch, tiny_backbone, scenes):
    asked = []
    monkeypatch.setattr(Generator, "answer", lambda self, requests: asked.extend(requests) or ["Yes"] * len(requests))
    yes_no_accuracy(tiny_backbone, scenes)
    counts = [r for r in asked if " objects " in r.instruction]  # count questions name the size too
    assert counts and all(" large " in r.instruction or " small " in r.instruction for r in asked)
    half = len(YES_NO_KINDS_ASKED) * 2
    for k in range(0, len(asked), 2 * half):  # per scene: the large questions, then the small ones
        assert all(" large " in r.instruction for r in asked[k:k + half])
        assert all(" small " in r.instruction for r in asked[k + half:k + 2 * half])


def test_training_yes_no_questions_are_drawn_afresh_about_the_large_objects():
    """The alignment's Yes/No batch (`_yes_no_examples`): questions about the large objects only, balanced, about
    valid images, the same for the same generator state and new at every draw (a fixed set is learned by heart)."""
    import numpy as np

    from cheetah.train.base import _yes_no_examples
    from cheetah.world import generate_scene

    scenes = [generate_scene(0, i) for i in range(20)]
    images, asked = _yes_no_examples(scenes, 300, np.random.default_rng(0))
    assert len(images) == len(asked) == 300 and set(images.tolist()) <= set(range(20))
    assert all(q.startswith("<image> ") and " large " in q and " small " not in q for q, _ in asked)
    answers = [a for _, a in asked]
    assert set(answers) == {"Yes", "No"} and 120 <= answers.count("Yes") <= 180
    again_images, again = _yes_no_examples(scenes, 300, np.random.default_rng(0))
    assert again == asked and again_images.tolist() == images.tolist()
    rng = np.random.default_rng(1)
    first, second = _yes_no_examples(scenes, 50, rng)[1], _yes_no_examples(scenes, 50, rng)[1]
    assert first != second
