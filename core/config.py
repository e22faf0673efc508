"""Typed configs: one full default (a dataclass), small YAML overrides, ``key=value`` from the CLI.

Every stage (pretext, transfer, eval) builds its config with :func:`load_config`, so unknown keys and
wrong types are rejected the same way everywhere and the resolved config is saved the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from core.atomic_io import atomic_write_text
from core.cli import ArgumentParser, UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A config file or override that does not match the dataclass schema."""


def _field_types(cls: type) -> dict[str, Any]:
    """The config keys of ``cls``: its fields, less those set by a loader (``init=False``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``typ``; convert lists to tuples and ints to floats."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            words = {True: ("on", "yes", "true"), False: ("off", "no", "false")}[value]
            value = next((w for w in words if w in typing.get_args(typ)), value)
        if value not in typing.get_args(typ):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(typ))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(typ)
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        args = typing.get_args(typ)
        if args and dataclasses.is_dataclass(args[1]):  # name -> section, each checked
            return {k: _coerce(v or {}, args[1], f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {typ.__name__} keys, got {value!r}")
        return _build(typ, value, where)
    if typ is Any:
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return str(value)
    return value


def _build(cls: type[T], values: dict[str, Any], where: str = "") -> T:
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        prefix = f"{where}." if where else ""
        valid = ", ".join(prefix + k for k in types_)
        raise ConfigError(f"unknown key(s) {[prefix + k for k in unknown]}; valid keys: {valid}")
    base = cls()
    kwargs = {}
    for name, typ in types_.items():
        key = f"{where}.{name}" if where else name
        if name not in values:
            continue
        current = getattr(base, name)
        if dataclasses.is_dataclass(current) and isinstance(values[name], dict):
            merged = {**dataclasses.asdict(current), **values[name]}
            kwargs[name] = _build(type(current), merged, key)
        else:
            kwargs[name] = _coerce(values[name], typ, key)
    return dataclasses.replace(base, **kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=0.1", "mask.kind=central"]`` -> nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None
) -> T:
    """Defaults of ``cls`` <- YAML file ``path`` <- ``overrides`` (``key=value`` strings)."""
    values: dict[str, Any] = {}
    if path is not None:
        values = read_yaml(path)
    values = _merge(values, parse_overrides(overrides or []))
    try:
        return _build(cls, values)
    except ConfigError as err:
        source = f"{path}: " if path is not None else ""
        raise ConfigError(f"{source}{err}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON/YAML-ready nested dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def dump_yaml(cfg: Any) -> str:
    buf = io.StringIO()
    yaml.safe_dump(to_dict(cfg), buf, sort_keys=False)
    return buf.getvalue()


def save_config(cfg: Any, path: str | Path) -> None:
    atomic_write_text(Path(path), dump_yaml(cfg))


def config_from_dict(cls: type[T], values: dict[str, Any], where: str = "") -> T:
    """``cls`` from ``values``; ``where``: the section's dotted name, for the error message."""
    return _build(cls, values, where)


def parse_cli(
    cls: type[T],
    argv: list[str] | None,
    description: str | None,
    example: str,
    flags: dict[str, str] | None = None,
) -> T:
    """A stage's command line -> its config: ``--config FILE`` (YAML overrides of the full
    default), ``--<flag> VALUE`` for each of ``flags`` (name -> help; the same as ``flag=VALUE``),
    then ``key=value`` overrides, e.g. ``example``."""
    parser = ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help=f"YAML overrides of the full default ({cls.__name__})")
    for flag, text in (flags or {}).items():
        parser.add_argument(f"--{flag}", help=text)
    parser.add_argument("overrides", nargs="*", help=f"key=value, e.g. {example}")
    args = parser.parse_args(argv)
    extra = [f"{f}={getattr(args, f)}" for f in flags or {} if getattr(args, f) is not None]
    return load_config(cls, args.config, [*extra, *args.overrides])
