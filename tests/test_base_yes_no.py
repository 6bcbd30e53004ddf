"""The base stage's held-out Yes/No measurement (metrics/base.json `yes_no`, `yes_no_object_tokens`): what is
asked, how answers count; and the Yes/No questions it trains on."""

from __future__ import annotations

import pytest

from cheetah.config import WorldConfig
from cheetah.evaluate.generation import Generator
from cheetah.evaluate.backbone import yes_no_accuracy
from cheetah.train.world_examples import YES_NO_KINDS_ASKED
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


def test_training_yes_no_questions_are_balanced_and_about_the_size_asked():
    """`yes_no_example`: the training's Yes/No questions, drawn afresh (a fixed set is learned by heart): about the
    size asked (the large objects for images, either for object tokens), balanced, the same for the same generator
    state and new at every draw."""
    import numpy as np

    from cheetah.train.world_examples import yes_no_example
    from cheetah.world import generate_scene

    scenes = [generate_scene(0, i) for i in range(300)]

    def draw(rng, size):
        return [yes_no_example(s, rng, size) for s in scenes]

    large = draw(np.random.default_rng(0), "large")
    assert all(e.instruction.startswith("<image> ") and " large " in e.instruction and " small " not in e.instruction
               and e.scenes == (s,) for e, s in zip(large, scenes))
    answers = [e.response for e in large]
    assert set(answers) == {"Yes", "No"} and 120 <= answers.count("Yes") <= 180
    either = draw(np.random.default_rng(0), None)
    assert sum(" small " in e.instruction for e in either) > 100
    assert draw(np.random.default_rng(0), "large") == large
    rng = np.random.default_rng(1)
    assert draw(rng, "large") != draw(rng, "large")
