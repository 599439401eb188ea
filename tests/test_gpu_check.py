"""``scripts/gpu_check.sh --tiny``: every phase of the GPU check runs on the tiny zoo parts (CPU here).

The real check needs a GPU (``scripts/gpu_check.sh`` without ``--tiny``); this keeps the script working between
the sessions that have one: the same phases through the real CLI, the same table.

    HF_HUB_OFFLINE=1 .venv/bin/pytest -q tests/test_gpu_check.py
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_gpu_check_runs_every_phase_and_prints_the_table(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    phases = [row["phase"].split(" (")[0] for row in result["rows"]]
    assert phases[:4] == ["sft", "grpo align", "sft zero3", "export + reload"], phases
    sft, grpo, zero3, export = result["rows"][:4]
    assert sft["tokens_per_s"] > 0 and zero3["tokens_per_s"] > 0
    # the GRPO split adds up to less than the stage's wall time (which also loads the model and data)
    split = grpo["generation_s"] + grpo["logps_s"] + grpo["update_s"]
    assert 0 < split < grpo["wall_s"] and min(grpo["generation_s"], grpo["update_s"]) > 0
    assert export["logit_diff"] < 1e-2  # the exported bf16 folder, reloaded by transformers
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| ") == 1 + len(result["rows"])  # header + one line per phase
    assert "| sft (10 steps, packed) |" in table and proc.stdout.strip().endswith(
        table.strip().splitlines()[-1]
    )
