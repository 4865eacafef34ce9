"""The engine's CLI flags, derived from the knobs of ``cadenza.config`` (never restated here).

``add_engine_arguments(parser)`` offers every knob as a flag: ``--`` plus its option name with
dashes (``block_size`` → ``--block-size``), a knob's own ``flag`` when it has one, and for a
boolean that defaults to on, ``--no-…`` to turn it off. The dataclass default is the flag's
default, and the argparse dest is the option name, so ``engine_config_from_args(args)`` is
``EngineConfig.from_options`` over the parsed values. A subcommand may change a default with
``parser.set_defaults(kv_host_gib=2.0)`` after adding the flags (``cadenza serve`` does).
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from cadenza.config import CHOICES, FLAG, EngineConfig, Knob, engine_knobs

_GROUP_TITLES = {None: "engine", "cache": "KV cache and tiers", "scheduler": "scheduler"}
_SCALARS = (bool, int, float, str)


def knob_flag(knob: Knob) -> str | None:
    """The knob's CLI flag, or None when it has none."""
    if FLAG in knob.field.metadata:
        return knob.field.metadata[FLAG]
    dashed = knob.option.replace("_", "-")
    return f"--no-{dashed}" if knob.default is True else f"--{dashed}"


def _scalar_type(hint: Any) -> tuple[type, tuple[Any, ...] | None]:
    """(the value type, its Literal choices or None) of a knob's annotation: ``int``,
    ``int | None``, ``Literal["a", "b"]``."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        values = typing.get_args(hint)
        return type(values[0]), values
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return _scalar_type(args[0])
    if hint in _SCALARS:
        return hint, None
    raise TypeError(f"a knob of type {hint!r} cannot be a CLI flag")


def _add(group: argparse._ArgumentGroup, knob: Knob, flag: str, help_text: str) -> None:
    hint = typing.get_type_hints(knob.owner)[knob.name]
    kind, choices = _scalar_type(hint)
    choices = knob.field.metadata.get(CHOICES, choices)
    help_text = help_text.replace("%", "%%")
    if kind is bool:
        if knob.default:
            action, help_text = "store_false", f"turn off: {help_text}"
        else:
            action = "store_true"
        group.add_argument(
            flag, dest=knob.option, action=action, default=knob.default, help=help_text
        )
        return
    if knob.default is not None:  # an unset default is explained by the help text
        help_text += " (default: %(default)s)"
    group.add_argument(
        flag,
        dest=knob.option,
        type=kind,
        default=knob.default,
        choices=choices,
        metavar=None if choices else flag.lstrip("-").replace("-", "_").upper(),
        help=help_text,
    )


def add_engine_arguments(
    parser: argparse.ArgumentParser, help_overrides: Mapping[str, str] | None = None
) -> None:
    """Add a flag for every engine knob, in argument groups by config section;
    ``help_overrides`` (by flag) replace a knob's help where a command defaults it otherwise
    (``cadenza serve`` puts the store and the profiles under ``--data-dir``)."""
    overrides = dict(help_overrides or {})
    groups: dict[str | None, argparse._ArgumentGroup] = {}
    for knob in engine_knobs():
        flag = knob_flag(knob)
        if flag is None:
            continue
        if knob.section not in groups:
            title = _GROUP_TITLES.get(knob.section, str(knob.section))
            groups[knob.section] = parser.add_argument_group(title)
        _add(groups[knob.section], knob, flag, overrides.pop(flag, knob.help))
    if overrides:
        raise ValueError(f"no engine flag {', '.join(sorted(overrides))}")


def engine_options_from_args(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """The flat engine options (``LLM(**options)``) of parsed flags, ``overrides`` on top."""
    options = {k.option: getattr(args, k.option) for k in engine_knobs() if knob_flag(k)}
    options.update(overrides)
    return options


def engine_config_from_args(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """The engine config of parsed flags (``overrides`` take precedence)."""
    return EngineConfig.from_options(**engine_options_from_args(args, **overrides))
