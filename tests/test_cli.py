"""The ``align`` command line itself: ``--version`` and ``--print-config`` on every recipe-taking command."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import align
from align.cli import COMMANDS, DATA_COMMANDS, RECIPE_KINDS, main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"align {align.__version__}"


def test_every_recipe_command_is_listed() -> None:
    assert set(RECIPE_KINDS) <= set(COMMANDS) | set(DATA_COMMANDS)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "kind", "key", "value"),
    [
        (["assemble", "tiny/assemble_siglip_qwen2.yaml", "seed=3"], "assemble", "seed", 3),
        (
            ["plan", "real/assemble_siglip_so400m_r1_qwen7b.yaml", "--gpus", "8"],
            "assemble",
            "dtype",
            "bfloat16",
        ),
        (["projector", "tiny/projector.yaml", "optim.lr=0.5"], "projector", "optim", {"lr": 0.5}),
        (
            ["sft", "tiny/sft.yaml", "data.sources[0].path=x.jsonl"],
            "sft",
            "data",
            {"sources": [{"path": "x.jsonl"}]},
        ),
        (["grpo", "tiny/grpo.yaml", "grpo.beta=0.5", "--resume"], "grpo", "grpo", {"beta": 0.5}),
        (["run", "tiny/pipeline.yaml"], "pipeline", "kind", "pipeline"),
        (["data", "distill", "tiny/distill.yaml", "seed=9"], "distill", "seed", 9),
    ],
)
def test_print_config_prints_the_resolved_recipe_and_does_nothing(
    argv: list[str], kind: str, key: str, value, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)  # any work would write under checkpoints/ here
    recipe = next(i for i, a in enumerate(argv) if a.endswith(".yaml"))
    argv = [*argv[:recipe], str(RECIPES / argv[recipe]), *argv[recipe + 1 :], "--print-config"]
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["kind"] == kind
    assert _contains(printed[key], value)
    assert list(tmp_path.iterdir()) == []


def _contains(found, expected) -> bool:
    """``expected`` is ``found`` or a part of it (mappings by key, lists item by item)."""
    if isinstance(expected, dict):
        return all(_contains(found[k], v) for k, v in expected.items())
    if isinstance(expected, list):
        return all(_contains(f, e) for f, e in zip(found, expected, strict=False))
    return found == expected


def test_print_config_reports_recipe_errors(capsys) -> None:
    assert main(["sft", str(RECIPES / "tiny" / "sft.yaml"), "learning_rate=1e-5", "--print-config"]) == 2
    assert "did you mean 'optim.lr'?" in capsys.readouterr().err
