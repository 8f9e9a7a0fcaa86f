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
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
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
            target.add_argument(field.name, metavar=field.name.upper(), type=convert, help=text)
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


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` that the command line set."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def parse(cls: type, args: argparse.Namespace, base: Mapping[str, Any] | None = None) -> Any:
    """An instance of ``cls``: typed flags over ``base`` (e.g. a config file's values) over the defaults."""
    return cls(**{**(base or {}), **given(args, cls)})


def check_choices(config: Any) -> None:
    """ConfigError for a field whose value is not one of its declared choices (e.g. from a file)."""
    for field in dataclasses.fields(config):
        choices = field.metadata.get("choices")
        if not choices:
            continue
        value = getattr(config, field.name)
        for item in value if isinstance(value, list) else [value]:
            if item not in choices:
                raise ConfigError(f"{field.name} = {item!r}: choose one of {', '.join(choices)}")


# ---------------------------------------------------------------- files


def key_names(cls: type) -> dict[str, str]:
    """Every key a config file may use for ``cls`` -> its field: the field names and the aliases'."""
    names: dict[str, str] = {}
    for field in dataclasses.fields(cls):
        names[field.name] = field.name
        for alias in field.metadata.get("aliases", ()):
            if alias.startswith("--"):
                names.setdefault(alias[2:].replace("-", "_"), field.name)
    return names


def canonical_keys(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with alias keys renamed to their fields (keys ``cls`` does not know are kept)."""
    names = key_names(cls)
    return {names.get(key, key): value for key, value in values.items()}


def from_dict(cls: type, values: Mapping[str, Any], source: str = "config") -> Any:
    """An instance of ``cls`` from a file's values; an unknown key raises ConfigError with the closest key."""
    names = key_names(cls)
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {names[close[0]]}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
    try:
        return cls(**canonical_keys(cls, values))
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from err


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
