"""Recipes: YAML files parsed into typed, strict dataclasses.

This module owns the one mechanism every command uses to read its recipe:

* ``extends: other.yaml`` (relative to the file) deep-merges a base recipe under the file;
* ``a.b.c=value`` command-line overrides (``value`` is parsed as YAML, so ``lr=1e-4`` is a float; list items
  as ``data.sources.0.path`` or ``data.sources[0].path``); an error a command-line value causes names that
  override, not the recipe file;
* strict conversion into the dataclass schema: unknown keys (with the closest valid key, or align's name for
  a TRL / transformers ``TrainingArguments`` option: ``learning_rate`` -> ``optim.lr``), wrong types,
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
import re
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


class UnknownKeyError(RecipeError):
    """An unknown key; :func:`from_dict`, which knows the whole schema, may point it to a key elsewhere."""

    def __init__(self, key: str, name: str, value: Any, valid: list[str]):
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(valid)})"
        super().__init__(f"unknown key{hint}", key=key)
        self.name, self.value = name, value

    def point_to(self, schema: type) -> None:
        """Say which key of ``schema`` (a path from its top) means what this unknown key means, if one does."""
        paths = schema_paths(schema)
        target, note = FOREIGN_KEYS.get(self.name, (None, ""))
        if target not in paths:
            # the same name in another section (`lr` at the top, `train.lr`'s lr): the section is what is wrong
            names = [self.name, *(map(str, self.value) if isinstance(self.value, dict) else [])]
            target = next((p for name in names for p in paths if p.rsplit(".", 1)[-1] == name), None)
            note = ""
        if target is not None:
            self.message = f"unknown key (did you mean '{target}'?{note and ' ' + note})"


# TRL / transformers TrainingArguments / LLaMA-Factory names -> align's key (a path from the recipe's top) and
# what differs; pointed to only when the recipe's schema has that key.
FOREIGN_KEYS: dict[str, tuple[str, str]] = {
    "learning_rate": ("optim.lr", ""),
    "per_device_train_batch_size": ("run.micro_batch_size", ""),
    "train_batch_size": ("run.micro_batch_size", "per process"),
    "gradient_accumulation_steps": ("run.grad_accum", ""),
    "num_train_epochs": ("run.epochs", ""),
    "max_steps": ("run.max_steps", ""),
    "save_steps": ("run.save_every", ""),
    "save_total_limit": ("run.keep_last", ""),
    "logging_steps": ("run.log_every", ""),
    "report_to": ("run.tensorboard", "and run.wandb_project"),
    "seed": ("run.seed", ""),
    "bf16": ("run.precision", "bf16 | fp32 | auto"),
    "fp16": ("run.precision", "bf16 | fp32 | auto; fp16 is not supported"),
    "gradient_checkpointing": ("run.gradient_checkpointing", ""),
    "deepspeed": ("run.deepspeed_config", "a ZeRO JSON under recipes/deepspeed/"),
    "warmup_ratio": ("optim.warmup_ratio", ""),
    "max_grad_norm": ("optim.max_grad_norm", ""),
    "weight_decay": ("optim.weight_decay", ""),
    "lr_scheduler_type": ("optim.schedule", ""),
    "adam_beta1": ("optim.betas", "[beta1, beta2]"),
    "adam_beta2": ("optim.betas", "[beta1, beta2]"),
    "max_length": ("data.max_length", ""),
    "max_seq_length": ("data.max_length", ""),
    "cutoff_len": ("data.max_length", ""),
    "packing": ("data.packing", ""),
    "group_by_length": ("data.group_by_length", ""),
    "model_name_or_path": ("model", ""),
    "dataset": ("data.sources", ""),
    "dataset_name": ("data.sources", ""),
    "lora_r": ("lora.r", ""),
    "lora_rank": ("lora.r", ""),
    "lora_alpha": ("lora.alpha", ""),
    "lora_dropout": ("lora.dropout", ""),
    "lora_target_modules": ("lora.target_modules", ""),
    "lora_target": ("lora.target_modules", ""),
    "freeze_vision_tower": ("trainable.vision", "true trains it"),
    "tune_mm_mlp_adapter": ("trainable.projector", ""),
    "num_generations": ("grpo.num_generations", ""),
    "beta": ("grpo.beta", ""),
    "epsilon": ("grpo.epsilon", ""),
    "epsilon_high": ("grpo.epsilon_high", ""),
    "temperature": ("grpo.temperature", ""),
    "max_completion_length": ("grpo.max_completion_length", ""),
    "max_prompt_length": ("data.max_length", ""),
    "num_iterations": ("grpo.num_iterations", ""),
    "loss_type": ("grpo.loss_type", ""),
    "scale_rewards": ("grpo.scale_rewards", ""),
    "reward_funcs": ("grpo.reward_funcs", ""),
    "reward_weights": ("grpo.reward_weights", ""),
}


def schema_paths(schema: type, prefix: str = "") -> list[str]:
    """Every key path of a schema, sections included; list items as ``[i]`` (``data.sources[i].path``)."""
    paths = []
    hints = get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if not f.init:
            continue
        path = f"{prefix}.{f.name}" if prefix else f.name
        paths.append(path)
        tp = hints[f.name]
        options = [a for a in get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
        for option in options:
            if dataclasses.is_dataclass(option):
                paths += schema_paths(option, path)
            elif get_origin(option) in (list, tuple) and dataclasses.is_dataclass(
                (get_args(option) or (0,))[0]
            ):
                paths += schema_paths(get_args(option)[0], f"{path}[i]")
    return paths


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
            raise UnknownKeyError(key, str(name), value, list(fields))
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
    except UnknownKeyError as err:
        err.point_to(cls)
        err.file = file
        raise
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


_INDEX = re.compile(r"\[(-?\d+)\]")


def key_parts(dotted: str) -> list[str]:
    """``data.sources[0].path`` or ``data.sources.0.path`` -> ``["data", "sources", "0", "path"]``."""
    return _INDEX.sub(r".\1", dotted.strip()).split(".")


def blame(err: RecipeError, overrides: typing.Sequence[str], file: str | None) -> RecipeError:
    """Tag ``err`` with the override that set the value at its key (the last such), else with ``file``.

    A bad command-line value is not the recipe file's fault: ``override 'optim.lr=abc': optim.lr: ...``.
    Errors :func:`apply_overrides` raises already name their override and keep no file.
    """
    if err.message.startswith("override "):
        return err
    where = key_parts(err.key) if err.key else []
    for item in reversed(overrides):
        parts = key_parts(item.split("=", 1)[0])
        n = min(len(parts), len(where))
        if n and parts[:n] == where[:n]:
            err.file = f"override {item!r}"
            return err
    err.file = file
    return err


def _index(items: list, part: str, item: str) -> int:
    """A list position from an override path, or a RecipeError naming the override and the list length."""
    if not part.lstrip("-").isdigit() or not -len(items) <= int(part) < len(items):
        raise RecipeError(f"override {item!r}: '{part}' is not an index of a list of {len(items)} items")
    return int(part)


def apply_overrides(data: dict, overrides: typing.Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` strings; list items by index (``data.sources.0.weight=2`` or ``data.sources[0]``)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form key.path=value")
        dotted, raw = item.split("=", 1)
        value = _parse_value(raw)
        parts = key_parts(dotted)
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
    data = apply_overrides(read_yaml(path), overrides)
    try:
        return from_dict(cls, data, file=str(path))
    except RecipeError as err:
        raise blame(err, overrides, str(path)) from None


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
    data = apply_overrides(read_yaml(path), overrides)
    kind = data.get("kind")
    try:
        if kind not in SCHEMAS:
            raise RecipeError(f"expected one of {', '.join(SCHEMAS)}, got {kind!r}", key="kind")
        if expect is not None and kind != expect:
            raise RecipeError(f"this command takes a '{expect}' recipe, got '{kind}'", key="kind")
        return from_dict(schema_for(kind), data, file=str(path))
    except RecipeError as err:
        raise blame(err, overrides, str(path)) from None
