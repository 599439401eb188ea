"""``align plot``: charts from metrics.jsonl, torn and resumed files, pipeline folders, nothing to plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from align.cli import main
from align.errors import AlignError
from align.plot import group_keys, plot_run, read_metrics, series


def _write(path: Path, rows: list[dict], tail: str = "") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + tail
    (path / "metrics.jsonl").write_text(text)
    return path


def _sft_rows(n: int) -> list[dict]:
    return [
        {
            "step": s,
            "loss": 2.0 * math.exp(-s / 20) + 0.2,
            "lr": 1e-5 * s / n,
            "grad_norm": 1.0 + s % 3,
            "epoch": 0,
        }
        for s in range(1, n + 1)
    ]


def _grpo_rows(n: int) -> list[dict]:
    return [
        {
            "step": s,
            "loss": 0.01 * s,
            "reward": 0.2 + 0.03 * s,
            "reward/accuracy": 0.1 + 0.03 * s,
            "reward/format": 0.5 + 0.02 * s,
            "reward_std": 0.1,
            "kl": 0.001 * s,
            "completion_length": 100.0 + s,
            "accuracy": 0.1 + 0.03 * s,
        }
        for s in range(1, n + 1)
    ]


def _assert_real_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 600 and image.height >= 300
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.var() > 0  # not a blank canvas
    assert (pixels < 128).mean() > 0.001  # something dark is drawn: text, axes and lines


@pytest.mark.parametrize(
    ("keys", "groups"),
    [
        (
            ["loss", "lr", "grad_norm", "epoch", "tokens_per_s"],
            {"loss": ["loss"], "lr": ["lr"], "grad_norm": ["grad_norm"]},
        ),
        (
            [
                "reward",
                "reward/accuracy",
                "reward/format",
                "reward_std",
                "accuracy",
                "kl",
                "completion_length",
            ],
            {
                "reward": ["reward", "reward/accuracy", "reward/format"],
                "accuracy": ["accuracy"],
                "completion_length": ["completion_length"],
                "kl": ["kl"],
            },
        ),
        (
            ["eval/loss", "eval/accuracy", "projector_lr"],
            {"loss": ["eval/loss"], "lr": ["projector_lr"], "accuracy": ["eval/accuracy"]},
        ),
        (
            ["loss", "loss/policy", "loss/kl", "kl", "lr_llm", "lr_projector"],
            {"loss": ["loss", "loss/kl", "loss/policy"], "lr": ["lr_llm", "lr_projector"], "kl": ["kl"]},
        ),
        (["epoch", "step_time_s"], {}),
    ],
)
def test_group_keys(keys: list[str], groups: dict[str, list[str]]) -> None:
    assert group_keys(keys) == groups


def test_stage_run_gets_one_png_per_group(tmp_path: Path) -> None:
    run = _write(tmp_path / "grpo", _grpo_rows(12))
    paths = plot_run(run)
    assert [p.name for p in paths] == [
        "reward.png",
        "loss.png",
        "accuracy.png",
        "completion_length.png",
        "kl.png",
    ]
    assert all(p.parent == run / "plots" for p in paths)
    for path in paths:
        _assert_real_png(path)


def test_pipeline_run_gets_each_stages_plots(tmp_path: Path) -> None:
    _write(tmp_path / "run" / "1-projector", _sft_rows(3))
    _write(tmp_path / "run" / "2-sft", _sft_rows(80))
    _write(tmp_path / "run" / "3-grpo", _grpo_rows(5))
    (tmp_path / "run" / "export").mkdir()  # no metrics: not a stage
    paths = plot_run(tmp_path / "run", tmp_path / "charts")
    by_stage = {p.parent.name for p in paths}
    assert by_stage == {"1-projector", "2-sft", "3-grpo"}
    assert (tmp_path / "charts" / "2-sft" / "loss.png") in paths
    assert (tmp_path / "charts" / "3-grpo" / "reward.png") in paths
    for path in paths:
        _assert_real_png(path)


def test_torn_last_line_still_plots(tmp_path: Path, capsys) -> None:
    run = _write(tmp_path / "crashed", _sft_rows(5), tail='{"step": 6, "loss": 0.4')
    rows, skipped = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and skipped == [6]
    assert main(["plot", str(run)]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 unreadable line(s): 6" in captured.err
    assert str(run / "plots" / "loss.png") in captured.out
    _assert_real_png(run / "plots" / "loss.png")


def test_resumed_run_replaces_replayed_steps_and_merges_same_step_rows(tmp_path: Path) -> None:
    lines = [
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.0},
        {"step": 3, "loss": 1.0},
    ]
    # crashed after step 3 while writing step 4; resumed from the step-1 checkpoint (append mode): the replayed
    # step 2 is glued to the torn line, the replayed step 3 replaces the first one
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo'
    text += json.dumps({"step": 2, "loss": 2.5}) + "\n"
    text += json.dumps({"step": 3, "loss": 1.5}) + "\n" + json.dumps({"step": 4, "loss": 1.25}) + "\n"
    text += json.dumps({"step": 4, "eval/accuracy": 0.5}) + "\n"  # a second row of the same step
    (tmp_path / "metrics.jsonl").write_text(text)
    rows, skipped = read_metrics(tmp_path / "metrics.jsonl")
    assert skipped == [4]  # the torn line and the row appended to it
    assert rows == [
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.0},
        {"step": 3, "loss": 1.5},
        {"step": 4, "loss": 1.25, "eval/accuracy": 0.5},
    ]


def test_series_skips_non_numbers(tmp_path: Path) -> None:
    rows = [
        {"step": 1, "loss": 1.0, "stage": "sft", "ok": True},
        {"step": 2, "loss": float("nan")},
        {"step": 3, "loss": 0.5},
    ]
    assert series(rows) == {"loss": ([1, 3], [1.0, 0.5])}


def test_metrics_without_plottable_keys_say_so(tmp_path: Path, capsys) -> None:
    run = _write(tmp_path / "odd", [{"step": 1, "epoch": 0, "step_time_s": 1.5}])
    assert main(["plot", str(run)]) == 1
    err = capsys.readouterr().err
    assert "nothing to plot" in err and "epoch, step_time_s" in err and "1 row(s)" in err
    assert not (run / "plots").exists()


def test_empty_metrics_file(tmp_path: Path, capsys) -> None:
    run = _write(tmp_path / "empty", [])
    assert plot_run(run) == []
    assert "nothing to plot: 0 row(s)" in capsys.readouterr().err


def test_folder_without_metrics_is_an_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(AlignError, match=r"no metrics\.jsonl"):
        plot_run(tmp_path)
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
