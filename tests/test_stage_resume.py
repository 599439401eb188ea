"""Kill-and-resume of ``align sft``: a run killed with SIGKILL after a checkpoint and resumed with ``--resume``
logs the losses and writes the weights of a run that was never interrupted.

The interrupted run is a real subprocess killed while it trains; the reference and the resumed run go through
``align.cli.main`` in this process. All three use one intra-op thread, so the arithmetic is identical.

    HF_HUB_OFFLINE=1 .venv/bin/pytest -q tests/test_stage_resume.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.assemble import AssembleRecipe, assemble
from align.cli import main
from align.config import from_dict
from align.data.synth import synthesize
from align.stages.common import (
    checkpoints,
    prune_checkpoints,
    remove_incomplete_checkpoints,
    truncate_metrics,
)

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "recipes" / "tiny" / "sft.yaml"
STEPS, SAVE_EVERY, KEEP_LAST = 12, 3, 2  # 16 rows, 4 per step, 3 epochs; checkpoints at steps 3, 6, 9
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_S = 300


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def overrides(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("resume_world")
    synthesize(root / "synth", train=16, test=1)
    spec = {
        "kind": "assemble",
        "vision": {"source": "hf", "name_or_path": str(zoo / "siglip-hf")},
        "llm": {"name_or_path": str(zoo / "qwen2-r1")},
        "output_dir": str(root / "model"),
    }
    model = assemble(from_dict(AssembleRecipe, spec))
    return [
        f"model={model}",
        f"data.sources.0.path={root / 'synth' / 'train' / 'sft.jsonl'}",
        "data.max_length=384",
        "run.micro_batch_size=4",
        "run.grad_accum=1",
        "run.epochs=3",
        f"run.save_every={SAVE_EVERY}",
        f"run.keep_last={KEEP_LAST}",
        "run.tensorboard=false",
        # LoRA with dropout: the resumed run must also replay the random dropout masks of the steps it redoes
        "lora.r=4",
        "lora.dropout=0.1",
    ]


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"metrics.jsonl repeats or reorders steps: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def kill_after_checkpoint(out: Path, overrides: list[str], log: Path) -> int:
    """Start the run in a subprocess; SIGKILL it once it has logged a step after its first checkpoint."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "align.cli", "sft", str(SFT), f"output_dir={out}", *overrides]
    with log.open("w") as sink:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                found = checkpoints(out)
                if found and (out / "metrics.jsonl").exists() and max(losses(out)) > found[-1][0]:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.02)
        finally:
            if proc.poll() is None and time.monotonic() >= deadline:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (
        f"the run was not killed mid-way (exit {proc.returncode}):\n{log.read_text()[-3000:]}"
    )
    return max(losses(out))


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_losses_and_weights_of_an_uninterrupted_one(
    overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    reference = tmp_path / "reference"
    assert main(["sft", str(SFT), f"output_dir={reference}", *overrides]) == 0
    assert [step for step, _ in checkpoints(reference)] == [6, 9]  # keep_last 2 of 3, 6, 9; none at the end

    out = tmp_path / "killed"
    killed_at = kill_after_checkpoint(out, overrides, tmp_path / "killed.log")
    assert not (out / "summary.json").exists() and not (out / "model").exists()
    resume_from = checkpoints(out)[-1][0]
    assert SAVE_EVERY <= resume_from < killed_at < STEPS
    # What a crash in the middle of a save leaves behind: a step folder without state/engine.json.
    half = out / "checkpoints" / f"step-{STEPS - 1:07d}"
    (half / "model").mkdir(parents=True)
    (half / "state.tmp").mkdir()
    (half / "state.tmp" / "engine.json").write_text("{}")
    assert checkpoints(out)[-1][0] == resume_from, "an interrupted save must not count as a checkpoint"

    capsys.readouterr()
    assert main(["sft", str(SFT), f"output_dir={out}", *overrides, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"resumed from {out / 'checkpoints' / f'step-{resume_from:07d}'} at step {resume_from}" in printed
    assert f"removed {half}: an interrupted save" in printed and not half.exists()

    expected, got = losses(reference), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))  # steps after the checkpoint were logged once, again
    assert [got[s] for s in range(resume_from + 1, STEPS + 1)] == pytest.approx(
        [expected[s] for s in range(resume_from + 1, STEPS + 1)], abs=1e-6, rel=0
    )
    assert expected[STEPS] < expected[1]  # and it trained
    a, b = (
        load_file(str(reference / "model" / "model.safetensors")),
        load_file(str(out / "model" / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"final weights differ by {worst:.2e}"
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["resumed_from"], summary["steps"]) == (resume_from, STEPS)
    assert [step for step, _ in checkpoints(out)] == [6, 9]


def test_checkpoints_lists_only_complete_step_folders(tmp_path: Path) -> None:
    layouts = {
        "step-0000002": "state/engine.json",  # complete
        "step-0000010": "state/engine.json",  # complete (numeric order, not text order)
        "step-0000004": "state.tmp/engine.json",  # crashed before the state was renamed into place
        "step-0000006": "state/optimizer.pt",  # crashed while the state was written
        "step-0000008": "model/config.json",  # crashed while the model was written
        "step-abc": "state/engine.json",  # not a step folder
        "step-0000012.tmp": "state/engine.json",
    }
    for folder, file in layouts.items():
        path = tmp_path / "checkpoints" / folder / file
        path.parent.mkdir(parents=True)
        path.write_text("{}")
    assert [(s, p.name) for s, p in checkpoints(tmp_path)] == [(2, "step-0000002"), (10, "step-0000010")]
    assert checkpoints(tmp_path / "nowhere") == []

    removed = sorted(p.name for p in remove_incomplete_checkpoints(tmp_path))
    assert removed == ["step-0000004", "step-0000006", "step-0000008"]
    prune_checkpoints(tmp_path, keep_last=1)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step-0000010", "step-0000012.tmp", "step-abc"]  # folders that are not ours stay


def test_truncate_metrics_keeps_the_steps_up_to_the_checkpoint(tmp_path: Path) -> None:
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    truncate_metrics(tmp_path, 3)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]
    truncate_metrics(tmp_path, 0)  # a fresh run into the same folder starts an empty log
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    truncate_metrics(tmp_path / "none", 3)  # nothing to do
