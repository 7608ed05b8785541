"""Command-line flags and YAML config files from the config dataclasses.

Each setting is defined once, as a dataclass field with its default and, in ``metadata``, its help
(as ``transformers.HfArgumentParser`` reads ``DPOConfig``). The app, ``python -m trainer`` and the
benches add the fields they expose with ``add_flags`` and build the dataclass back with
``from_flags``, so a default or a help text cannot drift between them.

A field ``learning_rate`` becomes ``--learning-rate``, typed from its annotation (``X | None``
takes an X; ``bool`` is an on/off pair). Metadata keys: ``help``; ``flags`` (the option strings,
when not the field's name, e.g. ``["--round-every-votes"]``); ``choices``; ``env`` (a variable that overrides the
default); ``split`` (a string flag split shell-like into the field's list).

``--config FILE.yaml`` (``parse``) sets any flag of the parser by its name (``learning-rate`` or
``learning_rate``). Precedence: the command line, then the file, then the environment, then the
dataclass default. An unknown key or a value outside a flag's choices is refused by name.

This module sits in ``storage`` (the bottom layer) only so that every package may use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import types
import typing
from pathlib import Path
from typing import Any


def _flag_type(hint: Any) -> tuple[Any, bool]:
    """(the argparse type, whether it is a bool) for a field's resolved annotation."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _flag_type(args[0]) if len(args) == 1 else (str, False)
    if hint is bool:
        return None, True
    if hint in (int, float, str, Path):
        return hint, False
    return str, False  # lists and the rest arrive as text (see metadata "split")


def _option_strings(f: dataclasses.Field) -> list[str]:
    return list(f.metadata.get("flags") or [f"--{f.name.replace('_', '-')}"])


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
              only: list[str] | None = None, exclude: tuple[str, ...] = ()) -> None:
    """Add a flag for each field of ``cls`` (those in ``only``, if given, minus ``exclude``).
    Fields without a help text are not settings and get no flag."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or (only is not None and f.name not in only) or "help" not in f.metadata:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        env = f.metadata.get("env")
        if env and os.environ.get(env) is not None:
            default = os.environ[env]
        if isinstance(default, list):
            default = shlex.join(default)
        kind, is_bool = _flag_type(hints[f.name])
        help_text = f.metadata["help"] + (f" (env {env})" if env else "")
        if is_bool:
            parser.add_argument(*_option_strings(f), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        else:
            parser.add_argument(*_option_strings(f), dest=f.name, type=kind, default=default,
                                choices=f.metadata.get("choices"), help=help_text)


def from_flags(cls: type, ns: argparse.Namespace, **fixed: Any) -> Any:
    """Build ``cls`` from the parsed flags (fields without a flag keep their default); ``fixed``
    fields are given by the caller (a nested config, a value the caller resolved)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in fixed or not hasattr(ns, f.name) or "help" not in f.metadata:
            continue
        value = getattr(ns, f.name)
        if f.metadata.get("split") and isinstance(value, str):
            value = shlex.split(value)
        values[f.name] = value
    return cls(**values, **fixed)


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args`` with ``--config FILE.yaml``: the file's keys become the defaults of the
    flags they name, so the command line still wins."""
    import yaml

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    known, _ = pre.parse_known_args(argv)
    for p in _parsers(parser):  # before or after a subcommand
        if not any("--config" in a.option_strings for a in p._actions):
            p.add_argument("--config", type=Path, default=known.config, metavar="FILE.yaml",
                           help="read settings from this YAML file (keys: flag names); flags given on the "
                           "command line win")
    if known.config is not None:
        try:
            data = yaml.safe_load(known.config.read_text()) or {}
        except OSError as e:
            parser.error(f"--config {known.config}: cannot read it ({e.strerror or e})")
        except yaml.YAMLError as e:
            parser.error(f"--config {known.config}: not valid YAML ({e})")
        if not isinstance(data, dict):
            parser.error(f"--config {known.config}: expected a mapping of flag names to values")
        _apply(parser, data, known.config)
    return parser.parse_args(argv)


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser and its subcommands' parsers (a subcommand's defaults win over its parent's)."""
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                out += _parsers(sub)
    return out


def _apply(parser: argparse.ArgumentParser, data: dict[str, Any], path: Path) -> None:
    parsers = _parsers(parser)
    found: set[str] = set()
    for p in parsers:
        values = _defaults_from(p, data, path)
        found |= set(values)
        p.set_defaults(**{action.dest: value for action, value in values.values()})
    unknown = [k for k in data if str(k) not in found]
    if unknown:
        known = sorted({a.option_strings[0][2:] for p in parsers for a in p._actions
                        if a.option_strings and a.dest not in ("help", "config")})
        parser.error(f"--config {path}: unknown setting {unknown[0]!r}; known: {', '.join(known)}")


def _defaults_from(parser: argparse.ArgumentParser, data: dict[str, Any],
                   path: Path) -> dict[str, tuple[argparse.Action, Any]]:
    """The file's keys that name a flag of this parser, checked and typed: key -> (flag, value)."""
    by_name: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in ("help", "config") or not action.option_strings:
            continue
        for opt in action.option_strings:
            if opt.startswith("--"):
                by_name[opt[2:]] = action
                by_name[opt[2:].replace("-", "_")] = action
    out: dict[str, tuple[argparse.Action, Any]] = {}
    for key, value in data.items():
        action = by_name.get(str(key))
        if action is None:
            continue
        if isinstance(value, list) and action.type is not None and action.default != []:
            value = shlex.join(str(v) for v in value)  # a launcher given as a YAML list
        if action.type is not None and value is not None and not isinstance(value, bool):
            try:
                value = [action.type(v) for v in value] if isinstance(value, list) else action.type(value)
            except (TypeError, ValueError) as e:
                parser.error(f"--config {path}: {key}: {value!r} is not valid ({e})")
        if action.choices is not None and value not in action.choices:
            parser.error(f"--config {path}: {key}: {value!r} is not one of {list(action.choices)}")
        if action.default == [] and not isinstance(value, list):  # a flag that may be repeated
            value = [value]
        out[str(key)] = (action, value)
    return out


def setting(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
            **meta: Any) -> Any:
    """A dataclass field that is a user setting: its default, its help, and the metadata above."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})
