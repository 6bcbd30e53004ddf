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


def _commands(parser, path=()):
    """(command path, parser) of every command and subcommand of the CLI."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def test_every_option_of_every_command_has_help_and_the_config_options_come_from_the_config():
    """`cheetah <command> --help` documents every option (a field's option has the field's docstring), and no
    argparse internals (dest names, suppressed defaults) show."""
    import argparse

    from cheetah.cli import STAGE_SECTIONS, build_parser
    from cheetah.options import PREFIX, section_class

    commands = dict(_commands(build_parser()))
    assert len(commands) > 20
    for path, parser in commands.items():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:  # (--local_rank, which DeepSpeed's launcher passes: hidden)
                continue
            assert action.help and action.help.strip(), (path, action.option_strings or action.dest)
            if action.dest.startswith(PREFIX):
                section, field = action.dest[len(PREFIX):].split(".")
                assert action.help == section_class(section).__pydantic_fields__[field].description.replace("%", "%%")
                assert f"--{section}.{field}" in action.option_strings
        text = parser.format_help()
        for leak in ("_AFTER", "==SUPPRESS==", PREFIX):
            assert leak not in text, (path, leak)
    # Each stage's command has an option for every field of the sections it reads (the ones DVC passes included).
    for stage, sections in STAGE_SECTIONS.items():
        dests = {a.dest for a in commands[(stage,)]._actions}
        for spec in sections:
            section, _, field = spec.partition(".")
            fields = [field] if field else list(section_class(section).__pydantic_fields__)
            assert {f"{PREFIX}{section}.{f}" for f in fields} <= dests, stage


def test_config_options_and_their_short_names_override_params_and_set(tmp_path):
    """`--section.field` and a kept short name set the key (YAML values, lists, booleans), win over --set, and a wrong
    value is a ConfigError naming the key."""
    from cheetah.cli import _params, build_parser

    parse = build_parser().parse_args
    args = parse(["train", "--set", "train.steps=5", "--steps", "7", "--train.betas", "0.8", "0.9",
                  "--model.random_backbone", "--train.feature_cache", "null", "--zero-stage", "3"])
    p = _params(args)
    assert (p.train.steps, p.train.betas, p.model.random_backbone, p.train.feature_cache, p.train.zero_stage) == \
        (7, (0.8, 0.9), True, None, 3)
    assert _params(parse(["study", "--seeds", "4", "5", "--arms", "blind"])).study.seeds == [4, 5]
    with pytest.raises(ConfigError, match="train.lr"):
        _params(parse(["train", "--train.lr", "-1"]))
    with pytest.raises(SystemExit):  # a Literal's values are the option's choices
        parse(["train", "--precision", "fp8"])


def test_values_that_would_make_a_check_or_a_seed_meaningless_are_refused(capsys):
    from cheetah.cli import main

    with pytest.raises(ConfigError, match=r"train\.steps: expected a number, got the boolean True"):
        load_params(None, ["train.steps=true"])  # pydantic alone would train one step
    assert load_params(None, ["evaluate.heldout_differences=true"]).evaluate.heldout_differences is True
    with pytest.raises(ConfigError, match=r"seeds must be 0 or more .*\[0, -1\]"):
        load_params(None, ["study.seeds=[0, -1]"])
    for bad in ("nan", "inf", "-0.1", "x"):  # NaN would make every reproduced metric "equal"
        with pytest.raises(SystemExit) as e:
            main(["pipeline", "check", "--tolerance", bad])
        assert e.value.code == 2 and "argument --tolerance" in capsys.readouterr().err



def test_the_training_and_evaluation_stages_run_on_their_parameters_thread_count(monkeypatch):
    """base, train and evaluate compute on `<section>.threads` torch threads whatever the process had (the machine's
    core count, OMP_NUM_THREADS), and give the previous count back: the same parameters, the same numbers."""
    import torch

    from cheetah.evaluate import run as evaluate_run
    from cheetah.train import base, vpgc

    seen = []
    monkeypatch.setattr(base, "pretrain_base", lambda p: seen.append(torch.get_num_threads()) or {})
    monkeypatch.setattr(vpgc, "_train", lambda p, restart: seen.append(torch.get_num_threads()))
    monkeypatch.setattr(evaluate_run, "_evaluate_locked", lambda p, *a: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        p = load_params(None, ["base.threads=1", "train.threads=2", "evaluate.threads=1"])
        base.base_stage(p)
        vpgc.train_vpgc(p)
        evaluate_run.evaluate(p)
        assert seen == [1, 2, 1] and torch.get_num_threads() == 3
        base.base_stage(load_params(None))  # None: as the process has it
        assert seen[-1] == 3
    finally:
        torch.set_num_threads(before)
