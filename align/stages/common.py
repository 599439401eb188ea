"""What the stage programs share: recipe sections, the LR schedule, run-folder layout, metrics, progress.

The loops themselves stay in each stage's file. A stage's output folder (``output_dir``) holds::

    model/                 the final standard Llava folder (+ recipe.resolved.yaml)
    adapter/               the LoRA adapter, when LoRA was used (the model/ folder has it merged)
    checkpoints/step-N/    model/ + state/ (optimizer, scheduler position, RNG) every save_every steps
    metrics.jsonl          one JSON object per logged step
    tensorboard/           the same scalars for TensorBoard
    summary.json           wall time, tokens/s, peak memory, final metrics
    recipe.resolved.yaml
"""

from __future__ import annotations

import json
import math
import re
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from align.config import RecipeError
from align.errors import AlignError


@dataclass
class TrainableSpec:
    """Which components train; printed as a table at stage start."""

    vision: bool = False
    projector: bool = True
    llm: bool = True


@dataclass
class LoRASpec:
    """LoRA on the LLM's linear layers only (never the vision tower or projector); r = 0 turns it off."""

    r: int = 0
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def check(self) -> None:
        if self.r < 0:
            raise RecipeError.at("r", f"must be >= 0 (0 disables LoRA), got {self.r}")


@dataclass
class OptimSpec:
    lr: float = 2e-5  # LLM learning rate (and the default for the other components)
    projector_lr: float | None = None
    vision_lr: float | None = None
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0

    def check(self) -> None:
        if not 0 <= self.warmup_ratio < 1:
            raise RecipeError.at("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if len(self.betas) != 2:
            raise RecipeError.at("betas", f"expected 2 values, got {len(self.betas)}")


@dataclass
class RunSpec:
    """How the loop runs: batch sizes, length, precision, distribution, checkpointing, logging."""

    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; caps epochs
    micro_batch_size: int = 1  # per process
    grad_accum: int = 1
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    strategy: Literal["auto", "single", "ddp", "zero2", "zero3"] = "auto"  # auto: ddp when launched with N>1
    deepspeed_config: str | None = None  # ZeRO JSON (recipes/deepspeed/*.json); batch sizes come from here
    save_every: int = 0  # optimizer steps between checkpoints; 0: only the final model
    keep_last: int = 2
    log_every: int = 1
    tensorboard: bool = True
    wandb_project: str | None = None

    def check(self) -> None:
        for name in ("epochs", "micro_batch_size", "grad_accum", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise RecipeError.at(name, f"must be >= 1, got {getattr(self, name)}")
        if self.strategy in ("zero2", "zero3") and self.deepspeed_config is None:
            raise RecipeError.at("deepspeed_config", f"strategy {self.strategy} needs a DeepSpeed JSON")


def lr_at(step: int, total_steps: int, base_lr: float, schedule: str, warmup_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine/linear decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_model_folder(path: str | Path) -> Path:
    """A model folder, or a stage's output folder (whose model/ is used)."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    if (path / "model" / "config.json").exists():
        return path / "model"
    raise AlignError(f"{path}: not a model folder (no config.json) nor a stage output (no model/config.json)")


_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under output_dir/checkpoints, oldest first (temporary folders are ignored)."""
    root = Path(output_dir) / "checkpoints"
    found = []
    for p in root.glob("step-*") if root.exists() else []:
        m = _STEP_DIR.match(p.name)
        if m and (p / "state" / "engine.json").exists():  # the engine writes it last, atomically
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> None:
    for _, path in checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(path)


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class MetricsWriter:
    """metrics.jsonl (+ TensorBoard, + wandb when installed and asked for), written by the main process only."""

    def __init__(
        self, output_dir: Path, enabled: bool, tensorboard: bool, wandb_project: str | None, config: dict
    ):
        self.enabled = enabled
        self.file = None
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.file = (output_dir / "metrics.jsonl").open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print("wandb_project is set but wandb is not installed; logging to metrics.jsonl only")
            else:
                self.wandb = wandb.init(project=wandb_project, config=config, dir=str(output_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class Progress:
    """One status line per log step: step/total, loss, lr, tokens/s, ETA (plain text: works in logs and CI)."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.total = total_steps
        self.start_step = start_step
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        done = step + 1 - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step - 1)
        shown = " ".join(
            f"{k}={v:.4g}" for k, v in metrics.items() if k in ("loss", "lr", "tokens_per_s", "reward", "kl")
        )
        print(f"step {step + 1}/{self.total} {shown} eta={eta:.0f}s", flush=True)
