"""The ZeRO-paper accounting of training memory per GPU: weights, gradients and optimizer states.

Used by ``align plan`` (before a run) and by every stage start (the plan beside what a rank really holds).
"""

from __future__ import annotations

STRATEGIES = ("ddp", "zero2", "zero3")
# Mixed-precision Adam as in the ZeRO paper: bf16 weights for every parameter; for each trainable one a bf16
# gradient plus an fp32 master copy and fp32 Adam m and v (4 + 4 + 4 bytes).
WEIGHT_BYTES = 2
GRAD_BYTES = 2
OPTIMIZER_BYTES = 12
ACCOUNTING = (
    "bf16 weights 2 B/param (every param), bf16 grads 2 B + fp32 master/Adam m/Adam v 12 B per trainable param; "
    "DDP replicates all, ZeRO-2 shards grads+optimizer over the GPUs, ZeRO-3 also shards weights. "
    "Excluded: activations, temporary/communication buffers, CUDA context, fragmentation."
)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def memory_per_gpu(trainable: int, frozen: int, gpus: int, strategy: str) -> dict[str, int]:
    """Bytes per GPU for weights, gradients, optimizer states and their total (activations excluded).

    Sharded tensors are split into ``gpus`` equal parts (rounded up, as ZeRO pads its partitions).
    """
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    shard = 1 if strategy == "ddp" else gpus
    weight_shard = gpus if strategy == "zero3" else 1
    out = {
        "weights": WEIGHT_BYTES * _ceil_div(trainable + frozen, weight_shard),
        "gradients": GRAD_BYTES * _ceil_div(trainable, shard),
        "optimizer": OPTIMIZER_BYTES * _ceil_div(trainable, shard),
    }
    out["total"] = sum(out.values())
    return out
