"""The strict recipe loader: every kind of mistake fails before work starts, naming file and key path."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from align.cli import main
from align.config import (
    Range,
    RecipeError,
    apply_overrides,
    from_dict,
    load_recipe,
    ranged,
    read_yaml,
    save_resolved,
)


@dataclass
class Optim:
    lr: float = 1e-3
    schedule: Literal["cosine", "linear", "constant"] = "cosine"


@dataclass
class Source:
    path: str
    weight: float | None = None


@dataclass
class Schema:
    kind: Literal["toy"]
    name: str
    steps: int = 10
    flag: bool = False
    optim: Optim = field(default_factory=Optim)
    sources: list[Source] = field(default_factory=list)
    tags: dict[str, int] = field(default_factory=dict)

    def check(self) -> None:
        if self.flag and self.steps < 1:
            raise RecipeError.at("steps", "must be >= 1 when flag is set")


@dataclass
class Ranged:
    count: int = ranged(1, ge=1)
    ratio: float = ranged(0.5, ge=0, lt=1)
    limit: int | None = ranged(None, ge=1, note="or null: no limit")
    betas: list[float] = ranged(default_factory=lambda: [0.9, 0.999], gt=0, le=1)
    scales: dict[str, float] = ranged(default_factory=dict, gt=0)
    offset: float = ranged(0.0)
    plain: float = 1.0  # no range declared: still finite


GOOD = {"kind": "toy", "name": "x"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**GOOD, "step": 3}, "r.yaml: step: unknown key (did you mean 'steps'?)"),
        ({**GOOD, "optim": {"lr": "fast"}}, "r.yaml: optim.lr: expected float, got str 'fast'"),
        (
            {**GOOD, "optim": {"schedule": "cos"}},
            "r.yaml: optim.schedule: expected one of 'cosine' | 'linear' | 'constant'",
        ),
        ({**GOOD, "steps": 2.5}, "r.yaml: steps: expected int, got float 2.5"),
        ({**GOOD, "steps": True}, "r.yaml: steps: expected int, got bool True"),
        ({**GOOD, "flag": "yes"}, "r.yaml: flag: expected bool, got str 'yes'"),
        ({"kind": "toy"}, "r.yaml: name: missing required key (str)"),
        (
            {**GOOD, "sources": [{"path": "a"}, {"weight": 1}]},
            "r.yaml: sources[1].path: missing required key",
        ),
        (
            {**GOOD, "sources": [{"path": "a", "wieght": 1}]},
            "r.yaml: sources[0].wieght: unknown key (did you mean 'weight'?)",
        ),
        ({**GOOD, "tags": {"a": "b"}}, "r.yaml: tags.a: expected int, got str 'b'"),
        ({**GOOD, "optim": 3}, "r.yaml: optim: expected a mapping (Optim), got int"),
        ({**GOOD, "flag": True, "steps": 0}, "r.yaml: steps: must be >= 1 when flag is set"),
        ({**GOOD, "kind": "other"}, "r.yaml: kind: expected one of 'toy', got 'other'"),
    ],
)
def test_errors_name_file_and_key_path(data: dict, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        from_dict(Schema, data, file="r.yaml")
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"count": 0}, "r.yaml: count: must be >= 1, got 0"),
        ({"ratio": 1}, "r.yaml: ratio: must be in [0, 1), got 1.0"),
        ({"ratio": "nan"}, "r.yaml: ratio: must be in [0, 1), got nan"),
        ({"limit": 0}, "r.yaml: limit: must be >= 1 (or null: no limit), got 0"),
        ({"betas": [0.5, 0]}, "r.yaml: betas[1]: must be in (0, 1], got 0.0"),
        ({"scales": {"a": 2, "b": -1}}, "r.yaml: scales.b: must be > 0 and finite, got -1.0"),
        ({"scales": {"a": float("inf")}}, "r.yaml: scales.a: must be > 0 and finite, got inf"),
        ({"offset": float("-inf")}, "r.yaml: offset: must be finite, got -inf"),
        ({"plain": float("nan")}, "r.yaml: plain: must be finite, got nan"),
        ({"count": 1.0}, "r.yaml: count: expected int, got float 1.0"),
    ],
)
def test_ranges_are_checked_with_file_and_key(data: dict, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        from_dict(Ranged, data, file="r.yaml")
    assert str(err.value) == message


def test_range_boundaries_and_none_pass() -> None:
    r = from_dict(Ranged, {"count": 1, "ratio": 0, "limit": None, "betas": [1, 1e-9], "offset": -1e300})
    assert (r.count, r.ratio, r.limit, r.betas, r.offset) == (1, 0.0, None, [1.0, 1e-9], -1e300)
    assert (
        Range(gt=0, le=1).describe() == "in (0, 1]" and Range(ge=0).describe(finite=True) == ">= 0 and finite"
    )
    with pytest.raises(TypeError, match="one lower and one upper bound"):
        Range(ge=0, gt=0)


def test_valid_recipe_converts_types() -> None:
    r = from_dict(Schema, {**GOOD, "optim": {"lr": "1e-4"}, "sources": [{"path": "a", "weight": 2}]})
    assert r.optim.lr == pytest.approx(1e-4) and isinstance(r.sources[0].weight, float)
    assert r.optim.schedule == "cosine" and r.steps == 10


def test_overrides_parse_yaml_values_and_address_lists() -> None:
    data = {"optim": {"lr": 1.0}, "sources": [{"path": "a"}]}
    out = apply_overrides(data, ["optim.lr=2e-5", "steps=7", "sources.0.weight=0.5", "new.deep.key=true"])
    assert out["optim"]["lr"] == 2e-5 and out["steps"] == 7 and out["sources"][0]["weight"] == 0.5
    assert out["new"]["deep"]["key"] is True
    assert data["optim"]["lr"] == 1.0, "overrides must not mutate the input"
    with pytest.raises(RecipeError, match="not of the form"):
        apply_overrides(data, ["optim.lr"])
    with pytest.raises(RecipeError, match=r"optim\.lr is a value"):
        apply_overrides(data, ["optim.lr.x=1"])


def test_extends_deep_merges_and_detects_cycles(tmp_path) -> None:
    (tmp_path / "base.yaml").write_text("kind: toy\nname: base\noptim: {lr: 0.1, schedule: linear}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\noptim: {lr: 0.2}\n")
    r = load_recipe(Schema, tmp_path / "child.yaml", ["steps=3"])
    assert (r.name, r.optim.lr, r.optim.schedule, r.steps) == ("base", 0.2, "linear", 3)
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        read_yaml(tmp_path / "a.yaml")


def test_bad_yaml_and_missing_file(tmp_path) -> None:
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        read_yaml(tmp_path / "bad.yaml")
    with pytest.raises(RecipeError, match="not found"):
        read_yaml(tmp_path / "nope.yaml")


def test_resolved_recipe_round_trips(tmp_path) -> None:
    r = from_dict(Schema, {**GOOD, "sources": [{"path": "a"}]})
    out = save_resolved(r, tmp_path)
    assert load_recipe(Schema, out) == r


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("kind: assemble\nvision: {source: hf, name_or_path: x, feature_layr: -2}\n")
    assert main(["assemble", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {recipe}: vision.feature_layr: unknown key (did you mean 'feature_layer'?)"
    with pytest.raises(RecipeError):
        main(["assemble", str(recipe), "--debug"])


def test_override_list_index_errors_name_the_override_and_file(tmp_path) -> None:
    from align.config import load_any

    path = tmp_path / "r.yaml"
    path.write_text(
        "kind: assemble\nvision: {source: hf, name_or_path: x}\nllm: {name_or_path: y}\noutput_dir: o\n"
    )
    with pytest.raises(
        RecipeError, match=r"^override 'vision\.name_or_path\.y=1': vision\.name_or_path is a value"
    ):
        load_any(path, ["vision.name_or_path.y=1"])
    data = {"sources": [{"path": "a"}]}
    with pytest.raises(RecipeError, match=r"'5' is not an index of a list of 1 items"):
        apply_overrides(data, ["sources.5.path=x"])
    with pytest.raises(RecipeError, match=r"'x' is not an index"):
        apply_overrides(data, ["sources.x.path=y"])


def test_debug_flag_works_before_the_command(tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("kind: assemble\nvision: {source: hf, name_or_path: x, feature_layr: -2}\n")
    with pytest.raises(RecipeError):
        main(["--debug", "assemble", str(recipe)])


TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny"


@pytest.mark.parametrize(
    ("recipe", "override", "message"),
    [
        # TRL / transformers TrainingArguments names point to align's key
        ("sft", "learning_rate=1e-5", "learning_rate: unknown key (did you mean 'optim.lr'?)"),
        ("sft", "per_device_train_batch_size=2", "(did you mean 'run.micro_batch_size'?)"),
        ("sft", "gradient_accumulation_steps=4", "(did you mean 'run.grad_accum'?)"),
        ("sft", "num_train_epochs=3", "(did you mean 'run.epochs'?)"),
        ("sft", "save_steps=100", "(did you mean 'run.save_every'?)"),
        ("sft", "logging_steps=10", "(did you mean 'run.log_every'?)"),
        ("sft", "warmup_ratio=0.1", "(did you mean 'optim.warmup_ratio'?)"),
        ("sft", "max_grad_norm=1", "(did you mean 'optim.max_grad_norm'?)"),
        ("sft", "weight_decay=0.1", "(did you mean 'optim.weight_decay'?)"),
        ("sft", "lr_scheduler_type=linear", "(did you mean 'optim.schedule'?)"),
        ("sft", "bf16=true", "(did you mean 'run.precision'? bf16 | fp32 | auto)"),
        ("sft", "seed=1", "(did you mean 'run.seed'?)"),
        ("sft", "deepspeed=zero3.json", "(did you mean 'run.deepspeed_config'?"),
        ("sft", "run.learning_rate=1e-5", "run.learning_rate: unknown key (did you mean 'optim.lr'?)"),
        ("grpo", "num_generations=4", "(did you mean 'grpo.num_generations'?)"),
        ("grpo", "beta=0.1", "(did you mean 'grpo.beta'?)"),
        ("grpo", "epsilon=0.2", "(did you mean 'grpo.epsilon'?)"),
        # align's own name in the wrong section, and a section that does not exist
        ("sft", "lr=1e-5", "lr: unknown key (did you mean 'optim.lr'?)"),
        ("sft", "train.lr=abc", "train: unknown key (did you mean 'optim.lr'?)"),
        # typos inside a section still get the closest key there
        ("sft", "optim.lrr=1", "optim.lrr: unknown key (did you mean 'lr'?)"),
        ("sft", "data.sources[0].wieght=1", "data.sources[0].wieght: unknown key (did you mean 'weight'?)"),
        # a bad value is the override's fault, not the file's
        ("sft", "optim.lr=abc", "optim.lr: expected float, got str 'abc'"),
        ("sft", "data.sources[3].path=x", "'3' is not an index of a list of 1 items"),
    ],
)
def test_override_errors_name_the_override_and_point_to_aligns_key(
    recipe: str, override: str, message: str
) -> None:
    from align.config import load_any

    with pytest.raises(RecipeError) as err:
        load_any(TINY / f"{recipe}.yaml", [override])
    text = str(err.value)
    assert text.startswith(f"override {override!r}: ") and message in text
    assert "tiny" not in text  # the recipe file is not blamed


@pytest.mark.parametrize("override", ["data.sources[0].path=x.jsonl", "data.sources.0.path=x.jsonl"])
def test_list_items_take_both_index_spellings(override: str) -> None:
    from align.config import load_any

    assert load_any(TINY / "sft.yaml", [override]).data.sources[0].path == "x.jsonl"


def test_a_file_error_still_names_the_file(tmp_path) -> None:
    from align.config import load_any

    path = tmp_path / "r.yaml"
    path.write_text((TINY / "sft.yaml").read_text() + "learning_rate: 1.0e-5\n")
    with pytest.raises(
        RecipeError, match=r"r\.yaml: learning_rate: unknown key \(did you mean 'optim\.lr'\?\)"
    ):
        load_any(path, ["optim.lr=1e-4"])
