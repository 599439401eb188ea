"""Load a Llava folder ZeRO-3 partitioned on every rank and write what each rank holds, for tests/test_zero3_loading.py.

Each rank loads the model twice inside ``align.engine.partitioned_loading`` (a policy and a reference, as the
GRPO stage does) and records, right after loading, how many parameter elements it stores. Then it gathers the
policy whole and rank 0 compares every tensor with a plain (unpartitioned) load of the same folder.

    torchrun --nproc_per_node 2 tests/dist_scripts/zero3_loading.py MODEL_DIR DEEPSPEED_JSON OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from align.checkpoint import load_llava
from align.engine import gathered, held_parameters, init_distributed, partitioned_loading


def main(model_dir: str, ds_json: str, out_dir: str) -> int:
    dist = init_distributed()
    with partitioned_loading(dist, "zero3", ds_json, micro_batch_size=1):
        policy, _ = load_llava(model_dir)
        policy_held = held_parameters(policy)
        reference, _ = load_llava(model_dir)
        reference_held = held_parameters(reference)
    tensors = sum(1 for _ in policy.parameters())
    with gathered(policy.parameters()):
        whole = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    report = {
        "rank": dist.rank,
        "policy_held": policy_held[0],
        "reference_held": reference_held[0],
        "total": policy_held[1],
        "tensors": tensors,
    }
    if dist.is_main:
        plain, _ = load_llava(model_dir)
        expected = plain.state_dict()
        report["keys_equal"] = sorted(whole) == sorted(expected)
        report["max_abs_diff"] = max(
            float((whole[k].float() - expected[k].float()).abs().max()) for k in expected if k in whole
        )
    Path(out_dir, f"rank{dist.rank}.json").write_text(json.dumps(report))
    return dist.shutdown(0)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
