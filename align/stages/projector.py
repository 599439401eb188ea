"""Stage 1: projector alignment on image captions (LLaVA-1.5 stage 1).

The same program as SFT (``align/stages/sft.py``) with stage-1 defaults: only the projector trains (vision
tower and LLM frozen), LR 1e-3 with cosine decay and 3% warm-up, no weight decay, and the frozen tower's
features cached per image in memory so later epochs skip the tower (``benchmarks/bench_feature_cache.py``).
The cache only pays when images are seen more than once; for one epoch over distinct images, and always
under ZeRO-3, write ``feature_cache: none``.

Run: ``align projector RECIPE [key=value ...] [--resume]``. Tests: ``pytest tests/test_stages.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from align.stages.common import OptimSpec, TrainableSpec, run_stage
from align.stages.sft import SFTRecipe, add_arguments, train

__all__ = ["ProjectorRecipe", "add_arguments", "run"]


@dataclass
class ProjectorRecipe(SFTRecipe):
    kind: Literal["projector"]  # type: ignore[assignment]
    optim: OptimSpec = field(default_factory=lambda: OptimSpec(lr=1e-3))
    trainable: TrainableSpec = field(
        default_factory=lambda: TrainableSpec(vision=False, projector=True, llm=False)
    )
    feature_cache: Literal["none", "memory", "disk"] = "memory"


def run(args) -> int:
    return run_stage(args, "projector", train)
