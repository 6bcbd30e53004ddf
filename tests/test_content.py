"""Content scores (cheetah/evaluate/content.py) on constructed answers: exactly right, constant, template only,
right object with the wrong change, and every edit type the world produces."""

from __future__ import annotations

import numpy as np
import pytest

from cheetah.evaluate.content import (caption_chosen, change_scores, content_summary, option_named, read_change,
                                      sample_content, value_named)
from cheetah.world import edit_scene, generate_scene
from cheetah.world.language import difference_sentence


def _edits(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [edit_scene(generate_scene(3, i), rng, size=("small", "large")[i % 2])[1] for i in range(n)]


def test_every_world_difference_sentence_reads_back_and_scores_itself_right():
    sentences = _edits(200)
    assert {read_change(s).edit for s in sentences} == {"modify", "swap", "delete", "add"}
    for s in sentences:
        assert change_scores(s, s) == {"object": True, "change": True, "content": True, "position": True}
        # the Story task's form, punctuation and case do not matter
        assert change_scores(s.replace("In the second image", "in the next image").upper().rstrip("."), s)["content"]


def test_constant_and_template_answers_score_near_nothing():
    sentences = _edits(200)
    constant = sentences[0]
    scores = content_summary([change_scores(constant, s) for s in sentences])
    assert scores["content"] < 5 and scores["object"] < 5
    template = "In the second image, the object is now different."
    assert content_summary([change_scores(template, s) for s in sentences]) == {"object": 0, "change": 0, "position": 0,
                                                                                 "content": 0, "n": 200}
    assert change_scores("", sentences[0])["content"] is False


def test_the_object_and_the_change_are_judged_apart():
    before = {"size": "small", "color": "red", "texture": "striped", "shape": "star", "position": "bottom"}
    truth = difference_sentence("modify", before, {**before, "color": "blue"})
    wrong_value = difference_sentence("modify", before, {**before, "color": "green"})
    assert change_scores(wrong_value, truth) == {"object": True, "change": False, "content": False, "position": True}
    moved = difference_sentence("modify", {**before, "position": "top"}, {**before, "position": "top",
                                                                          "color": "blue"})
    assert change_scores(moved, truth) == {"object": False, "change": True, "content": False, "position": False}
    # the size and texture words are not what identifies the object: its position, colour and shape are
    large = difference_sentence("modify", {**before, "size": "large", "texture": "plain"},
                                {**before, "size": "large", "texture": "plain", "color": "blue"})
    assert change_scores(large, truth)["content"]
    assert change_scores(difference_sentence("delete", before, None), truth) == {"object": True, "change": False, "position": True,
                                                                                 "content": False}
    with pytest.raises(ValueError, match="not a difference sentence"):
        change_scores(truth, "a picture of a red star")


def test_option_tasks_need_the_right_option_and_no_other():
    options = ["the first image", "the second image", "the third image", "the fourth image"]
    assert option_named("The second image.", "the second image", options)
    assert not option_named("the second image or the first image", "the second image", options)
    assert not option_named("the image", "the second image", options)
    assert sample_content("World_ImageCloze", "Image C", "Image C", None)["content"]
    assert not sample_content("World_ImageCloze", "Image C and Image D", "Image C", None)["content"]
    assert sample_content("World_PropertyCoherence", "Yes, it is.", "yes", ["yes", "no"])["content"]
    assert not sample_content("World_PropertyCoherence", "yes or no", "yes", ["yes", "no"])["content"]


def test_text_cloze_needs_the_words_that_tell_the_options_apart():
    truth = "a large red circle on a blue background"
    options = [truth, "a large green circle on a blue background", "a large red star on a blue background",
               "a large red circle on a pink background"]
    assert caption_chosen(truth, truth, options)
    assert caption_chosen("red circle, blue background", truth, options)
    assert not caption_chosen(options[1], truth, options)
    assert not caption_chosen("a picture of an object", truth, options)


def test_dialogue_answers_need_the_value_and_no_other_of_its_kind():
    assert value_named("red", "red") and value_named("It is red.", "red")
    assert not value_named("red or blue", "red")
    assert value_named("top left", "top left") and not value_named("top", "top left")
    assert not value_named("top left", "top")
    assert value_named("four", "four") and not value_named("three", "four")
    with pytest.raises(ValueError, match="not a value"):
        value_named("x", "a picture")
