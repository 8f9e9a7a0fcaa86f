"""Command-line flags and config files, both derived from a command's config dataclass.

Every command (``longcat-prep <command>``, ``longcat-train``, ``longcat-sample``) is one dataclass whose
fields declare themselves with :func:`option`: help, choices, aliases, the SimpleTuner key. From it:

- :func:`add_flags`: ``--field-name`` and ``--field_name`` (SimpleTuner's spelling) per field plus its
  aliases; booleans as ``--x`` / ``--no-x``; lists take several values (or repeat the flag, ``repeat``);
  ``positional`` fields are positional arguments.
- :func:`parse`: the flags typed on the command line over a base (a config file's values) over the field
  defaults: only flags actually given override the file.
- :func:`from_dict` / :func:`read_config_file`: TOML or JSON files with the same keys (or their aliases);
  an unknown key is refused naming the closest known one.
- :func:`simpletuner_keys`: SimpleTuner key -> field, for the commands that read SimpleTuner configs.
- :func:`config_errors` / :func:`check_config`: every field's value against its annotation (values from
  files are not typed by argparse), its choices and its declared ``check`` (:class:`Check`: ranges,
  grids, paths); :func:`parse` and :func:`from_dict` run it on the configs they build.
- :func:`parse_area` and :func:`parse_size`: the value parsers all commands share.

One small builder over argparse, not a library such as tyro: flags here also answer to SimpleTuner's
underscore spelling, ``--resume`` takes an optional value, and a file's values are overridden only by
flags that were typed. Imports nothing heavy, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

_NO_CONST = object()


class ConfigError(ValueError):
    """A configuration no run can use; the message names the key (or flag) and the fix."""


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    choices: Iterable[str] | None = None,
    flag: str | None = None,
    aliases: Iterable[str] = (),
    positional: bool = False,
    repeat: bool = False,
    const: Any = _NO_CONST,
    metavar: str | None = None,
    parse: Callable[[str], Any] | None = None,
    simpletuner: str | None = None,
    group: str | None = None,
    check: Check | None = None,
    switch: tuple[str, Any, Any] | None = None,
) -> Any:
    """A config field that is also a flag.

    Args:
        default: the value when neither a file nor a flag gives one (lists and tuples are copied per
            instance). Leave it out for a required (positional) field; ``factory`` computes it instead.
        help: one line for ``--help``; the default is appended.
        choices: the only values accepted.
        flag: the flag's name when it is not ``--field-name`` (a list field ``prompts`` read as ``--prompt``).
        aliases: more flag spellings, e.g. ``("--size",)`` or ``("-o",)``; a file may use them as keys too.
        positional: a positional argument instead of a flag.
        repeat: a list field filled by repeating the flag (``--lora A --lora B``), not by several values.
        const: the value of the flag given without a value (``--resume`` alone means ``latest``).
        parse: turns the flag's text into the value (e.g. :func:`parse_area`); errors become flag errors.
        simpletuner: the key of this setting in a SimpleTuner ``config.json``.
        group: the heading the flag is listed under in ``--help``.
        check: the values allowed beyond the type (:class:`Check`); :func:`config_errors` applies it.
        switch: ``(name, on, off)``: an older boolean spelling of two of the values: ``--name`` sets
            ``on``, ``--no-name`` sets ``off``, and a file's ``name = true / false`` does the same.
    """
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices is not None else None,
        "flag": flag,
        "aliases": tuple(aliases),
        "positional": positional,
        "repeat": repeat,
        "const": const,
        "metavar": metavar,
        "parse": parse,
        "simpletuner": simpletuner,
        "group": group,
        "check": check,
        "switch": switch,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    if isinstance(default, list | tuple) and default is not dataclasses.MISSING:
        kind = type(default)
        return dataclasses.field(default_factory=lambda: kind(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# ---------------------------------------------------------------- value parsers


def parse_area(text: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``"480x832"`` (or ``480*832``, or a pair) -> ``(480, 832)``: a bucket area, height by width."""
    if isinstance(text, tuple | list) and len(text) == 2:
        return int(text[0]), int(text[1])
    match = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", str(text))
    if not match or not int(match.group(1)) or not int(match.group(2)):
        raise ConfigError(f"an area is HxW in pixels (height x width), e.g. 480x832; got {text!r}")
    return int(match.group(1)), int(match.group(2))


def format_area(area: tuple[int, int]) -> str:
    return f"{area[0]}x{area[1]}"


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``'1GB'``, ``'200MB'``, ``'512KiB'``, ``'1e9'`` or an int -> bytes (decimal units, as disks and the hub)."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).upper() if match else ""
        if not match or unit not in _SIZE_UNITS:
            raise ConfigError(f"not a size: {text!r} (examples: 1GB, 200MB, 512KiB)")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ConfigError(f"a size must be positive, got {text!r}")
    return size


# ---------------------------------------------------------------- flags


def flag_names(field: dataclasses.Field) -> list[str]:
    """``--field-name`` (or the declared ``flag``), then ``--field_name`` (SimpleTuner's spelling), then the
    declared aliases."""
    if field.metadata.get("flag"):
        names = [field.metadata["flag"]]
    else:
        names = [f"--{field.name.replace('_', '-')}"] + ([f"--{field.name}"] if "_" in field.name else [])
    return names + [a for a in field.metadata.get("aliases", ()) if a not in names]


def _value_type(annotation: Any) -> tuple[Any, bool]:
    """(the type a flag's text becomes, whether the field is a list)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _flag_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return ""
    if value is None or value == [] or value == ():
        return ""
    if isinstance(value, list):
        value = " ".join(map(str, value))
    elif isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        value = format_area(value)
    return f" [default: {value}]"


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per field of the dataclass ``cls`` (see the module docstring for the rules).

    Defaults are left out of the namespace (``argparse.SUPPRESS``): :func:`parse` fills them from the
    dataclass, so a flag that was not typed never overrides a config file.
    """
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in dataclasses.fields(cls):
        meta = field.metadata
        target: argparse.ArgumentParser | argparse._ArgumentGroup = parser
        if meta.get("group"):
            target = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        # argparse formats help strings with %.
        text = (meta.get("help", "") + _default_text(field)).replace("%", "%%")
        kind, is_list = _value_type(hints[field.name])
        convert = _flag_type(meta["parse"]) if meta.get("parse") else kind
        if meta.get("positional"):
            # A positional with a default may be left out, and its aliases give it as a flag instead.
            optional = field.default is not dataclasses.MISSING
            left_out = {"nargs": "?", "default": argparse.SUPPRESS} if optional else {}
            target.add_argument(field.name, metavar=field.name.upper(), type=convert, help=text, **left_out)
            if optional and meta.get("aliases"):
                target.add_argument(
                    *meta["aliases"],
                    dest=field.name,
                    type=convert,
                    default=argparse.SUPPRESS,
                    metavar=field.name.upper(),
                    help=f"the same as {field.name.upper()}",
                )
            continue
        names = flag_names(field)
        common: dict[str, Any] = {"dest": field.name, "help": text, "default": argparse.SUPPRESS}
        if meta.get("metavar"):
            common["metavar"] = meta["metavar"]
        if kind is bool and not is_list:
            target.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
        elif is_list:
            action = {"action": "append"} if meta.get("repeat") else {"nargs": "+"}
            target.add_argument(*names, type=convert, choices=meta.get("choices"), **action, **common)
        elif meta.get("const", _NO_CONST) is not _NO_CONST:
            target.add_argument(*names, nargs="?", const=meta["const"], type=convert, **common)
        else:
            target.add_argument(*names, type=convert, choices=meta.get("choices"), **common)
        if meta.get("switch"):
            name, on, off = meta["switch"]
            for spelling, value in ((f"--{name}", on), (f"--no-{name}", off)):
                target.add_argument(
                    spelling,
                    action="store_const",
                    const=value,
                    dest=field.name,
                    default=argparse.SUPPRESS,
                    help=f"the same as {names[0]} {value}",
                )


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` that the command line set."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def parse(cls: type, args: argparse.Namespace, base: Mapping[str, Any] | None = None) -> Any:
    """An instance of ``cls``: typed flags over ``base`` (e.g. a config file's values) over the defaults,
    checked with :func:`check_config`."""
    typed = given(args, cls)
    config = cls(**{**canonical_keys(cls, base or {}), **typed})
    check_config(config, typed=typed.keys())
    return config


# ---------------------------------------------------------------- value checks


@dataclass(frozen=True)
class Check:
    """The values a field allows beyond its type: ``test(value)`` is true for them, ``rule`` completes
    the message "KEY = VALUE: must be ..." (it says the fix). A test that raises counts as false."""

    test: Callable[[Any], bool]
    rule: str


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _bound(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def number(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Check:
    """A finite number within the bounds (``None``: unbounded); ``*_open`` leaves the bound itself out."""

    def test(value: Any) -> bool:
        return (
            _finite(value)
            and (low is None or (value > low if low_open else value >= low))
            and (high is None or (value < high if high_open else value <= high))
        )

    if low is not None and high is not None:
        bounds = f"in {'(' if low_open else '['}{_bound(low)}, {_bound(high)}{')' if high_open else ']'}"
    elif low is not None:
        bounds = f"{'>' if low_open else '>='} {_bound(low)}"
    elif high is not None:
        bounds = f"{'<' if high_open else '<='} {_bound(high)}"
    else:
        bounds = ""
    return Check(test, f"a finite number {bounds}".strip())


def at_least(low: int) -> Check:
    """A whole number >= ``low`` (the type check has made sure it is one)."""
    return Check(lambda value: value >= low, f">= {low}")


NOT_EMPTY = Check(lambda value: len(value) > 0, "non-empty")


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type (ints pass as floats; bools never pass as numbers)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if origin is tuple:
        return (
            isinstance(value, tuple | list)
            and len(value) == len(args)
            and all(_type_ok(v, a) for v, a in zip(value, args, strict=True))
        )
    return True


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0]).removeprefix('a ')}s"
    if origin is tuple:
        return f"{len(args)} values ({', '.join(_type_name(a) for a in args)})"
    names = {
        bool: "true or false",
        int: "a whole number",
        float: "a number",
        str: "a text value",
        type(None): "unset (null)",
    }
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _setting(field: dataclasses.Field, value: Any, typed: bool) -> str:
    """How an error names a value: as the flag that was typed (``--steps 0``), else as the key a file or
    the default gave (``steps = 0``). Text is quoted, so any character prints."""
    if not typed:
        return f"{field.name} = {value!r}"
    if field.metadata.get("positional"):
        return f"{field.name.upper()} {value!r}"
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{flag_names(field)[0]} {format_area(value)}"
    shown = value if isinstance(value, list) else [value]
    return " ".join([flag_names(field)[0], *(repr(v) if isinstance(v, str) else str(v) for v in shown)])


def config_errors(config: Any, typed: Collection[str] = ()) -> list[str]:
    """One line per field of the dataclass instance ``config`` whose value is not of its annotated type,
    not one of its choices, or fails its declared ``check``; each names the setting and what it must be:
    the flag for the fields in ``typed`` (given on the command line), else the key."""
    hints = typing.get_type_hints(type(config))
    errors = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        name = _setting(field, value, field.name in typed)
        check: Check | None = field.metadata.get("check")
        if not _type_ok(value, hints[field.name]):
            rule = f"; allowed: {check.rule}" if check is not None else ""
            errors.append(f"{name}: must be {_type_name(hints[field.name])}{rule}")
            continue
        choices = field.metadata.get("choices")
        bad = [v for v in (value if isinstance(value, list) else [value]) if choices and v not in choices]
        if bad:
            errors.append(
                f"{_setting(field, bad[0], field.name in typed)}: choose one of {', '.join(choices)}"
            )
            continue
        if check is None or value is None:
            continue
        try:
            allowed = bool(check.test(value))
        except (TypeError, ValueError, OSError):
            allowed = False
        if not allowed:
            errors.append(f"{name}: must be {check.rule}")
    return errors


def check_config(config: Any, source: str | None = None, typed: Collection[str] = ()) -> None:
    """ConfigError listing :func:`config_errors` (one per line, prefixed with ``source`` when given)."""
    errors = config_errors(config, typed)
    if errors:
        raise ConfigError("\n".join(f"{source}: {e}" if source else e for e in errors))


def coerce_text(value: Any, hint: Any) -> Any:
    """A value that a source writing everything as text (SimpleTuner's CLI-style config.json) gave as a
    string, turned into the annotated scalar type when it spells one exactly (``"8"``, ``"1e-4"``,
    ``"true"``); anything else is returned unchanged for :func:`config_errors` to name."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if not isinstance(value, str):
        return value
    text = value.strip()
    if hint is bool:
        return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(
            text.lower(), value
        )
    try:
        if hint is int:
            parsed = float(text)
            return int(parsed) if parsed.is_integer() else value
        if hint is float:
            return float(text)
    except ValueError:
        return value
    return value


# ---------------------------------------------------------------- files


def key_names(cls: type) -> dict[str, str]:
    """Every key a config file may use for ``cls`` -> its field: the field names and the aliases'."""
    names: dict[str, str] = {}
    for field in dataclasses.fields(cls):
        names[field.name] = field.name
        for alias in field.metadata.get("aliases", ()):
            if alias.startswith("--"):
                names.setdefault(alias[2:].replace("-", "_"), field.name)
        if field.metadata.get("switch"):
            names.setdefault(field.metadata["switch"][0], field.name)
    return names


def _switches(cls: type) -> dict[str, tuple[Any, Any]]:
    """A switch's key -> (its on value, its off value)."""
    return {
        f.metadata["switch"][0]: f.metadata["switch"][1:]
        for f in dataclasses.fields(cls)
        if f.metadata.get("switch")
    }


def canonical_keys(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with alias keys renamed to their fields and a switch's ``true`` / ``false`` turned into
    its values (keys ``cls`` does not know are kept). A switch that is not true or false is a ConfigError
    naming it."""
    names, switches = key_names(cls), _switches(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in switches and key != names[key]:
            if not isinstance(value, bool):
                raise ConfigError(f"{key} = {value!r}: must be true or false (or set {names[key]})")
            value = switches[key][0] if value else switches[key][1]
        out[names.get(key, key)] = value
    return out


def known_keys(cls: type, values: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """``values`` under the field names of ``cls`` (aliases renamed); an unknown key raises ConfigError
    naming the closest known one."""
    names = key_names(cls)
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {names[close[0]]}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
    return canonical_keys(cls, values)


def from_dict(cls: type, values: Mapping[str, Any], source: str = "config") -> Any:
    """An instance of ``cls`` from a file's values (:func:`known_keys`), checked with :func:`check_config`."""
    try:
        config = cls(**known_keys(cls, values, source))
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from err
    check_config(config, source)
    return config


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The key/value table of a TOML (``.toml``) or JSON file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    kind = "TOML" if path.suffix == ".toml" else "JSON"
    try:
        values = tomllib.loads(text) if kind == "TOML" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid {kind}: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a table of keys and values, got {type(values).__name__}")
    return values


def simpletuner_keys(cls: type) -> dict[str, str]:
    """SimpleTuner key -> field of ``cls``, from the fields' ``simpletuner`` declarations."""
    return {
        f.metadata["simpletuner"]: f.name for f in dataclasses.fields(cls) if f.metadata.get("simpletuner")
    }


def add_commands(parser: argparse.ArgumentParser, commands: Mapping[str, tuple[type, Any, str, str]]) -> None:
    """One subcommand of ``parser`` per ``name: (config class, runner, help, epilog)``, its flags from the
    config class."""
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, _, help_text, epilog) in commands.items():
        command = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_flags(command, cls)
