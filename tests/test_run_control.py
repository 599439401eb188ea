"""How a training run starts, saves and stops (``align/stages/common.py``: ``resume_point``, ``begin_outputs``,
``RunControl``, ``Progress``; ``align/cli.py:entry``).

* Ctrl-C (SIGINT) or SIGTERM stops a run at the next step boundary with a checkpoint and one line naming the
  command that continues it (rc 130, no traceback); ``--resume`` then finishes it with each step logged once.
  Proven on a real subprocess sent a real signal.
* The default save policy is time-based (``run.save_every_minutes``): a short interval saves after every step.
* A finished stage, or an interrupted one without a checkpoint, is never overwritten silently: one line and
  exit 2, unless ``--overwrite`` (which removes the earlier outputs, TensorBoard events included).
* Every stage says where its outputs and TensorBoard go before the first step; on a terminal the step line is a
  bar redrawn in place; GRPO warns once when its groups carry no reward spread for several rounds.

    HF_HUB_OFFLINE=1 .venv/bin/pytest -q tests/test_run_control.py
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align.cli import main
from align.data.synth import synthesize
from align.stages.common import Progress, checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def world(siglip_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run_control")
    synthesize(root / "synth", train=16, test=1)
    (root / "model").symlink_to(siglip_qwen2, target_is_directory=True)
    return root


def sft_args(world: Path, out: Path, *overrides: str) -> list[str]:
    return [
        "sft",
        str(ROOT / "recipes/tiny/sft.yaml"),
        f"model={world / 'model'}",
        f"output_dir={out}",
        f"data.sources.0.path={world / 'synth/train/sft.jsonl'}",
        "data.max_length=384",
        "run.micro_batch_size=2",
        "run.grad_accum=1",
        "run.save_every=0",
        "run.tensorboard=false",
        *overrides,
    ]


def run(args: list[str]) -> tuple[int, str]:
    """``align ARGS`` in this process: (exit code, stdout + stderr)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        rc = main(args)
    return rc, printed.getvalue()


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_at_a_step_boundary_with_a_checkpoint_and_resume_finishes(
    world: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    out = tmp_path / "run"
    args = sft_args(world, out, "run.epochs=2", "run.keep_last=1")  # 16 steps: more than it gets to
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from align.cli import entry; entry()", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    deadline = time.monotonic() + 240
    for line in proc.stdout:  # the first step line: training is under way
        lines.append(line)
        if line.startswith("step 2/") or time.monotonic() > deadline:
            break
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=240)
    output = "".join(lines) + rest
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output
    stopped = [line for line in output.splitlines() if "continue with:" in line]
    assert len(stopped) == 1, output[-3000:]
    assert stopped[0].startswith(f"{sig.name}: stopped after step ")
    assert stopped[0].endswith(" ".join(["align", *args, "--resume"]))
    at = int(stopped[0].split("stopped after step ")[1].split()[0])
    assert 2 <= at < 16
    assert [step for step, _ in checkpoints(out)] == [at]
    assert (
        f" step {at} of 16; checkpoint {out / 'checkpoints' / f'step-{at:07d}'}; continue with: "
        in stopped[0]
    )
    assert steps_logged(out) == list(range(1, at + 1))
    # the next run continues from there and logs each step once
    rc, printed = run([*args, "--resume"])
    assert rc == 0 and f"at step {at}" in printed, printed[-3000:]
    assert steps_logged(out) == list(range(1, 17))


def test_a_time_based_save_is_the_default_and_follows_its_interval(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc, printed = run(
        sft_args(world, out, "run.max_steps=3", "run.save_every_minutes=0.0001", "run.keep_last=5")
    )
    assert rc == 0, printed[-3000:]
    assert [step for step, _ in checkpoints(out)] == [1, 2]  # after every step but the last (the final model)
    from align.stages.common import RunSpec

    assert RunSpec().save_every_minutes == 10.0 and RunSpec().save_every == 0


def test_a_finished_or_started_run_is_not_overwritten_silently(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = sft_args(world, out, "run.max_steps=2", "run.tensorboard=true")
    rc, printed = run(args)
    assert (
        rc == 0
        and f"output: {out} (metrics.jsonl; TensorBoard: tensorboard --logdir {out / 'tensorboard'})"
        in printed
    )
    first = (out / "model" / "model.safetensors").read_bytes()
    rc, printed = run(args)
    assert rc == 2 and f"error: {out} holds a finished run" in printed and "--overwrite" in printed
    assert (out / "model" / "model.safetensors").read_bytes() == first
    assert steps_logged(out) == [1, 2]
    # an interrupted run that never saved: its metrics are refused too
    (out / "model" / "config.json").unlink()
    rc, printed = run(args)
    assert rc == 2 and "holds an earlier run's steps but there is no checkpoint" in printed
    events = sorted(p.name for p in (out / "tensorboard").iterdir())
    rc, printed = run([*args, "--overwrite"])
    assert rc == 0, printed[-3000:]
    assert steps_logged(out) == [1, 2]  # the earlier run's rows are gone, not appended to
    assert len(list((out / "tensorboard").iterdir())) == 1 and events != []
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) != events  # a fresh event file alone


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_in_a_log(capsys) -> None:
    for tty in (True, False):
        progress = Progress(4, 0, True, tty=tty)
        progress.update(0, {"loss": 1.5, "lr": 1e-3, "ignored": 7.0})
        progress.update(3, {"loss": 1.25})
        printed = capsys.readouterr().out
        if tty:
            assert printed.startswith("\r[######..................] step 1/4 loss=1.5 lr=0.001 eta=")
            assert "\r[########################] step 4/4 loss=1.25" in printed and printed.endswith("\n")
            assert printed.count("\n") == 1  # one line, redrawn
        else:
            assert printed.splitlines()[0].startswith("step 1/4 loss=1.5 lr=0.001 eta=")
            assert printed.count("\n") == 2 and "\r" not in printed


@pytest.mark.slow
def test_grpo_warns_once_when_no_group_has_reward_spread(world: Path, tmp_path: Path) -> None:
    """A random tiny model never writes the <think>/<answer> format: every group's format rewards are 0."""
    args = [
        "grpo",
        str(ROOT / "recipes/tiny/grpo.yaml"),
        f"model={world / 'model'}",
        f"output_dir={tmp_path / 'grpo'}",
        f"data.sources.0.path={world / 'synth/train/rl.jsonl'}",
        "grpo.reward_funcs=[format]",
        "grpo.max_completion_length=4",
        "run.max_steps=4",
        "run.tensorboard=false",
    ]
    rc, printed = run(args)
    assert rc == 0, printed[-3000:]
    warnings = [line for line in printed.splitlines() if line.startswith("warning: every group's")]
    assert warnings == [
        "warning: every group's 4 rewards were equal for 3 rounds in a row (frac_reward_zero_std 1.0, reward 0): "
        "all advantages are 0, nothing is learned; look at the rewards in completions.jsonl"
    ]
