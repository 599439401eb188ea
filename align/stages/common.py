"""What the stage programs share: recipe sections, model loading and trainability, the engine set-up, the LR
schedule, run-folder layout, saving, metrics, progress.

The loops themselves stay in each stage's file (SFT and projector: ``align/stages/sft.py``; GRPO:
``align/stages/grpo.py``); everything both do before their first step and after their last lives here once.
A stage's output folder (``output_dir``) holds::

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
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from align.checkpoint import atomic_folder, load_llava, save_llava
from align.config import MAX_SEED, RecipeError, load_any, ranged, save_resolved
from align.engine import (
    ParamGroup,
    full_ndim,
    full_numel,
    gathered,
    held_parameters,
    init_distributed,
    partitioned_loading,
    persistent_parameters,
    setup,
)
from align.errors import AlignError, StageInterrupted
from align.feature_cache import tower_features
from align.lora import ALL_LINEAR, apply_lora, is_lora, merge_lora_state_dict, save_adapter
from align.memory import memory_per_gpu
from align.model import (
    COMPONENTS,
    apply_trainability,
    component_parameters,
    format_parameter_table,
    llava_of,
    parameter_table,
)
from align.plot import plot_run


@dataclass
class TrainableSpec:
    """Which components train; printed as a table at stage start."""

    vision: bool = False
    projector: bool = True
    llm: bool = True


@dataclass
class LoRASpec:
    """LoRA on the LLM's linear layers only (never the vision tower or projector); r = 0 turns it off."""

    r: int = ranged(0, ge=0, note="0 disables LoRA")
    alpha: int = ranged(16, ge=1)  # the update is scaled by alpha / r
    dropout: float = ranged(0.05, ge=0, lt=1)
    target_modules: list[str] = field(
        default_factory=lambda: [ALL_LINEAR]
    )  # e.g. [q_proj, v_proj]; all-linear: all

    def check(self) -> None:
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise RecipeError.at(
                "target_modules", f"'{ALL_LINEAR}' already names every linear layer; list it alone"
            )


@dataclass
class OptimSpec:
    lr: float = ranged(2e-5, ge=0)  # LLM learning rate (and the default for the other components)
    projector_lr: float | None = ranged(None, ge=0)  # None: lr
    vision_lr: float | None = ranged(None, ge=0)  # None: lr
    weight_decay: float = ranged(0.0, ge=0)  # AdamW's decoupled decay; never on 1-D parameters
    betas: list[float] = ranged(default_factory=lambda: [0.9, 0.999], ge=0, lt=1)  # Adam's (beta1, beta2)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = ranged(0.03, ge=0, lt=1)  # fraction of the optimizer steps spent warming up
    max_grad_norm: float = ranged(1.0, ge=0, note="0: no clipping")

    def check(self) -> None:
        if len(self.betas) != 2:
            raise RecipeError.at("betas", f"expected 2 values, got {len(self.betas)}")


@dataclass
class RunSpec:
    """How the loop runs: batch sizes, length, precision, distribution, checkpointing, logging."""

    epochs: int = ranged(1, ge=1)
    max_steps: int | None = ranged(None, ge=1, note="or null: all epochs")  # optimizer steps; caps epochs
    micro_batch_size: int = ranged(1, ge=1)  # per process
    grad_accum: int = ranged(1, ge=1)
    seed: int = ranged(0, ge=0, le=MAX_SEED)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    strategy: Literal["auto", "single", "ddp", "zero2", "zero3"] = "auto"  # auto: ddp when launched with N>1
    deepspeed_config: str | None = None  # ZeRO JSON (recipes/deepspeed/*.json); batch sizes come from here
    save_every: int = ranged(0, ge=0, note="0: off")  # optimizer steps between checkpoints
    save_every_minutes: float = ranged(
        10.0, ge=0, note="0: off"
    )  # wall time between checkpoints: a run over a few minutes is resumable by default
    keep_last: int = ranged(2, ge=1)  # checkpoints kept on disk
    log_every: int = ranged(1, ge=1)  # optimizer steps between metrics rows
    tensorboard: bool = True
    wandb_project: str | None = None

    def check(self) -> None:
        if self.deepspeed_config is not None and self.strategy not in ("zero2", "zero3"):
            raise RecipeError.at(
                "strategy", f"deepspeed_config is set but strategy is '{self.strategy}' (zero2/zero3)"
            )
        if self.strategy in ("zero2", "zero3") and self.deepspeed_config is None:
            raise RecipeError.at("deepspeed_config", f"strategy {self.strategy} needs a DeepSpeed JSON")


def check_trainable(trainable: TrainableSpec, lora: LoRASpec) -> None:
    """The recipe-level part of "something trains": at least one component, and LoRA only on a trained LLM."""
    if not any((trainable.vision, trainable.projector, trainable.llm)):
        raise RecipeError.at("trainable", "nothing would train: set at least one of vision/projector/llm")
    if lora.r > 0 and not trainable.llm:
        raise RecipeError.at("lora.r", "LoRA adapts the LLM: it needs trainable.llm: true")


def param_groups(model, optim: OptimSpec) -> list[ParamGroup]:
    """Optimizer groups: one per component with trainable parameters, at its learning rate.

    ``projector_lr`` / ``vision_lr`` default to ``lr``. With weight decay, each component's 1-D parameters
    (biases, norm weights) go to a ``<component>_no_decay`` group: never decayed, as in transformers' Trainer.
    """

    def own(lr: float | None) -> float:
        return optim.lr if lr is None else lr

    lrs = {"vision": own(optim.vision_lr), "projector": own(optim.projector_lr), "llm": optim.lr}
    groups = []
    for component in COMPONENTS:
        params = [p for _, p in component_parameters(model, component) if p.requires_grad]
        decayed = [p for p in params if full_ndim(p) >= 2 or optim.weight_decay == 0]
        flat = [p for p in params if full_ndim(p) < 2 and optim.weight_decay > 0]
        if decayed:
            groups.append(ParamGroup(component, decayed, lr=lrs[component], weight_decay=optim.weight_decay))
        if flat:
            groups.append(ParamGroup(f"{component}_no_decay", flat, lr=lrs[component], weight_decay=0.0))
    if not groups:  # e.g. only the vision tower is trainable and none of its layers feeds an image feature
        raise AlignError("trainable: no parameter of the model would train (see the parameter table above)")
    return groups


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


def step_lrs(
    engine, step: int, total_steps: int, base_lrs: dict[str, float], optim: OptimSpec, warmup_steps: int
):
    """Set every optimizer group's learning rate for optimizer step ``step`` (0-based); returns them."""
    lrs = {
        name: lr_at(step, total_steps, base, optim.schedule, warmup_steps) for name, base in base_lrs.items()
    }
    engine.set_lrs(lrs)
    return lrs


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


def remove_incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete what a crash left half-written; returns what was removed.

    That is step folders without ``state/engine.json`` and the temporary folders of interrupted atomic saves
    (``.model.tmp-*`` of the final model or the adapter). Call on the main process only, before training:
    nothing else writes then.
    """
    root = Path(output_dir) / "checkpoints"
    complete = {path for _, path in checkpoints(output_dir)}
    steps = (
        [p for p in root.glob("step-*") if _STEP_DIR.match(p.name) and p.is_dir()] if root.exists() else []
    )
    temporary = [p for p in Path(output_dir).glob(".*.tmp-*") if p.is_dir()]
    stale = [p for p in steps if p not in complete] + temporary
    for path in stale:
        shutil.rmtree(path)
    return stale


# what a stage writes into its output_dir; --overwrite removes these before a fresh run
RUN_OUTPUTS = (
    "model",
    "adapter",
    "checkpoints",
    "metrics.jsonl",
    "completions.jsonl",
    "tensorboard",
    "plots",
    "summary.json",
)


def resume_point(output_dir: str | Path, resume: bool, overwrite: bool = False) -> Path | None:
    """The checkpoint a run starts from: the latest one with ``resume``, none for a fresh run.

    A fresh run never replaces an earlier run's outputs silently: a folder with checkpoints (their steps would
    mix with the new run's), a finished model, or the metrics of an interrupted run is refused, unless
    ``overwrite`` (the earlier outputs are then removed by :func:`begin_outputs`).
    """
    out = Path(output_dir)
    found = checkpoints(out)
    if resume:
        return found[-1][1] if found else None
    if overwrite:
        return None
    if found:
        raise AlignError(
            f"{out / 'checkpoints'} holds {len(found)} checkpoint(s) of an earlier run (latest "
            f"{found[-1][1].name}); pass --resume to continue it, --overwrite to start again, or choose another "
            "output_dir"
        )
    if (out / "model" / "config.json").exists():
        raise AlignError(
            f"{out} holds a finished run ({out / 'model'}); pass --overwrite to train again into it, or choose "
            "another output_dir"
        )
    if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size:
        raise AlignError(
            f"{out / 'metrics.jsonl'} holds an earlier run's steps but there is no checkpoint to continue from; "
            "pass --overwrite to start again, or choose another output_dir"
        )
    return None


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop the rows of a per-step log (metrics.jsonl, completions.jsonl) of steps after ``after_step`` (0: all):
    a resumed run logs them again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
    path.write_text("".join(line + "\n" for line in kept))


def freeze_unreachable_vision(llava) -> list[str]:
    """Freeze trainable vision-tower parameters that no image feature depends on; returns their names.

    Llava reads ``hidden_states[vision_feature_layer]``, so the layers after it, the post-LayerNorm and SigLIP's
    pooling head never get a gradient. Under DDP a trainable parameter without a gradient stops the run at
    the second step; frozen, they also show up honestly in the parameter table. Found by one backward pass
    through the tower on a blank image, so it holds for any tower layout. Call before the engine wraps the model.
    """
    tower = llava.model.vision_tower
    params = [(n, p) for n, p in tower.named_parameters() if p.requires_grad]
    if not params:
        return []
    cfg = llava.config
    size = cfg.vision_config.image_size
    p0 = params[0][1]
    blank = torch.zeros(1, 3, size, size, device=p0.device, dtype=p0.dtype)
    with gathered(tower.parameters()):  # loaded ZeRO-3 partitioned: the tower whole for this one pass
        feats = tower_features(tower, blank, cfg.vision_feature_layer, cfg.vision_feature_select_strategy)
        grads = torch.autograd.grad(feats.float().sum(), [p for _, p in params], allow_unused=True)
    frozen = []
    for (name, param), grad in zip(params, grads, strict=True):
        if grad is None:
            param.requires_grad_(False)
            frozen.append(f"vision_tower.{name}")
    return frozen


def memory_vs_plan(model, engine, strategy: str, world_size: int) -> tuple[str, dict[str, int]]:
    """What this rank holds after the engine set up, beside what ``align plan``'s accounting predicts for it.

    Compared in elements (the plan's bytes assume bf16; a CPU run holds fp32): the weights (a 1/N share under
    ZeRO-3) and the trainable elements whose fp32 master + Adam states live here (1/N under ZeRO-2/3).
    ZeRO-3 keeps small tensors whole on every rank; they are counted on their own.
    """
    rows = parameter_table(model, full_numel)
    total, trainable = sum(r[1] for r in rows), sum(r[2] for r in rows)
    weight_shard = world_size if strategy == "zero3" else 1
    state_shard = world_size if strategy.startswith("zero") else 1
    persistent = persistent_parameters(model)
    counts = {
        "weights_plan": -(-total // weight_shard),
        "weights_held": held_parameters(model)[0],
        "weights_persistent": persistent,
        "optimizer_plan": -(-trainable // state_shard),
        "optimizer_held": engine.optimizer_elements(),
    }
    plan = memory_per_gpu(
        trainable, total - trainable, world_size, "ddp" if strategy == "single" else strategy
    )
    whole = f", of which {persistent:,} in small tensors kept whole on every rank" if persistent else ""
    text = (
        f"memory per rank ({strategy}, {world_size} rank(s)), `align plan` vs this rank: "
        f"weights {counts['weights_plan']:,} vs {counts['weights_held']:,} elements{whole}; "
        f"fp32 master + Adam states {counts['optimizer_plan']:,} vs {counts['optimizer_held']:,} elements; "
        f"plan in bf16: {plan['total'] / 2**30:.2f} GiB per GPU before activations"
    )
    return text, counts


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
                also = " and TensorBoard" if self.tb is not None else ""
                print(
                    f"wandb_project is set but wandb is not installed (pip install wandb); logging to metrics.jsonl{also}"
                )
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
    """The status of each logged step: step/total, loss, lr, tokens/s, reward, KL, ETA. On a terminal one line
    redrawn in place behind a bar; elsewhere (logs, CI) one plain line per logged step."""

    BAR = 24  # characters

    def __init__(self, total_steps: int, start_step: int, enabled: bool, tty: bool | None = None):
        self.total = total_steps
        self.start_step = start_step
        self.enabled = enabled
        self.tty = sys.stdout.isatty() if tty is None else tty
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
        line = f"step {step + 1}/{self.total} {shown} eta={eta:.0f}s"
        if not self.tty:
            print(line, flush=True)
            return
        filled = self.BAR * (step + 1) // max(self.total, 1)
        end = "\n" if step + 1 >= self.total else ""
        print(f"\r[{'#' * filled}{'.' * (self.BAR - filled)}] {line}\033[K", end=end, flush=True)


# --- the command line of every training stage -------------------------------------------------------------------


def add_stage_arguments(parser) -> None:
    """``align <stage> RECIPE [key=value ...] [--resume]``."""
    parser.add_argument("recipe", help="stage recipe")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in output_dir"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in an output_dir that holds an earlier run (its model, checkpoints and logs are removed)",
    )


def run_stage(args, kind: str, train) -> int:
    """Read the recipe (a mistake stops here, before any process group), join the launch, train, leave.

    A run stopped by SIGINT/SIGTERM (after its checkpoint) prints one line with the command that continues it
    and exits 130.
    """
    recipe = load_any(args.recipe, args.overrides, expect=kind)
    dist = init_distributed()
    try:
        train(recipe, dist, args.resume, args.overwrite)
    except StageInterrupted as err:
        again = " ".join(["align", kind, args.recipe, *args.overrides, "--resume"])
        dist.log(f"{err}; continue with: {again}")
        return dist.shutdown(130)
    return dist.shutdown(0)


# --- what SFT and GRPO do before their first step and after their last ------------------------------------------


@dataclass(frozen=True)
class Training:
    """How this process trains, resolved once from the recipe and the launch: precision, strategy, and the
    values the engine is built with."""

    precision: str  # fp32 | bf16
    strategy: str  # single | ddp | zero2 | zero3
    engine_values: dict  # micro_batch_size, grad_accum, max_grad_norm, precision

    @property
    def dtype(self) -> torch.dtype:
        """Weights' dtype when loaded: ZeRO in bf16 trains bf16 weights (fp32 masters are made from them), which
        halves host memory; single/ddp keep fp32 weights and autocast."""
        return (
            torch.bfloat16 if self.strategy.startswith("zero") and self.precision == "bf16" else torch.float32
        )


def training_of(recipe, dist) -> Training:
    """``run.precision`` auto: bf16 on GPU, fp32 on CPU; ``run.strategy`` auto: ddp when launched with N > 1."""
    run = recipe.run
    precision = (
        run.precision if run.precision != "auto" else ("bf16" if dist.device.type == "cuda" else "fp32")
    )
    strategy = run.strategy if run.strategy != "auto" else ("ddp" if dist.world_size > 1 else "single")
    values = {
        "micro_batch_size": run.micro_batch_size,
        "grad_accum": run.grad_accum,
        "max_grad_norm": recipe.optim.max_grad_norm,
        "precision": precision,
    }
    return Training(precision, strategy, values)


def load_model(model_dir: Path, dist, training: Training, deepspeed_config: str | None):
    """``(model, processor)`` of a Llava folder; under ZeRO-3 straight into this rank's 1/N partition."""
    with partitioned_loading(dist, training.strategy, deepspeed_config, **training.engine_values):
        return load_llava(model_dir, dtype=training.dtype)


def load_trainable(recipe, dist, training: Training, model_dir: Path):
    """``(model, processor)`` as the stage trains it: loaded, layers checkpointed, LoRA applied, trainability set
    by component, tower parameters that feed no image feature frozen; the parameter table printed."""
    run, lora = recipe.run, recipe.lora
    model, processor = load_model(model_dir, dist, training, run.deepspeed_config)
    if run.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora.r > 0:
        if run.gradient_checkpointing:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need an input with grad
        # the adapters' random init must not depend on what loading consumed (zero.Init draws nothing)
        torch.manual_seed(run.seed)
        model = apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.target_modules)
    t = recipe.trainable
    apply_trainability(model, vision=t.vision, projector=t.projector, llm=t.llm, lora=lora.r > 0)
    unreachable = freeze_unreachable_vision(
        llava_of(model)
    )  # DDP stops on trainable parameters without grads
    dist.log(format_parameter_table(parameter_table(model, full_numel), f"{recipe.kind}: {model_dir}"))
    if unreachable:
        dist.log(
            f"vision: {len(unreachable)} tensors feed no image feature (layer "
            f"{llava_of(model).config.vision_feature_layer}) and stay frozen, e.g. {', '.join(unreachable[:3])}"
        )
    return model, processor


def build_engine(module, model, recipe, dist, training: Training):
    """``(engine, memory)``: the engine around ``module`` (the model, or a wrapper whose forward is the
    training pass) with one optimizer group per component, and the memory line printed beside the plan."""
    engine = setup(
        module,
        param_groups(module, recipe.optim),
        dist=dist,
        strategy=training.strategy,
        betas=tuple(recipe.optim.betas),
        deepspeed_config=recipe.run.deepspeed_config,
        **training.engine_values,
    )
    text, memory = memory_vs_plan(model, engine, training.strategy, dist.world_size)
    dist.log(text)
    return engine, memory


def resume_from_checkpoint(engine, resume_from: Path | None, recipe, resume: bool, dist) -> dict:
    """The state saved with the checkpoint a resumed run continues from; ``{}`` for a fresh run."""
    if resume_from is None:
        if resume:
            where = Path(recipe.output_dir) / "checkpoints"
            dist.log(f"--resume: no complete checkpoint under {where}; starting at step 0")
        return {}
    saved = engine.load_state(resume_from / "state")
    dist.log(f"resumed from {resume_from} at step {saved.get('step', '?')}")
    return saved


def begin_outputs(recipe, dist, resumed: bool, start_step: int, overwrite: bool = False) -> None:
    """Tidy the output folder for the first step: an earlier run's outputs removed (``--overwrite`` on a fresh
    run), half-written saves removed, the per-step logs cut back to the checkpoint (a resumed run logs those
    steps again), the resolved recipe written on a fresh run; then say where the outputs go."""
    out = Path(recipe.output_dir)
    dist.log(f"output: {out} (metrics.jsonl; TensorBoard: tensorboard --logdir {out / 'tensorboard'})")
    if not dist.is_main:
        return
    if overwrite and not resumed:
        for name in RUN_OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    for stale in remove_incomplete_checkpoints(out):
        print(f"removed {stale}: an interrupted save")
    for log in ("metrics.jsonl", "completions.jsonl"):
        truncate_jsonl(out / log, start_step)
    if not resumed:
        save_resolved(recipe, out)


def save_model(engine, model, processor, folder: Path, recipe, key_prefix: str = "") -> dict | None:
    """Consolidate (every rank takes part), merge LoRA, write a plain Llava folder and the resolved recipe from
    rank 0. Returns the consolidated, unmerged state dict on rank 0 (for the adapter), ``None`` elsewhere.

    ``key_prefix``: what the engine's module adds in front of the model's parameter names (GRPO's wrapper).
    """
    state = engine.full_state_dict()
    if state is None:
        return None
    state = {k.removeprefix(key_prefix): v for k, v in state.items()} if key_prefix else state
    merged = merge_lora_state_dict(state, recipe.lora.alpha / recipe.lora.r) if is_lora(model) else state
    base = llava_of(model)
    save_llava(
        folder,
        config=base.config,
        state_dict=merged,
        processor=processor,
        generation_config=base.generation_config,
    )
    save_resolved(recipe, folder)
    return state


def save_checkpoint(
    engine, model, processor, recipe, dist, step: int, state: dict, key_prefix: str = ""
) -> Path:
    """``checkpoints/step-N/{model,state}``; ``state`` (with ``step``) is what a resume continues from."""
    folder = Path(recipe.output_dir) / "checkpoints" / f"step-{step:07d}"
    save_model(engine, model, processor, folder / "model", recipe, key_prefix)
    engine.save_state(folder / "state", extra={"step": step, **state})  # written last: marks it complete
    if dist.is_main:
        prune_checkpoints(recipe.output_dir, recipe.run.keep_last)
    dist.barrier()
    return folder


class RunControl:
    """When a step ends with a checkpoint, and whether the run stops there.

    A checkpoint follows every ``run.save_every`` steps, every ``run.save_every_minutes`` of wall time, and the
    step during which SIGINT or SIGTERM arrived: the run then stops there (the CLI prints one line with the
    command that continues; no traceback). A second signal stops at once. The clock and the signal are read on
    every rank and decided together (one sum over ranks per step), so that all ranks save and stop at the same
    step. Never at the last step: the final model follows it.
    """

    def __init__(self, run: RunSpec, dist):
        self.run, self.dist = run, dist
        self.last_save = time.monotonic()
        self.signal: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> RunControl:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame) -> None:
        if self.signal is not None:  # the second one: stop now
            raise KeyboardInterrupt
        self.signal = signum
        if self.dist.is_main:
            print(
                f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint (again: at once)"
            )

    def at_step_end(self, done: int, total: int, steps_due: bool) -> tuple[bool, bool]:
        """(save a checkpoint now, stop after it) for the step that made ``done`` of ``total`` steps."""
        minutes = self.run.save_every_minutes
        timed = minutes > 0 and time.monotonic() - self.last_save >= 60 * minutes
        agreed = self.dist.all_sum({"timed": float(timed), "stop": float(self.signal is not None)})
        if done >= total:
            return False, False
        stop = agreed["stop"] > 0
        save = steps_due or agreed["timed"] > 0 or stop
        if save:
            self.last_save = time.monotonic()
        return save, stop

    def stopped(self, done: int, total: int, folder: Path) -> StageInterrupted:
        """The error that ends a run stopped by a signal, saying where it stopped."""
        name = signal.Signals(self.signal).name if self.signal is not None else "a signal"
        return StageInterrupted(f"{name}: stopped after step {done} of {total}; checkpoint {folder}")


def finish(
    engine, model, processor, recipe, dist, training: Training, t_start: float, summary: dict, key_prefix=""
):
    """The final model (and LoRA adapter), ``summary.json`` (``summary`` plus wall time, throughput of each
    ``<name>_seen`` count, memory and the launch), the ``done`` line and the plots. Returns the output folder.

    Close the stage's own log files first: the plots read metrics.jsonl.
    """
    out = Path(recipe.output_dir)
    state = save_model(engine, model, processor, out / "model", recipe, key_prefix)
    if dist.is_main:
        if is_lora(model):
            with atomic_folder(out / "adapter") as tmp:
                save_adapter(model, tmp, state)
        wall = time.perf_counter() - t_start
        rates = {
            f"{k.removesuffix('_seen')}_per_s": v / max(wall, 1e-9)
            for k, v in summary.items()
            if k.endswith("_seen")
        }
        summary = {k: v for k, v in summary.items() if not k.endswith("_seen")}
        summary.update(rates, wall_time_s=wall, peak_memory_mb=peak_memory_mb(), world_size=dist.world_size)
        summary.update(strategy=training.strategy, precision=training.precision)
        (out / "summary.json").write_text(json.dumps({"stage": recipe.kind, **summary}, indent=2))
        shown = "".join(f" | {v:.0f} {k.replace('_per_s', '')}/s" for k, v in rates.items())
        print(
            f"done: {out / 'model'} | wall {wall:.1f}s{shown} | peak memory {summary['peak_memory_mb']:.0f} MB"
        )
        print(f"plots: {len(plot_run(out))} PNG charts in {out / 'plots'}")
    return out
