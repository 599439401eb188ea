"""Recipes: YAML files parsed into typed, strict dataclasses.

This module owns the one mechanism every command uses to read its recipe:

* ``extends: other.yaml`` (relative to the file) deep-merges a base recipe under the file;
* ``a.b.c=value`` command-line overrides (``value`` is parsed as YAML, so ``lr=1e-4`` is a float);
* strict conversion into the dataclass schema: unknown keys (with the closest valid key), wrong types,
  missing required keys, numbers outside their field's range (declared with :func:`ranged`; NaN and
  infinities are never accepted) and impossible combinations all raise :class:`RecipeError` naming the
  file and the full key path, before any work starts;
* :func:`save_resolved` writes the resolved recipe next to an output.

Schemas are plain dataclasses. A schema may define ``check(self) -> None`` and raise
``RecipeError.at("key", "message")`` for combinations; the path prefix and file are added here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class RecipeError(Exception):
    """A recipe problem, always reported as ``file: key.path: message``."""

    def __init__(self, message: str, key: str = "", file: str | None = None):
        self.message = message
        self.key = key
        self.file = file
        super().__init__(str(self))

    @classmethod
    def at(cls, key: str, message: str) -> RecipeError:
        return cls(message, key=key)

    def under(self, prefix: str) -> RecipeError:
        key = f"{prefix}.{self.key}" if self.key and prefix else (prefix or self.key)
        return RecipeError(self.message, key=key, file=self.file)

    def __str__(self) -> str:
        where = ": ".join(p for p in (self.file, self.key) if p)
        return f"{where}: {self.message}" if where else self.message


RANGE = "align.range"  # the dataclasses.field metadata key that holds a numeric field's Range


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric recipe key accepts: each of its numbers, for a list; a float must also be finite.

    No bound at all still means "any finite number": every numeric field declares its range, so a test can
    prove none was forgotten.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    note: str = ""  # what a boundary value means, e.g. "0: no clipping"; shown in errors and docs/recipes.md

    def __post_init__(self) -> None:
        if (self.ge is not None and self.gt is not None) or (self.le is not None and self.lt is not None):
            raise TypeError(f"a range takes one lower and one upper bound at most: {self}")

    def admits(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self, finite: bool = False) -> str:
        """``in [0, 1)``, ``>= 1``, ``> 0``; ``finite`` adds "and finite" where a side is open-ended."""
        low = ("[", ">=", self.ge) if self.ge is not None else ("(", ">", self.gt)
        high = ("]", "<=", self.le) if self.le is not None else (")", "<", self.lt)
        if low[2] is not None and high[2] is not None:
            return f"in {low[0]}{low[2]!r}, {high[2]!r}{high[0]}"
        sides = [f"{op} {limit!r}" for _, op, limit in (low, high) if limit is not None]
        if not sides:
            return "finite"
        return f"{sides[0]} and finite" if finite else sides[0]

    def message(self, value: float) -> str:
        note = f" ({self.note})" if self.note else ""
        return f"must be {self.describe(finite=isinstance(value, float))}{note}, got {value!r}"


# Limits the schemas share. The longest context current LLMs are trained for is about a million tokens, so a
# token count above 2**20 is a typo (data.max_length 10**12 once trained silently), and one such row's
# attention would not fit in any accelerator's memory.
MAX_TOKENS = 2**20
# Stages seed torch with seed * 1_000_003 + step, which must fit its 64-bit generator: seeds stay in 32 bits.
MAX_SEED = 2**32 - 1


def ranged(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    note: str = "",
) -> Any:
    """A numeric schema field with its :class:`Range`, checked whenever a recipe is read.

    ``lr: float = ranged(2e-5, ge=0)``; for lists the range applies to each item
    (``betas: list[float] = ranged(default_factory=..., ge=0, lt=1)``), and ``None`` passes an Optional field.
    """
    bound = Range(ge=ge, gt=gt, le=le, lt=lt, note=note)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={RANGE: bound})


def field_range(f: dataclasses.Field) -> Range | None:
    """The range a schema field declared with :func:`ranged`, or None."""
    return f.metadata.get(RANGE)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    origin = get_origin(tp)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _value_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _number(value: float, bound: Range | None, key: str) -> float:
    """``value`` if its field's range admits it (any finite float when the field declares none)."""
    if bound is not None:
        if not bound.admits(value):
            raise RecipeError.at(key, bound.message(value))
    elif isinstance(value, float) and not math.isfinite(value):
        raise RecipeError.at(key, f"must be finite, got {value!r}")
    return value


def _convert(tp: Any, value: Any, key: str, bound: Range | None = None) -> Any:
    """Convert one YAML value to ``tp`` or raise a RecipeError at ``key``.

    ``bound`` is the field's range: it applies to the numbers inside Optional, list, tuple and dict types.
    """
    if tp is Any:
        return value
    if _is_union(tp):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key, bound)
            except RecipeError as err:
                errors.append(err)
        # `int | list[int]` given 5000: the int alternative's range error says more than "expected int | list"
        shaped = [
            err
            for arg, err in zip((a for a in args if a is not type(None)), errors, strict=True)
            if (get_origin(arg) in (list, tuple)) == isinstance(value, list)
        ]
        if len(errors) == 1 or len(shaped) == 1:
            raise (errors if len(errors) == 1 else shaped)[0]
        raise RecipeError.at(key, f"expected {_type_name(tp)}, got {_value_name(value)} {value!r}")
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise RecipeError.at(key, f"expected one of {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError.at(key, f"expected a mapping ({tp.__name__}), got {_value_name(value)}")
        return _build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise RecipeError.at(key, f"expected a list, got {_value_name(value)} {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_convert(item_tp, v, f"{key}[{i}]", bound) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError.at(key, f"expected a mapping, got {_value_name(value)} {value!r}")
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): _convert(val_tp, v, f"{key}.{k}", bound) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return _number(value, bound, key)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _number(float(value), bound, key)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" (no dot) as a string
                number = float(value)
            except ValueError:
                pass
            else:
                return _number(number, bound, key)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported schema type {tp!r} at {key}")
    raise RecipeError.at(key, f"expected {_type_name(tp)}, got {_value_name(value)} {value!r}")


def _build(cls: type[T], data: dict, prefix: str) -> T:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(fields)})"
            raise RecipeError.at(key, f"unknown key{hint}")
        kwargs[name] = _convert(hints[name], value, key, field_range(fields[name]))
    for name, f in fields.items():
        missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if missing and name not in kwargs:
            key = f"{prefix}.{name}" if prefix else name
            raise RecipeError.at(key, f"missing required key ({_type_name(hints[name])})")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except RecipeError as err:
            raise err.under(prefix) from None
    return obj


def from_dict(cls: type[T], data: dict, file: str | None = None) -> T:
    """Build schema ``cls`` from a plain mapping, raising RecipeError tagged with ``file``."""
    if not isinstance(data, dict):
        raise RecipeError(f"expected a mapping at the top level, got {_value_name(data)}", file=file)
    try:
        return _build(cls, data, "")
    except RecipeError as err:
        err.file = file
        raise


def deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``; mappings merge key by key, everything else is replaced."""
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe file with its ``extends:`` chain resolved (no schema applied)."""
    path = Path(path).resolve()
    if path in _seen:
        raise RecipeError(f"'extends' cycle: {' -> '.join(str(p) for p in (*_seen, path))}", file=str(path))
    if not path.is_file():
        raise RecipeError("recipe file not found", file=str(path))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"not valid YAML: {err}", file=str(path)) from None
    if not isinstance(data, dict):
        raise RecipeError(f"expected a mapping at the top level, got {_value_name(data)}", file=str(path))
    base = data.pop("extends", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged: dict = {}
    for b in bases:
        if not isinstance(b, str):
            raise RecipeError(f"extends: expected a file path, got {b!r}", file=str(path))
        merged = deep_merge(merged, read_yaml(path.parent / b, (*_seen, path)))
    return deep_merge(merged, data)


def _parse_value(raw: str) -> Any:
    """A command-line value as YAML, except that 1e-4 style numbers are floats (YAML 1.1 reads a string)."""
    if raw == "":
        return ""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _index(items: list, part: str, item: str) -> int:
    """A list position from an override path, or a RecipeError naming the override and the list length."""
    if not part.lstrip("-").isdigit() or not -len(items) <= int(part) < len(items):
        raise RecipeError(f"override {item!r}: '{part}' is not an index of a list of {len(items)} items")
    return int(part)


def apply_overrides(data: dict, overrides: typing.Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` strings; list items are addressed by index (``data.sources.0.weight=2``)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form key.path=value")
        dotted, raw = item.split("=", 1)
        value = _parse_value(raw)
        parts = dotted.strip().split(".")
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            child = node[_index(node, part, item)] if isinstance(node, list) else node.get(part)
            if child is None:
                child = {}
            elif isinstance(child, dict):
                child = dict(child)
            elif isinstance(child, list):
                child = list(child)
            else:
                where = ".".join(parts[: depth + 1])
                raise RecipeError(f"override {item!r}: {where} is a value, not a section")
            node[_index(node, part, item) if isinstance(node, list) else part] = child
            node = child
        last = parts[-1]
        if isinstance(node, list):
            node[_index(node, last, item)] = value
        else:
            node[last] = value
    return data


def load_recipe(cls: type[T], path: str | Path, overrides: typing.Sequence[str] = ()) -> T:
    """Read, extend, override and validate a recipe file into schema ``cls``."""
    data = read_yaml(path)
    try:
        data = apply_overrides(data, overrides)
    except RecipeError as err:
        err.file = str(path)
        raise
    return from_dict(cls, data, file=str(path))


def to_dict(obj: Any) -> Any:
    """A dataclass recipe as plain YAML-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def save_resolved(obj: Any, directory: str | Path, name: str = "recipe.resolved.yaml") -> Path:
    """Write the resolved recipe next to an output, so every output says how it was made."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / name
    out.write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
    return out


# Every recipe names its kind; the kind picks the schema. Lazy so that reading a recipe imports one module.
SCHEMAS: dict[str, str] = {
    "assemble": "align.assemble:AssembleRecipe",
    "projector": "align.stages.projector:ProjectorRecipe",
    "sft": "align.stages.sft:SFTRecipe",
    "grpo": "align.stages.grpo:GRPORecipe",
    "pipeline": "align.pipeline:PipelineRecipe",
    "distill": "align.data.distill:DistillRecipe",
}


def schema_for(kind: str) -> type:
    import importlib

    module, name = SCHEMAS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def load_any(path: str | Path, overrides: typing.Sequence[str] = (), expect: str | None = None) -> Any:
    """Load a recipe whose schema is chosen by its ``kind:`` key (checked against ``expect`` if given)."""
    try:
        data = apply_overrides(read_yaml(path), overrides)
    except RecipeError as err:
        err.file = err.file or str(path)
        raise
    kind = data.get("kind")
    if kind not in SCHEMAS:
        raise RecipeError(f"expected one of {', '.join(SCHEMAS)}, got {kind!r}", key="kind", file=str(path))
    if expect is not None and kind != expect:
        raise RecipeError(f"this command takes a '{expect}' recipe, got '{kind}'", key="kind", file=str(path))
    return from_dict(schema_for(kind), data, file=str(path))
