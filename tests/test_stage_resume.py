"""The checkpoint bookkeeping behind ``--resume``: which step folders count, pruning, metrics truncation.

Killing real runs and resuming them is tests/test_crash_safety.py.

    HF_HUB_OFFLINE=1 .venv/bin/pytest -q tests/test_stage_resume.py
"""

from __future__ import annotations

import json
from pathlib import Path

from align.stages.common import (
    checkpoints,
    prune_checkpoints,
    remove_incomplete_checkpoints,
    truncate_jsonl,
)


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

    (tmp_path / ".model.tmp-x1y2").mkdir()  # the final model's atomic save, interrupted
    (tmp_path / "model").mkdir()
    removed = sorted(p.name for p in remove_incomplete_checkpoints(tmp_path))
    assert removed == [".model.tmp-x1y2", "step-0000004", "step-0000006", "step-0000008"]
    assert (tmp_path / "model").is_dir()
    prune_checkpoints(tmp_path, keep_last=1)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step-0000010", "step-0000012.tmp", "step-abc"]  # folders that are not ours stay


def test_truncate_jsonl_keeps_the_steps_up_to_the_checkpoint(tmp_path: Path) -> None:
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    truncate_jsonl(tmp_path / "metrics.jsonl", 3)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]
    truncate_jsonl(tmp_path / "metrics.jsonl", 0)  # a fresh run into the same folder starts an empty log
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    truncate_jsonl(tmp_path / "none" / "metrics.jsonl", 3)  # nothing to do
