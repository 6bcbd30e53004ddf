"""Configuration: the real presets' defaults (the paper's recipe, the official training and evaluation behaviour),
the named decoding setting, and the configuration files shipped in configs/."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from cheetah.config import ConfigError, ModelConfig, load_params

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", ["vicuna-7b", "llama2-7b", "opt-2.7b"])
def test_real_presets_default_to_the_official_behaviour(preset):
    p = load_params(None, [f"model.preset={preset}"])
    assert (p.train.steps, p.train.lr, p.train.synthetic_batch, p.train.caption_batch) == (18_000, 2e-5, 24, 64)
    assert p.train.loss_reduction == "token" and p.train.qformer_dropout is True
    assert p.evaluate.max_new_tokens == 300 and p.evaluate.stop_strings is None  # the stop is the template's end
    assert p.evaluate.do_sample is False and p.evaluate.demon_option_rule == "official"
    # Explicit values win over the preset's.
    p = load_params(None, [f"model.preset={preset}", "train.loss_reduction=sample", "evaluate.max_new_tokens=20"])
    assert p.train.loss_reduction == "sample" and p.evaluate.max_new_tokens == 20


def test_the_embedded_default_keeps_its_behaviour():
    for p in (load_params(None), load_params(REPO / "params.yaml")):
        assert p.train.loss_reduction == "sample" and p.train.qformer_dropout is False
        assert p.evaluate.max_new_tokens == 32 and p.evaluate.generation()["do_sample"] is False


def test_the_named_official_demon_decoding_decides_decoding_and_is_seeded():
    # params.yaml spells out every decoding field; the named setting still decides them (the seed stays settable)
    p = load_params(REPO / "params.yaml", ["evaluate.decoding=official-demon"])
    assert p.evaluate.generation() == {"max_new_tokens": 300, "do_sample": True, "seed": 0, "temperature": 1.0,
                                       "top_p": 0.9, "top_k": 50, "stop_strings": None}
    assert load_params(None, ["evaluate.decoding=official-demon", "evaluate.seed=7"]).evaluate.generation()["seed"] == 7
    with pytest.raises(ConfigError, match="evaluate.decoding"):
        load_params(None, ["evaluate.decoding=beam"])
    with pytest.raises(ConfigError, match="train.loss_reduction"):
        load_params(None, ["train.loss_reduction=batch"])


@pytest.mark.parametrize("path", [REPO / "configs" / "vicuna-7b.yaml", REPO / "configs" / "llama2-7b.yaml"],
                         ids=lambda p: p.name)
def test_shipped_configs_load(path):
    p = load_params(path)
    assert p.model.preset in ("vicuna-7b", "llama2-7b") and p.model.template == p.model.preset.split("-")[0]
    assert p.train.loss_reduction == "token" and p.evaluate.max_new_tokens == 300


def test_template_names_are_the_prompt_templates():
    from cheetah.model.prompts import TEMPLATES

    names = typing.get_args(typing.get_args(typing.get_type_hints(ModelConfig)["template"])[0])
    assert set(names) == set(TEMPLATES)


def test_the_study_arms_are_defined_once():
    """One Literal (cheetah.config.StudyArm): the tuple, the config's accepted values, study.py's table and the CLI's
    choices all come from it."""
    from typing import get_args

    from cheetah.cli import build_parser
    from cheetah.config import STUDY_ARMS, StudyArm, StudyConfig
    from cheetah.study import ARMS

    assert STUDY_ARMS == get_args(StudyArm) == tuple(ARMS) and len(STUDY_ARMS) == 5
    assert StudyConfig().arms == list(STUDY_ARMS)
    with pytest.raises(ConfigError, match="study.arms.0: Input should be 'base'"):
        load_params(None, ["study.arms=[bogus]"])
    study = build_parser()._subparsers._group_actions[0].choices["study"]
    arms = next(a for a in study._actions if a.dest.endswith("arms"))
    assert tuple(arms.choices) == STUDY_ARMS
    assert all(arm in study.description for arm in STUDY_ARMS)
