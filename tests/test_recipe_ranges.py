"""Numeric recipe keys: every one declares its range, bad values fail before work naming their origin (the
file, or the command-line override that set the value) and key path.

The walk goes over every schema in ``align.config.SCHEMAS`` and every dataclass nested in it, so a numeric key
added later without a range fails here. Boundaries are exercised through the shipped tiny recipes and the
command-line override path (``optim.lr=nan`` reaches the schema as float nan).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from pathlib import Path
from typing import Any

import pytest

from align.cli import main
from align.config import SCHEMAS, Range, RecipeError, field_range, load_any, schema_for

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny"
RECIPE_OF = {  # the shipped recipe each kind's boundaries are tried on
    "assemble": TINY / "assemble_siglip_qwen2.yaml",
    "projector": TINY / "projector.yaml",
    "sft": TINY / "sft.yaml",
    "grpo": TINY / "grpo.yaml",
    "pipeline": TINY / "pipeline.yaml",
    "distill": TINY / "distill.yaml",
}


def _args(tp: Any) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) is not typing.Literal else ()


def _numeric(tp: Any) -> bool:
    """Whether a field of type ``tp`` holds numbers (int or float, possibly inside Optional/list/dict)."""
    if tp in (int, float):
        return True
    return any(_numeric(a) for a in _args(tp))


def _nested(tp: Any) -> list[type]:
    if dataclasses.is_dataclass(tp):
        return [tp]
    return [cls for a in _args(tp) for cls in _nested(a)]


def _is_list(tp: Any) -> bool:
    """``list[...]`` or ``list[...] | None``."""
    return typing.get_origin(tp) is list or any(typing.get_origin(a) is list for a in _args(tp))


def _fields(cls: type, prefix: str = "") -> list[tuple[str, type, dataclasses.Field, Any]]:
    """(override path, owner class, field, type) for cls and every dataclass nested in it; lists at index 0."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        out.append((path, cls, f, hints[f.name]))
        for nested in _nested(hints[f.name]):
            out += _fields(nested, f"{path}.0." if _is_list(hints[f.name]) else f"{path}.")
    return out


ALL_FIELDS = [(kind, *row) for kind in SCHEMAS for row in _fields(schema_for(kind))]
NUMERIC = [row for row in ALL_FIELDS if _numeric(row[4])]


def _key(path: str) -> str:
    """The key path an error names for an override path: ``data.sources.0.weight`` -> ``data.sources[0].weight``."""
    return path.replace(".0.", "[0].")


def test_the_walk_reaches_every_schema_and_nested_section() -> None:
    owners = {row[2].__name__ for row in ALL_FIELDS}
    expected = {"AssembleRecipe", "VisionSpec", "RunSpec", "OptimSpec", "LoRASpec", "GRPOSpec", "DataConfig"}
    assert expected | {"DataSource", "EvalSpec", "TeacherSpec", "DescriptionSpec", "DistillRecipe"} <= owners
    assert len(NUMERIC) > 40


@pytest.mark.parametrize(
    ("kind", "path", "owner", "f", "tp"), ALL_FIELDS, ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_numeric_field_declares_its_range(
    kind: str, path: str, owner: type, f: dataclasses.Field, tp: Any
) -> None:
    if _numeric(tp):
        assert isinstance(field_range(f), Range), (
            f"{owner.__name__}.{f.name} ({kind}: {path}) has no range: use ranged()"
        )
    else:
        assert field_range(f) is None, f"{owner.__name__}.{f.name} holds no number but declares a range"


def _numbers(value: Any) -> list:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [value]
    return [n for v in value for n in _numbers(v)] if isinstance(value, (list, tuple)) else []


def _out_of_range(obj: Any, where: str) -> list[str]:
    """Fields of a schema instance (and its sections) whose value its range refuses."""
    bad = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        bound = field_range(f)
        bad += [
            f"{where}{f.name}={n!r}" for n in _numbers(value) if bound is not None and not bound.admits(n)
        ]
        if dataclasses.is_dataclass(value):
            bad += _out_of_range(value, f"{where}{f.name}.")
    return bad


@pytest.mark.parametrize("kind", list(SCHEMAS))
def test_defaults_and_section_defaults_are_inside_their_ranges(kind: str) -> None:
    recipe = load_any(RECIPE_OF[kind], expect=kind)  # defaults fill everything the recipe leaves out
    assert _out_of_range(recipe, "") == []


# ---------------------------------------------------------------- bad values


BAD = [
    # (kind, override, key, message after "key: ")
    ("sft", "optim.lr=-1", "optim.lr", "must be >= 0 and finite, got -1.0"),
    ("sft", "optim.lr=nan", "optim.lr", "must be >= 0 and finite, got nan"),  # _parse_value: float("nan")
    ("sft", "optim.lr=.nan", "optim.lr", "must be >= 0 and finite, got nan"),  # YAML's NaN
    ("sft", "optim.lr=-.inf", "optim.lr", "must be >= 0 and finite, got -inf"),
    ("sft", "optim.lr=inf", "optim.lr", "must be >= 0 and finite, got inf"),
    ("sft", "optim.projector_lr=-1e-5", "optim.projector_lr", "must be >= 0 and finite, got -1e-05"),
    ("sft", "optim.weight_decay=-0.01", "optim.weight_decay", "must be >= 0 and finite, got -0.01"),
    (
        "sft",
        "optim.max_grad_norm=-1",
        "optim.max_grad_norm",
        "must be >= 0 and finite (0: no clipping), got -1.0",
    ),
    ("sft", "optim.betas=[0.9, 1.0]", "optim.betas[1]", "must be in [0, 1), got 1.0"),
    ("sft", "optim.betas=[-0.1, 0.99]", "optim.betas[0]", "must be in [0, 1), got -0.1"),
    ("sft", "optim.betas=[0.9, .nan]", "optim.betas[1]", "must be in [0, 1), got nan"),
    ("sft", "optim.warmup_ratio=1.0", "optim.warmup_ratio", "must be in [0, 1), got 1.0"),
    ("sft", f"data.max_length={10**12}", "data.max_length", "must be in [1, 1048576], got 1000000000000"),
    ("sft", "data.max_length=0", "data.max_length", "must be in [1, 1048576], got 0"),
    (
        "sft",
        "data.sources.0.weight=0",
        "data.sources[0].weight",
        "must be in (0, 1] (a fraction of the mix), got 0.0",
    ),
    ("sft", "data.sources.0.repeat=0", "data.sources[0].repeat", "must be >= 1, got 0"),
    ("sft", "run.seed=-1", "run.seed", "must be in [0, 4294967295], got -1"),
    ("sft", f"run.seed={2**32}", "run.seed", "must be in [0, 4294967295], got 4294967296"),
    ("sft", "run.micro_batch_size=0", "run.micro_batch_size", "must be >= 1, got 0"),
    ("sft", "run.max_steps=0", "run.max_steps", "must be >= 1 (or null: all epochs), got 0"),
    ("sft", "lora.dropout=1.0", "lora.dropout", "must be in [0, 1), got 1.0"),
    ("sft", "lora.alpha=0", "lora.alpha", "must be >= 1, got 0"),
    ("grpo", "grpo.epsilon=-0.1", "grpo.epsilon", "must be in [0, 1], got -0.1"),
    (
        "grpo",
        "grpo.epsilon_high=0.1",
        "grpo.epsilon_high",
        "clips the ratio above at 1 + epsilon_high: must be >= epsilon (0.2), got 0.1",
    ),
    ("grpo", "grpo.temperature=0", "grpo.temperature", "must be > 0 and finite, got 0.0"),
    ("grpo", "grpo.top_p=0", "grpo.top_p", "must be in (0, 1], got 0.0"),
    ("grpo", "grpo.top_k=-1", "grpo.top_k", "must be >= 0 (0 or null: off), got -1"),
    ("grpo", "grpo.beta=-0.01", "grpo.beta", "must be >= 0 and finite, got -0.01"),
    ("grpo", "grpo.reward_weights=[1.0, .inf]", "grpo.reward_weights[1]", "must be finite, got inf"),
    ("grpo", "grpo.max_completion_length=2097152", "grpo.max_completion_length", "must be in [1, 1048576]"),
    (
        "grpo",
        "grpo.num_generations=1",
        "grpo.num_generations",
        "must be >= 2 (GRPO compares completions), got 1",
    ),
    (
        "pipeline",
        "eval.temperature=-0.5",
        "eval.temperature",
        "must be >= 0 and finite (0: greedy), got -0.5",
    ),
    ("pipeline", "eval.limit=0", "eval.limit", "must be >= 1 (or null: every row), got 0"),
    ("distill", "teacher.timeout=0", "teacher.timeout", "must be > 0 and finite, got 0.0"),
    ("distill", "teacher.max_retries=5000", "teacher.max_retries", "must be in [0, 100], got 5000"),
    ("distill", "teacher.backoff=100", "teacher.max_backoff", "must be >= backoff (100), got 60"),
    ("assemble", "vision.feature_layer=5000", "vision.feature_layer", "must be in [-1024, 1024], got 5000"),
]


def _origin(override: str, key: str, recipe: Path) -> str:
    """What an error at ``key`` blames: the override that set that key (or a section above it), else the file
    (a combination check on a key the override did not set, e.g. max_backoff after backoff=100)."""
    set_key = _key(override.split("=", 1)[0])
    if key == set_key or key.startswith((f"{set_key}.", f"{set_key}[")):
        return f"override {override!r}"
    return str(recipe)


@pytest.mark.parametrize(("kind", "override", "key", "message"), BAD, ids=[row[1] for row in BAD])
def test_bad_values_fail_naming_origin_and_key_path(kind: str, override: str, key: str, message: str) -> None:
    path = RECIPE_OF[kind]
    with pytest.raises(RecipeError) as err:
        load_any(path, [override], expect=kind)
    where = _origin(override, key, path)
    assert (err.value.file, err.value.key) == (where, key)
    assert str(err.value).startswith(f"{where}: {key}: {message}")


@pytest.mark.parametrize("literal", [".nan", ".NaN", ".inf", "-.inf", "-1.0e-3"])
def test_bad_values_written_in_the_yaml_file_name_it(tmp_path: Path, literal: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"extends: {TINY / 'sft.yaml'}\noptim:\n  lr: {literal}\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: optim\.lr: must be >= 0 and finite, got ") as err:
        load_any(recipe)
    assert err.value.file == str(recipe)


# ---------------------------------------------------------------- boundaries, generically


def _text(value: float) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _boundaries(bound: Range, tp: Any) -> tuple[list[float], list[float]]:
    """(values the range must admit, values it must refuse) at each of its bounds; floats are refused as NaN."""
    is_int = not _numeric_float(tp)
    step_down = (lambda v: v - 1) if is_int else (lambda v: math.nextafter(v, -math.inf))
    step_up = (lambda v: v + 1) if is_int else (lambda v: math.nextafter(v, math.inf))
    cast = int if is_int else float
    good, bad = [], []
    if bound.ge is not None:
        good.append(cast(bound.ge))
        bad.append(cast(step_down(bound.ge)))
    if bound.gt is not None:
        good.append(cast(step_up(bound.gt)))
        bad.append(cast(bound.gt))
    if bound.le is not None:
        good.append(cast(bound.le))
        bad.append(cast(step_up(bound.le)))
    if bound.lt is not None:
        good.append(cast(step_down(bound.lt)))
        bad.append(cast(bound.lt))
    if not is_int:
        bad += [math.nan, math.inf, -math.inf]
    return good, bad


def _numeric_float(tp: Any) -> bool:
    return tp is float or any(_numeric_float(a) for a in _args(tp))


# Boundary values that only a combination check refuses, and the overrides that make room for them.
MAKE_ROOM = {
    ("grpo", "grpo.epsilon_high"): ["grpo.epsilon=0"],  # epsilon_high >= epsilon
    ("distill", "teacher.max_backoff"): ["teacher.backoff=0"],  # max_backoff >= backoff
    ("assemble", "projector.scale_factor"): ["projector.type=pixel_shuffle"],  # only pixel_shuffle takes one
    # vllm_* keys need backend vllm; vLLM's context must hold data.max_length; clip_min < clip_max
    **{
        ("grpo", f"grpo.rollout.vllm_{key}"): ["grpo.rollout.backend=vllm"]
        for key in ("server_port", "server_timeout", "gpu_memory_utilization", "importance_sampling_clip_max")
    },
    ("grpo", "grpo.rollout.vllm_max_model_length"): ["grpo.rollout.backend=vllm", "data.max_length=1"],
    ("grpo", "grpo.rollout.vllm_importance_sampling_clip_min"): [
        "grpo.rollout.backend=vllm",
        "grpo.rollout.vllm_importance_sampling_clip_max=null",
    ],
}
# Where a single-source data mix cannot hold a weight below 1: the weights of all sources sum to 1.
TWO_SOURCES = "[{name: a, path: a.jsonl, format: %s, weight: %s}, {name: b, path: b.jsonl, format: %s}]"
SOURCE_FORMAT = {"projector": "llava", "sft": "messages", "grpo": "rl"}
NOT_IN_THIS_KIND = {
    ("distill", "data.sources.0.weight")
}  # distill reads each row once: any weight is refused


def _override(kind: str, path: str, tp: Any, value: float) -> list[str]:
    text = _text(value)
    if _is_list(tp):
        n = len(load_any(RECIPE_OF[kind]).grpo.reward_funcs) if path == "grpo.reward_weights" else 2
        return [f"{path}=[{', '.join([text] * n)}]"]
    if path == "data.sources.0.weight" and value != 1:
        fmt = SOURCE_FORMAT[kind]
        return [f"data.sources={TWO_SOURCES % (fmt, text, fmt)}"]
    return [*MAKE_ROOM.get((kind, path), []), f"{path}={text}"]


BOUNDARY_CASES = [
    (kind, path, tp, value, ok)
    for kind, path, _owner, f, tp in NUMERIC
    if (kind, path) not in NOT_IN_THIS_KIND
    for ok, values in zip((True, False), _boundaries(field_range(f), tp), strict=True)
    for value in values
]


@pytest.mark.parametrize(
    ("kind", "path", "tp", "value", "ok"),
    BOUNDARY_CASES,
    ids=[f"{c[0]}:{c[1]}={_text(c[3])}:{'ok' if c[4] else 'bad'}" for c in BOUNDARY_CASES],
)
def test_each_boundary_is_admitted_or_refused(kind: str, path: str, tp: Any, value: float, ok: bool) -> None:
    recipe = RECIPE_OF[kind]
    overrides = _override(kind, path, tp, value)
    if ok:
        load_any(recipe, overrides, expect=kind)
        return
    key = f"{_key(path)}[0]" if _is_list(tp) else _key(path)
    if overrides[-1].startswith("data.sources=["):
        key = "data.sources[0].weight"
    with pytest.raises(RecipeError) as err:
        load_any(recipe, overrides, expect=kind)
    assert (err.value.file, err.value.key) == (f"override {overrides[-1]!r}", key)
    assert err.value.message.startswith("must be ") and err.value.message.endswith(f"got {value!r}")


def test_not_in_this_kind_is_refused_by_its_combination_check() -> None:
    with pytest.raises(RecipeError, match=r"data\.sources\[0\]: distill reads each row once"):
        load_any(RECIPE_OF["distill"], ["data.sources.0.weight=1"])


# ---------------------------------------------------------------- the command line and the reference


def test_cli_refuses_a_negative_lr_in_one_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    recipe = TINY / "sft.yaml"
    assert main(["sft", str(recipe), f"output_dir={out}", "optim.lr=-1"]) == 2
    captured = capsys.readouterr()
    assert (
        captured.err.strip() == "error: override 'optim.lr=-1': optim.lr: must be >= 0 and finite, got -1.0"
    )
    assert captured.out == ""
    assert not out.exists()


def test_recipe_reference_is_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location(
        "recipe_reference", ROOT / "scripts" / "recipe_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.OUT.read_text() == module.render(), "run .venv/bin/python scripts/recipe_reference.py"
    assert "| `optim.betas` | `list[float]` | `[0.9, 0.999]` | `[0, 1)` |" in module.render()
