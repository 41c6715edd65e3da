"""Recipes: YAML files read into typed dataclasses, with `section.key=value` command-line overrides.

Every mistake is found before any work starts and reported as one UserError that names the
file, the line, the dotted key and the bad value: unknown keys (with the nearest valid key),
wrong types, values outside a Literal, and whatever a dataclass's `validate()` rejects.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union

import yaml

from codegpt.base.errors import InvalidValue, UserError
from codegpt.base.fileio import atomic_write_text, check_input_file

T = TypeVar("T")
COMMAND_LINE = "<command line>"


class _Where:
    """Where each dotted key came from: a line of the recipe file or a command-line override."""

    def __init__(self, path: str | None, lines: dict[str, int]):
        self.path = path or COMMAND_LINE
        self.lines = lines
        self.overridden: set[str] = set()

    def __call__(self, key: str) -> str:
        if key in self.overridden or self.path == COMMAND_LINE:
            return f"{COMMAND_LINE}: {key}"
        probe = key.split("[")[0]
        line = self.lines.get(probe)
        while line is None and "." in probe:
            probe = probe.rsplit(".", 1)[0]
            line = self.lines.get(probe)
        return f"{self.path}:{line}: " if line else f"{self.path}: "


def _error(where: _Where, key: str, message: str) -> UserError:
    location = where(key)
    if location.startswith(COMMAND_LINE):
        return UserError(f"{location}: {message}")
    return UserError(f"{location}{key}: {message}")


def _line_map(node: yaml.Node, path: str, prefix: str = "") -> dict[str, int]:
    """The line of every dotted key under `node`. A key given twice in one mapping is an error:
    YAML loaders keep the last silently, so the first would look set and do nothing."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            line = key_node.start_mark.line + 1
            if key in lines:
                raise UserError(f"{path}:{line}: {key}: given twice (lines {lines[key]} and {line})")
            lines[key] = line
            lines.update(_line_map(value_node, path, key + "."))
    return lines


def read_yaml(path: str | os.PathLike) -> tuple[dict, dict[str, int]]:
    """The mapping in a YAML file and the line of every dotted key in it."""
    path = str(path)
    check_input_file(path, "recipe")
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: recipe file not found") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read recipe: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a text recipe (byte {err.start} is not UTF-8)") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise UserError(f"{path}{line}: invalid YAML: {problem}") from None
    # An empty file would run every default (the seed's 70M run on CodeParrot): surely not what was meant.
    if data is None or data == {}:
        raise UserError(f"{path}: recipe is empty (name the sections to set, e.g. model, data, train)")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data, _line_map(node, path)


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", "3e-4" parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"{COMMAND_LINE}: expected section.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_recipe(schema: type[T], path: str | os.PathLike | None, overrides: Sequence[str] = (),
                sections: Sequence[str] | None = None) -> T:
    """Read `path` (or only defaults when None), apply `section.key=value` overrides, and
    build the `schema` dataclass, checking every key, type and value. With `sections`, only
    those top-level sections of the file are read (a command that needs one part of a recipe)."""
    data, lines = read_yaml(path) if path is not None else ({}, {})
    if sections is not None:
        data = {key: value for key, value in data.items() if key in sections}
    where = _Where(str(path) if path is not None else None, lines)
    for text in overrides:
        key, value = parse_override(text)
        where.overridden.add(key)
        _check_path_exists(schema, key, where)
        _set_dotted(data, key, value)
    return build(schema, data, where)


def build(schema: type[T], data: dict, where: _Where | None = None, prefix: str = "") -> T:
    where = where or _Where(None, {})
    if not isinstance(data, dict):
        raise _error(where, prefix.rstrip(".") or "<root>", f"expected a mapping, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    hints = typing.get_type_hints(schema)
    for key in data:
        if key not in fields:
            raise _error(where, f"{prefix}{key}", f"unknown key{_suggest(str(key), fields, prefix.rstrip('.'))}")
    values = {}
    for name, field in fields.items():
        key = f"{prefix}{name}"
        if name in data:
            values[name] = _convert(hints[name], data[name], key, where)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise _error(where, key, "missing required key")
    instance = schema(**values)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        try:
            validate()
        except InvalidValue as bad:
            raise _error(where, f"{prefix}{bad.key}", bad.message) from None
    return instance


def build_in_file(schema: type[T], data: Any, path: str | os.PathLike, prefix: str = "") -> T:
    """`build` for a section of a file that is not a recipe (a checkpoint's config.json): errors
    name the file and the dotted key under `prefix`."""
    return build(schema, data, _Where(str(path), {}), prefix)


def _convert(tp: Any, value: Any, key: str, where: _Where) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, {} if value is None else value, where, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(options[0], value, key, where)
        for option in options:
            try:
                return _convert(option, value, key, where)
            except UserError:
                continue
        raise _error(where, key, f"expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        if value in args:
            return value
        choices = ", ".join(repr(a) for a in args)
        raise _error(where, key, f"must be one of {choices}, got {value!r}{_suggest(str(value), args)}")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise _error(where, key, f"expected a list, got {_describe(value)}")
        item_type = args[0] if args else Any
        items = [_convert(item_type, v, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _error(where, key, f"expected a mapping, got {_describe(value)}")
        return {k: _convert(args[1], v, f"{key}.{k}", where) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads `6e-4` (no dot) as a string; a float field takes it as the number it means.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            # `.inf` or `nan` passes every range check written as a comparison, then trains to NaN.
            if not math.isfinite(number):
                raise _error(where, key, f"must be a finite number, got {value}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"recipe field {key} has unsupported type {tp!r}")
    raise _error(where, key, f"expected {_type_name(tp)}, got {_describe(value)}")


def _check_path_exists(schema: type, dotted: str, where: _Where) -> None:
    """An override must name a real key: `train.lrr=1` fails here, naming `train.lr`."""
    current: Any = schema
    walked = ""
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(current):
            raise _error(where, dotted, f"{walked} is not a section")
        fields = {f.name: f for f in dataclasses.fields(current) if f.init}
        if part not in fields:
            raise _error(where, dotted, f"unknown key{_suggest(part, fields, walked)}")
        walked = f"{walked}.{part}" if walked else part
        current = _unwrap_optional(typing.get_type_hints(current)[part])


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        child = data.get(part)
        if not isinstance(child, dict):
            child = data[part] = {}
        data = child
    data[last] = value


def _suggest(word: str, candidates, section: str = "") -> str:
    names = [str(c) for c in candidates]
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.5)
    if not close:
        return f" (valid: {', '.join(names)})" if len(names) <= 12 else ""
    return f" (did you mean {section + '.' if section else ''}{close[0]}?)"


def _describe(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return type(value).__name__
    return f"{value!r} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(recipe: Any) -> dict:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Any, path: str | os.PathLike) -> None:
    """Write the recipe actually used (defaults and overrides applied) as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(recipe), sort_keys=False))


def split_cli_args(args: Sequence[str], usage: str) -> tuple[str | None, list[str]]:
    """`[recipe.yaml] [section.key=value ...]` -> (recipe path or None, overrides)."""
    if any(a in ("-h", "--help") for a in args):
        print(usage)
        raise SystemExit(0)
    recipe, overrides = None, []
    for arg in args:
        if "=" in arg:
            overrides.append(arg)
        elif recipe is None and not arg.startswith("-"):
            recipe = arg
        else:
            raise UserError(f"{COMMAND_LINE}: unexpected argument {arg!r} ({usage})")
    return recipe, overrides
