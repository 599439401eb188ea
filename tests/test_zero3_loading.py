"""ZeRO-3 loading: each of 2 ranks holds half of the policy and of the reference from the moment they load.

``align.engine.partitioned_loading`` makes transformers build the model inside ``deepspeed.zero.Init`` and fill
the partitions module by module, so no rank materialises the whole model (at 8B on 8 GPUs: ~2 GB of bf16
weights per rank and model instead of 16 GB). The gathered weights equal a plain load exactly. The stages'
end-to-end equality with a 1-process run under this loading is ``tests/test_stage_distributed.py``.

    HF_HUB_OFFLINE=1 .venv/bin/pytest -q tests/test_zero3_loading.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from align.assemble import AssembleRecipe, assemble
from align.config import from_dict
from align.memory import memory_per_gpu

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "zero3_loading.py"


def test_each_rank_loads_only_its_partition(zoo: Path, tmp_path: Path) -> None:
    spec = {
        "kind": "assemble",
        "vision": {"source": "hf", "name_or_path": str(zoo / "siglip-hf")},
        "llm": {"name_or_path": str(zoo / "qwen2-r1")},
        "output_dir": str(tmp_path / "model"),
    }
    model = assemble(from_dict(AssembleRecipe, spec))
    zero3 = json.loads((ROOT / "recipes" / "deepspeed" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every tensor
    ds_json = tmp_path / "zero3_all.json"
    ds_json.write_text(json.dumps(zero3))
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(SCRIPT), str(model), str(ds_json), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]  # exit 0 alone proves nothing
    total, tensors = ranks[0]["total"], ranks[0]["tensors"]
    plan_share = memory_per_gpu(0, total, 2, "zero3")["weights"] // 2  # align plan's weights, in elements
    for r in ranks:
        for held in (r["policy_held"], r["reference_held"]):
            # ZeRO pads each tensor to a multiple of the world size: at most one element per tensor more
            assert plan_share <= held <= plan_share + tensors, (held, total)
            assert held < 0.51 * total
    assert ranks[0]["keys_equal"] and ranks[0]["max_abs_diff"] == 0.0
