"""Run several ``align sft`` cases in one process group, for ``tests/test_stage_distributed.py``.

Starting torch, transformers and DeepSpeed costs 10-30 s per process on a 2-core machine, so the test runs
all its 2-process cases in one launch. Each case is exactly what ``align sft RECIPE OVERRIDES`` runs (the
stage's ``train``), one after another, on the same ranks.

    torchrun --nproc_per_node 2 tests/dist_scripts/stage_sft_cases.py RECIPE '{"ddp": ["output_dir=...", ...]}'
"""

from __future__ import annotations

import json
import os
import sys
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from align.config import load_any
from align.engine import init_distributed
from align.stages.sft import train


def main() -> int:
    recipe, cases = sys.argv[1], json.loads(sys.argv[2])
    dist = init_distributed()
    try:
        for name, overrides in cases.items():
            if dist.is_main:
                print(f"=== case {name}: {' '.join(overrides)}", flush=True)
            train(load_any(recipe, overrides, expect="sft"), dist, resume=False)
    except Exception:
        traceback.print_exc()
        return dist.shutdown(1)
    return dist.shutdown(0)


if __name__ == "__main__":
    sys.exit(main())
