"""Command-line options generated from the typed config (cheetah/config.py), so the CLI does not declare them again.

Every field of the sections a command reads becomes an option `--section.field` whose help text is the field's
docstring; a few keep a short name as well (`cheetah train --steps 10` is `--train.steps 10`), the names dvc.yaml,
the docs and scripts use. Values are YAML, as in `--set` (`--train.betas 0.9 0.99`, `--train.feature_cache null`);
`overrides` turns the options given into `section.key=value` overrides applied after `--set`, and pydantic checks
them as it checks params.yaml (a wrong value is a `ConfigError` naming the key: exit 2).
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from cheetah.config import ConfigError, Params

PREFIX = "config:"
"""Namespace attributes of generated options: `config:train.steps` (dots cannot clash with other options)."""


def section_class(section: str) -> Any:
    """The dataclass of one section of `params.yaml` (`train` -> TrainConfig)."""
    try:
        return Params.__pydantic_fields__[section].annotation
    except KeyError:
        raise ValueError(f"no config section {section!r}") from None


def _shape(annotation: Any) -> tuple[str, tuple[str, ...]]:
    """("list" | "bool" | "value", the accepted values as they are typed, when the type is a Literal) of a field."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return "list", _shape(args[0])[1] if args else ()
    if annotation is bool:
        return "bool", ()
    if origin is typing.Literal:
        return "value", tuple(str(a) for a in args)
    if origin in (typing.Union, types.UnionType) and type(None) in args:  # X | None
        kind, choices = _shape(next(a for a in args if a is not type(None)))
        return kind, (*choices, "null") if choices else ()
    return "value", ()


def add_config_options(parser: argparse.ArgumentParser, sections: Sequence[str],
                       aliases: Mapping[str, str] | None = None) -> None:
    """One option per field of `sections` ("train": every field of the section, "train.steps": that field), a group
    per section; `aliases` maps a short name (`steps`) to the key it also sets (`train.steps`)."""
    short: dict[str, list[str]] = {}
    for name, key in (aliases or {}).items():
        short.setdefault(key, []).append(f"--{name}")
    fields: dict[str, list[str]] = {}
    for spec_ in sections:  # "train" (every field) or "train.steps" (that one)
        section, _, field = spec_.partition(".")
        fields.setdefault(section, []).extend([field] if field else list(section_class(section).__pydantic_fields__))
    for section, names in fields.items():
        cls = section_class(section)
        group = parser.add_argument_group(f"{section} (params.yaml; an option here wins over --set)",
                                          (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None)
        for field in names:
            info = cls.__pydantic_fields__[field]
            key = f"{section}.{field}"
            kind, choices = _shape(info.annotation)
            spec: dict[str, Any] = {"dest": PREFIX + key, "default": None,
                                    "help": (info.description or "").replace("%", "%%")}
            if choices:
                spec["choices"] = choices
            if kind == "list":
                spec.update(nargs="+", metavar=None if choices else "VALUE")
            elif kind == "bool":
                spec.update(nargs="?", const="true", metavar="true|false")
            elif not choices:
                spec["metavar"] = "VALUE"
            group.add_argument(f"--{key}", *short.pop(key, []), **spec)
    if short:
        raise ValueError(f"aliases of keys not among the sections {list(sections)}: {sorted(short)}")


def _value(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--{key} {text!r}: not a YAML value ({e})") from None


def overrides(args: argparse.Namespace) -> list[str]:
    """The generated options that were given, as `section.key=value` overrides (JSON values)."""
    out = []
    for dest, given in vars(args).items():
        if not dest.startswith(PREFIX) or given is None:
            continue
        key = dest[len(PREFIX):]
        value = [_value(v, key) for v in given] if isinstance(given, list) else _value(given, key)
        out.append(f"{key}={json.dumps(value)}")
    return out
