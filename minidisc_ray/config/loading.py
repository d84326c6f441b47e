"""Loading a configuration: YAML read safely, ``--set key=value`` overrides, and the typed build from plain data.

YAML is read with a strict ``yaml.SafeLoader``: no tag or string in a config executes code, a key given twice
and documents that expand past :data:`MAX_CONFIG_NODES` values (alias bombs) are refused. :func:`config_from_dict`
builds the frozen :class:`~minidisc_ray.config.schema.Config`, records every type problem, runs the value checks
of :mod:`~minidisc_ray.config.checks` and raises one :class:`~minidisc_ray.errors.ConfigError` listing them all.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from minidisc_ray.config.checks import check_values
from minidisc_ray.config.schema import Config
from minidisc_ray.errors import ConfigError, UserInputError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_D = TypeVar("_D", bound="DataclassInstance")  # a config section
_INVALID = object()  # what _coerce returns for a value it recorded a problem for


def _type_name(tp: object) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: object, tp: object, path: str, problems: list[UserInputError]) -> object:
    """Check ``value`` against annotation ``tp``; return the converted value or record a problem."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path, problems)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            problems.append(UserInputError(path, value, "give a YAML list, e.g. [0.5, 0.7, 0.9]"))
            return _INVALID
        (item_tp, _) = typing.get_args(tp)
        items = tuple(_coerce(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value))
        return _INVALID if any(v is _INVALID for v in items) else items
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems)
    if tp is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None:
            if math.isfinite(number):
                return number
            problems.append(UserInputError(path, value, "use a finite number"))
            return _INVALID
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    problems.append(UserInputError(path, value, f"expected {_type_name(tp)}"))
    return _INVALID


def _build(cls: type[_D], data: object, path: str, problems: list[UserInputError]) -> _D:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(UserInputError(path or "config", data, "expected a mapping of fields"))
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, object] = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            problems.append(
                UserInputError(full, key, f"unknown key; use one of {', '.join(sorted(names))}")
            )
            continue
        value = _coerce(value, hints[key], full, problems)
        if value is not _INVALID:  # a field with a recorded problem keeps its default, so later checks can run
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError:
        return cls()


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """Turn ``["a.b=1", "task.data=DIR"]`` into a nested dict; values are parsed as YAML scalars."""
    # Any: sections nest to any depth and callers index into them (cli's ``extra.get("task", {})``)
    nested: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise UserInputError("--set", item, "write --set key=value, e.g. --set task.data=../data/SST-2")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        if value is not None and not isinstance(value, (int, float, bool, list, dict)):
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserInputError("--set", item, f"{part} is not a section")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, object], extra: dict[str, object]) -> dict[str, object]:
    out = dict(base)
    for k, v in extra.items():
        old = out.get(k)
        if isinstance(v, dict) and isinstance(old, dict):
            out[k] = _merge(old, v)
        else:
            out[k] = v
    return out


def config_from_dict(data: dict[str, object]) -> Config:
    """Build and validate a :class:`Config`; raise :class:`ConfigError` listing every problem."""
    problems: list[UserInputError] = []
    cfg = _build(Config, data, "", problems)
    check_values(cfg, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


MAX_CONFIG_BYTES = 1 << 20  # a config is a page of YAML; a megabyte is generous
MAX_CONFIG_NODES = 20_000  # YAML nodes after aliases are expanded (an alias bomb expands to billions)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: object, line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line = key, line


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, object]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_nodes(node: yaml.Node, limit: int) -> int:
    """How many nodes the document has once every alias is expanded (memoised: linear in the graph)."""
    memo: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        if id(n) in memo:
            return memo[id(n)]
        memo[id(n)] = limit + 1  # a node reached again while being sized is a recursive alias: too big
        total = 1
        if isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            total += sum(size(v) for v in n.value)
        memo[id(n)] = min(total, limit + 1)
        return memo[id(n)]

    return size(node)


def safe_yaml(text: str, field: str, source: str) -> object:
    """Parse YAML without running code, refusing duplicate keys and documents that expand past
    :data:`MAX_CONFIG_NODES` nodes (alias bombs); every problem is one :class:`UserInputError`."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()  # type: ignore[no-untyped-call]
        if node is None:
            return None
        if _expanded_nodes(node, MAX_CONFIG_NODES) > MAX_CONFIG_NODES:
            raise UserInputError(field, source, f"the YAML expands to more than {MAX_CONFIG_NODES:,} values "
                                 "(aliases nested in aliases?); write the config out plainly")
        return loader.construct_document(node)  # type: ignore[no-untyped-call]
    except _DuplicateKey as exc:
        raise UserInputError(field, source, f"key {exc.key!r} is given twice (line {exc.line}); YAML would keep only "
                             "the last one: merge the two into one") from None
    except RecursionError:
        raise UserInputError(field, source, "the YAML nests too deeply; write the config out plainly") from None
    finally:
        loader.dispose()  # type: ignore[no-untyped-call]


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``--set`` overrides and validate it."""
    p = Path(path)
    if not p.is_file():
        raise UserInputError("CONFIG", str(path), "give the path of a YAML file, e.g. search_spaces/default.yaml")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise UserInputError("CONFIG", str(path), f"the file is over {MAX_CONFIG_BYTES // 1024} KiB; a config is a "
                             "page of YAML (put data in task.data, not in the config)")
    try:
        data = safe_yaml(p.read_text(encoding="utf-8"), "CONFIG", str(path))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UserInputError("CONFIG", str(path), f"fix the YAML syntax{line}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserInputError("CONFIG", str(path), "the YAML top level must be a mapping of sections")
    return config_from_dict(_merge(data, parse_overrides(overrides)))
