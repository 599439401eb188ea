"""The reward self-check (``align.rewards.gold_self_check``, run on every GRPO row by ``align data check`` and
before training) and golds written the way completions are (``<answer>…</answer>``).

A reward that cannot give a row's own gold, written as a perfect completion, its maximum would train on rewards
that can only be lower: it is named with the row, and under ``data.strict`` the run stops before any model loads.

    HF_HUB_OFFLINE=1 .venv/bin/pytest -q tests/test_gold_self_check.py
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from align.cli import main
from align.data.synth import synthesize
from align.rewards import accuracy, gold_self_check, load_reward, perfect_completion

ROOT = Path(__file__).resolve().parents[1]
REWARDS = ROOT / "tests" / "dist_scripts" / "grpo_rewards.py"


@pytest.mark.parametrize(
    ("gold", "right", "wrong"),
    [
        ("<answer>3</answer>", "3", "4"),
        ("<answer> 3 </answer>", "3", "4"),
        ("<answer>yes</answer>", "yes", "no"),
        ("<answer>pink primrose</answer>", "pink primrose", "red rose"),
        ("<think>count</think><answer>B</answer>", "B", "C"),  # the last answer block of a whole completion
        ("<answer>\\frac{1}{2}</answer>", "0.5", "0.25"),
    ],
)
def test_golds_in_answer_tags_are_their_content(gold: str, right: str, wrong: str) -> None:
    assert accuracy(f"<answer>{right}</answer>", gold) == 1.0
    assert accuracy(f"<answer>{wrong}</answer>", gold) == 0.0


def _constant(value):
    def reward(completions, solution, **columns):
        return [value] * len(completions)

    return reward


def _raises(completions, solution, **columns):
    raise KeyError("needs a column only a run has")


def _style(completions, **columns):  # reads no gold: not judged
    return [0.0] * len(completions)


@pytest.mark.parametrize(
    ("spec", "reward", "solution", "box", "expected"),
    [
        ("accuracy", load_reward("accuracy"), "3", None, None),
        ("accuracy", load_reward("accuracy"), "<answer>pink primrose</answer>", None, None),
        ("accuracy", load_reward("accuracy"), 7, None, None),
        ("format", load_reward("format"), "3", None, None),
        ("iou", load_reward("iou"), None, [10, 20, 30, 40], None),
        ("iou_soft", load_reward("iou_soft"), "[10, 20, 30, 40]", [10, 20, 30, 40], None),
        ("length", load_reward("length"), "3", None, None),  # reads no gold: not judged
        ("mine:zero", _constant(0.0), "3", None, "reward 'mine:zero' scores the gold itself 0"),
        ("mine:negative", _constant(-1.0), "3", None, "reward 'mine:negative' scores the gold itself -1"),
        (
            "mine:none",
            _constant(None),
            "3",
            None,
            "reward 'mine:none' scores the gold itself None (not applicable)",
        ),
        ("mine:half", _constant(0.5), "3", None, None),  # a custom reward's maximum is its own: > 0 passes
        ("mine:raises", _raises, "3", None, None),
        ("mine:style", _style, "3", None, None),
    ],
)
def test_self_check_table(spec, reward, solution, box, expected) -> None:
    assert gold_self_check(spec, reward, solution, box) == expected


def test_a_built_in_reward_below_its_maximum_is_named_with_its_maximum(monkeypatch) -> None:
    """A gold layout the built-in accuracy reward cannot parse (stand-in: a matcher that never agrees)."""
    import align.rewards as rewards

    monkeypatch.setitem(rewards.REWARDS, "accuracy", _constant(0.0))
    message = gold_self_check("accuracy", rewards.REWARDS["accuracy"], "3", None)
    assert message == "reward 'accuracy' scores the gold itself 0 (its maximum is 1)"


def test_the_perfect_completion_passes_every_built_in_on_its_gold() -> None:
    completion = perfect_completion("42")
    assert load_reward("format")([completion])[0] == 1.0
    assert load_reward("accuracy")([completion], solution=["42"])[0] == 1.0


@pytest.fixture(scope="module")
def questions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("self_check")
    synthesize(root / "synth", train=4, test=1)
    return root / "synth" / "train" / "rl.jsonl"


def _run(args: list[str]) -> tuple[int, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        rc = main(args)
    return rc, printed.getvalue()


def test_data_check_names_the_row_and_the_reward(questions: Path, siglip_qwen2: Path) -> None:
    args = [
        "data",
        "check",
        str(ROOT / "recipes/tiny/grpo.yaml"),
        f"--model={siglip_qwen2}",
        f"data.sources.0.path={questions}",
        f"grpo.reward_funcs=[{REWARDS}:never_right, format]",
    ]
    rc, printed = _run(args)
    assert rc == 2, printed
    assert f"{questions}:1: reward '{REWARDS}:never_right' scores the gold itself 0" in printed
    rc, printed = _run([*args[:-1], f"grpo.reward_funcs=[{REWARDS}:vowel_share, accuracy]"])
    assert rc == 0, printed  # a reward that reads no gold is not judged; accuracy scores every gold


def test_a_run_stops_before_loading_the_model(
    questions: Path, tmp_path: Path, siglip_qwen2: Path, monkeypatch
) -> None:
    import align.stages.common as common

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the rows were checked")

    monkeypatch.setattr(common, "load_llava", no_loading)
    args = [
        "grpo",
        str(ROOT / "recipes/tiny/grpo.yaml"),
        f"model={siglip_qwen2}",
        f"output_dir={tmp_path / 'run'}",
        f"data.sources.0.path={questions}",
        f"grpo.reward_funcs=[{REWARDS}:never_right, format]",
    ]
    rc, printed = _run(args)
    assert rc == 2
    error = [line for line in printed.splitlines() if line.startswith("error:")]
    assert (
        len(error) == 1
        and f"{questions}:1: reward '{REWARDS}:never_right' scores the gold itself 0" in error[0]
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
