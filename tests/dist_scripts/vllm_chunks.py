"""``Engine.gathered_parameters_in_chunks`` under ZeRO-3 on 2 processes, for ``tests/test_vllm_backend.py``.

Rank 0 writes ``<out>/chunks.json``: per chunk its names and sizes, whether every tensor equals the
consolidated ``full_state_dict`` one, and how many parameter elements the rank held whole while it was yielded
(at most one module beyond its shard, never the model).

    torchrun --nproc_per_node 2 tests/dist_scripts/vllm_chunks.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from align.engine import ParamGroup, init_distributed, setup


def main(out: Path) -> int:
    dist = init_distributed()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.Linear(64, 8, bias=False))
    model[0].requires_grad_(False)  # frozen: a select that keeps trainable tensors skips it
    params = [p for p in model.parameters() if p.requires_grad]
    config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine = setup(
        model,
        [ParamGroup("all", params, lr=1e-2)],
        dist=dist,
        strategy="zero3",
        micro_batch_size=1,
        deepspeed_config=config,
    )
    full = engine.full_state_dict()
    records = []
    for chunk in engine.gathered_parameters_in_chunks(lambda name, p: p.requires_grad):
        whole = sum(p.numel() for p in model.parameters() if p.data.numel() == p.ds_numel)
        records.append(
            {
                "names": [n for n, _ in chunk],
                "numel": sum(t.numel() for _, t in chunk),
                "held_whole": whole,
                "equal": None if full is None else all(torch.equal(t.cpu(), full[n]) for n, t in chunk),
            }
        )
    after = sum(p.data.numel() for p in model.parameters())
    if dist.is_main:
        total = sum(p.ds_numel for p in model.parameters())
        (out / "chunks.json").write_text(json.dumps({"chunks": records, "total": total, "after": after}))
    return dist.shutdown(0)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
