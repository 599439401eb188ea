"""Crash safety of the training stages, proven with real ``kill -9``: SFT and GRPO runs that save a checkpoint
every few steps are killed mid-step, while a checkpoint's weights are written, while its training state is
written, and while the final model is written; ``--resume`` then finishes them.

For every kill: (a) no half-written checkpoint is picked up (the resume starts at the last complete one, and
what the kill left is removed); (b) every step's metrics (SFT loss; GRPO loss, reward, KL, ...) equal those of an
uninterrupted run with the same seed, and so do the final weights; (c) metrics.jsonl holds each step once.
And a second run started on a folder in use refuses with one line, while a killed run leaves no stuck lock.

The victim runs in a subprocess (``tests/dist_scripts/crash_at.py`` arms the kill); the uninterrupted and the
resumed runs go through ``align.cli.main`` here. All use one intra-op thread: the same operations in the same
order on the same inputs, so the resumed numbers are expected to be bitwise equal. The comparison allows 1e-6
(relative) so that a future kernel choice that differs in the last bit between processes does not fail it.

    HF_HUB_OFFLINE=1 .venv/bin/pytest -q tests/test_crash_safety.py
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
from safetensors.torch import load_file

from align.cli import main
from align.data.synth import synthesize
from align.runfolder import LOCK_NAME, check_output_dir, hold_output_dir
from align.stages.common import checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
VICTIM = ROOT / "tests" / "dist_scripts" / "crash_at.py"
VOWELS = f"{ROOT / 'tests' / 'dist_scripts' / 'grpo_rewards.py'}:vowel_share"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
STEPS = {"sft": 12, "grpo": 6}  # sft saves at 3, 6, 9; grpo at 2, 4
TIMEOUT_S = 300
# (stage, where it dies, which occurrence, steps logged before it died, the checkpoint the resume starts from)
KILLS = [
    ("sft", "step", 8, 7, 6),  # in step 8's optimizer step
    ("sft", "weights", 2, 6, 3),  # writing step 6's checkpoint model
    ("sft", "state", 3, 6, 3),  # writing step 6's training state (its first file)
    ("sft", "weights", 4, 12, 9),  # writing the final model
    ("grpo", "step", 3, 2, 2),
    ("grpo", "weights", 2, 4, 2),  # step 4's checkpoint model
    ("grpo", "state", 4, 4, 2),  # step 4's training state (its second file)
    ("grpo", "weights", 3, 6, 4),  # the final model
]


@pytest.fixture(scope="module")
def world(siglip_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("crash_world")
    synthesize(root / "synth", train=16, test=1)
    (root / "model").symlink_to(siglip_qwen2, target_is_directory=True)
    return root


def argv(stage: str, world: Path, out: Path) -> list[str]:
    common = [f"model={world / 'model'}", f"output_dir={out}", "run.tensorboard=false", "run.keep_last=2"]
    if stage == "sft":
        return [
            "sft",
            str(ROOT / "recipes/tiny/sft.yaml"),
            *common,
            f"data.sources.0.path={world / 'synth/train/sft.jsonl'}",
            "data.max_length=384",
            "run.micro_batch_size=4",
            "run.grad_accum=1",
            "run.epochs=3",
            "run.save_every=3",
            "lora.r=4",
            "lora.dropout=0.1",  # the resumed steps must replay their random dropout masks too
        ]
    return [
        "grpo",
        str(ROOT / "recipes/tiny/grpo.yaml"),
        *common,
        f"data.sources.0.path={world / 'synth/train/rl.jsonl'}",
        f"run.max_steps={STEPS['grpo']}",
        "run.save_every=2",
        "grpo.num_generations=4",
        "grpo.max_completion_length=8",
        f"grpo.reward_funcs=[{VOWELS}]",
        "optim.lr=1e-2",
    ]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def compared(row: dict) -> dict:
    """A metrics row without its wall-clock numbers."""
    return {
        k: v
        for k, v in row.items()
        if not k.startswith("time/") and k not in ("step_time_s", "tokens_per_s", "completion_tokens_per_s")
    }


def victim(args: list[str], point: str, n: int, log: Path, env: dict | None = None) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    environ.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, str(VICTIM), point, str(n), *args]
    with log.open("w") as sink:
        return subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=sink, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def uninterrupted(world: Path) -> dict[str, Path]:
    runs = {}
    for stage in STEPS:
        out = world / f"whole-{stage}"
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            assert main(argv(stage, world, out)) == 0, printed.getvalue()[-3000:]
        runs[stage] = out
    return runs


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "point", "n", "logged", "resume_at"), KILLS, ids=[f"{s}-{p}{n}" for s, p, n, *_ in KILLS]
)
def test_kill_9_then_resume_repeats_the_uninterrupted_run(
    world: Path,
    uninterrupted: dict[str, Path],
    tmp_path: Path,
    stage: str,
    point: str,
    n: int,
    logged: int,
    resume_at: int,
) -> None:
    out, log = tmp_path / "run", tmp_path / "victim.log"
    proc = victim(argv(stage, world, out), point, n, log)
    assert proc.wait(TIMEOUT_S) == -signal.SIGKILL, (
        f"not killed (exit {proc.returncode}):\n{log.read_text()[-3000:]}"
    )
    assert not (out / "summary.json").exists()
    assert [r["step"] for r in metrics(out)] == list(range(1, logged + 1)), "killed somewhere else"
    if point != "step":  # it died inside a write: a half-written temporary folder is on disk
        assert any(".tmp" in p.name for p in out.rglob("*"))

    # (a) the last complete checkpoint is the one the kill could not have touched
    assert checkpoints(out)[-1][0] == resume_at
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main([*argv(stage, world, out), "--resume"]) == 0, printed.getvalue()[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{resume_at:07d}'}" in printed.getvalue()
    leftovers = [p.name for p in out.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]
    assert leftovers == [], f"the kill's half-written files are still there: {leftovers}"
    assert all((p / "state" / "engine.json").is_file() for p in (out / "checkpoints").iterdir())

    # (c) each step once, in order
    whole, resumed = metrics(uninterrupted[stage]), metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, STEPS[stage] + 1))
    # (b) step by step the numbers of the uninterrupted run, and its final weights
    for a, b in zip(whole, resumed, strict=True):
        assert compared(b) == pytest.approx(compared(a), rel=1e-6, abs=1e-9), f"step {a['step']}"
    if stage == "grpo":
        assert {"reward", "kl", "loss"} <= set(resumed[-1])
    a = load_file(uninterrupted[stage] / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_refuses_and_a_killed_run_leaves_no_stuck_lock(
    world: Path, uninterrupted: dict[str, Path], tmp_path: Path
) -> None:
    out, paused = tmp_path / "run", tmp_path / "paused"
    first = victim(
        argv("sft", world, out), "pause", 5, tmp_path / "first.log", {"CRASH_AT_PAUSED": str(paused)}
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not paused.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert paused.exists(), (tmp_path / "first.log").read_text()[-3000:]
        before = (out / "metrics.jsonl").read_text()
        with contextlib.redirect_stderr(io.StringIO()) as err:
            assert main([*argv("sft", world, out), "--resume"]) == 2
        line = err.getvalue().strip()
        assert line.count("\n") == 0 and f"output_dir {out} is in use by another run (pid {first.pid}" in line
        assert (out / "metrics.jsonl").read_text() == before, "the refused run wrote into the folder"
    finally:
        first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL
    # the dead holder's lock file is still there, and does not hold anyone back
    assert (out / LOCK_NAME).exists()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main([*argv("sft", world, out), "--resume"]) == 0, printed.getvalue()[-3000:]
    assert "resumed from" in printed.getvalue()
    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS["sft"] + 1))


class Alone:
    is_main = True

    @staticmethod
    def all_reduce_mean(value: float) -> float:
        return value


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "run"
    with pytest.raises(RuntimeError), hold_output_dir(out, Alone()):
        assert (out / LOCK_NAME).exists()
        raise RuntimeError("data error")
    assert not (tmp_path / "a").exists()
    with hold_output_dir(out, Alone()):
        (out / "metrics.jsonl").write_text("")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "metrics.jsonl"]
    with pytest.raises(RuntimeError), hold_output_dir(out, Alone()):
        raise RuntimeError("a later failure")
    assert (out / "metrics.jsonl").exists(), "a folder with work in it is never removed"


def test_the_same_folder_cannot_be_held_twice(tmp_path: Path) -> None:
    from align.errors import AlignError

    with (
        hold_output_dir(tmp_path, Alone()),
        pytest.raises(AlignError, match=r"is in use by another run \(pid \d+ on"),
        hold_output_dir(tmp_path, Alone()),
    ):
        pass
    with hold_output_dir(tmp_path, Alone()):  # released when the holder ends
        pass


@pytest.mark.parametrize(
    ("below", "message"),
    [("", "exists and is a file, not a folder"), ("sub/run", "cannot be created, {file} is a file")],
)
def test_output_dir_that_is_or_sits_under_a_file(tmp_path: Path, below: str, message: str) -> None:
    from align.errors import AlignError

    file = tmp_path / "f"
    file.write_text("x")
    with pytest.raises(AlignError, match=message.format(file=file)):
        check_output_dir(file / below if below else file)
