"""Stage 2: supervised fine-tuning (long chain-of-thought) of projector + LLM, optionally LoRA or the tower.

Also the program behind stage 1 (``align projector``): projector alignment is this loop with other defaults
(only the projector trains, captions, a higher LR, frozen-feature cache); see ``align/stages/projector.py``.

Run::

    align sft RECIPE [key=value ...] [--resume]
    torchrun --nproc_per_node 8 -m align.cli sft RECIPE run.strategy=zero3 run.deepspeed_config=recipes/deepspeed/zero3.json

Read it top to bottom: recipe -> model -> data -> engine -> one loop -> save.

Loss: cross-entropy summed over every supervised token of the *global* batch (all ranks, all accumulation
micro-batches) divided by their count, so 1 process and N processes with the same global batch give the same
loss and gradients whatever the split.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from align.checkpoint import atomic_folder, image_seq_len, load_llava, save_llava
from align.config import RecipeError, load_any, save_resolved, to_dict
from align.data.batching import length_grouped_batches, pack, packed_collate, pad_collate
from align.data.config import DataConfig
from align.data.encode import IGNORE_INDEX, encode_sft, fit_all
from align.data.images import load_image
from align.data.mixing import build_mix
from align.engine import ParamGroup, init_distributed, setup
from align.errors import AlignError
from align.feature_cache import FeatureCache, cache_fingerprint, tower_features
from align.lora import apply_lora, is_lora, merge_lora_state_dict, save_adapter
from align.model import (
    COMPONENTS,
    component_parameters,
    format_parameter_table,
    parameter_table,
    set_trainable,
)
from align.stages.common import (
    LoRASpec,
    MetricsWriter,
    OptimSpec,
    Progress,
    RunSpec,
    TrainableSpec,
    checkpoints,
    lr_at,
    peak_memory_mb,
    prune_checkpoints,
    resolve_model_folder,
)


@dataclass
class SFTRecipe:
    kind: Literal["sft"]
    model: str  # a Llava folder (assembled, a previous stage's output, or any llava-hf checkpoint)
    output_dir: str
    data: DataConfig
    run: RunSpec = field(default_factory=RunSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    trainable: TrainableSpec = field(default_factory=TrainableSpec)
    lora: LoRASpec = field(default_factory=LoRASpec)
    feature_cache: Literal["off", "memory", "disk"] = "off"  # frozen-tower features computed once per image

    def check(self) -> None:
        if not any((self.trainable.vision, self.trainable.projector, self.trainable.llm)):
            raise RecipeError.at("trainable", "nothing would train: set at least one of vision/projector/llm")
        if self.lora.r > 0 and not self.trainable.llm:
            raise RecipeError.at("lora.r", "LoRA adapts the LLM: it needs trainable.llm: true")
        if self.feature_cache != "off":
            if self.trainable.vision:
                raise RecipeError.at(
                    "feature_cache", "caches frozen-tower features; trainable.vision is true"
                )
            if self.run.strategy == "zero3":
                raise RecipeError.at(
                    "feature_cache",
                    "ZeRO-3 partitions the tower, so every rank must run it every step; use 'off'",
                )


def _units(items, packing: bool, max_length: int):
    """Training units: encoded rows, or packed rows of several encoded rows."""
    return pack(items, max_length) if packing else list(items)


def _supervised(unit) -> int:
    """Tokens that enter the loss (labels are shifted by one in the loss)."""
    return sum(label != IGNORE_INDEX for label in unit.labels[1:])


def _global_batches(
    units, global_batch: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """Indices of each optimizer step's units: a function of (seed, epoch) only, so resume replays it exactly."""
    if group_by_length:
        order = [
            i for b in length_grouped_batches([len(u) for u in units], global_batch, seed, epoch) for i in b
        ]
    else:
        order = list(range(len(units)))
        random.Random(f"sft-order:{seed}:{epoch}").shuffle(order)
    return [order[i : i + global_batch] for i in range(0, len(order) - global_batch + 1, global_batch)]


def _collate(units, packing: bool, pad_id: int) -> dict:
    batch = packed_collate(units, pad_id) if packing else pad_collate(units, pad_id)
    batch["images"] = [im for u in units for im in u.images]
    return batch


def _image_features(model, batch, processor, cache: FeatureCache | None, max_pixels: int):
    """Projected image features for a batch, or (0 * features of a blank image) for a text-only one.

    Every rank runs the tower and projector every step, images or not: DDP expects every trainable parameter
    to get a gradient and ZeRO-3 gathers parameters collectively, so a rank that skipped the tower would hang.
    """
    cfg = model.config
    llava = model.model
    images = batch["images"]

    def pixels(ims):
        loaded = [load_image(im, max_pixels) for im in ims]
        return processor.image_processor(images=loaded, return_tensors="pt")["pixel_values"]

    def compute(ims):
        px = pixels(ims).to(llava.vision_tower.device, llava.vision_tower.dtype)
        return tower_features(
            llava.vision_tower, px, cfg.vision_feature_layer, cfg.vision_feature_select_strategy
        )

    if not images:
        size = cfg.vision_config.image_size
        blank = torch.zeros(
            1, 3, size, size, device=llava.vision_tower.device, dtype=llava.vision_tower.dtype
        )
        feats = tower_features(
            llava.vision_tower, blank, cfg.vision_feature_layer, cfg.vision_feature_select_strategy
        )
        return None, 0.0 * llava.multi_modal_projector(feats).sum()
    if cache is not None:
        with torch.no_grad():
            feats = cache.get(images, compute).to(llava.vision_tower.device)
    else:
        feats = compute(images)
    return list(llava.multi_modal_projector(feats)), None


def forward_loss_sum(module, model, batch, processor, cache, max_pixels, device) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies, supervised tokens) for one micro-batch."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    features, zero = _image_features(model, batch, processor, cache, max_pixels)
    kwargs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if features is not None:
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
    logits = module(**kwargs, use_cache=False).logits
    labels = batch["labels"].to(device)
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    loss_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if zero is not None:
        loss_sum = loss_sum + zero
    return loss_sum, int((shift_labels != IGNORE_INDEX).sum())


def _all_sum(dist, value: float) -> float:
    return float(dist.all_reduce_mean(float(value))) * dist.world_size


def _param_groups(model, optim: OptimSpec) -> list[ParamGroup]:
    lrs = {
        "vision": optim.vision_lr or optim.lr,
        "projector": optim.projector_lr or optim.lr,
        "llm": optim.lr,
    }
    groups = []
    for component in COMPONENTS:
        params = [p for _, p in component_parameters(model, component) if p.requires_grad]
        if params:
            groups.append(ParamGroup(component, params, lr=lrs[component], weight_decay=optim.weight_decay))
    return groups


def _save_model(engine, model, processor, folder: Path, lora: LoRASpec, recipe) -> None:
    """Consolidate (every rank), merge LoRA, and write a plain Llava folder from rank 0."""
    state = engine.full_state_dict()
    if state is None:
        return
    if is_lora(model):
        state = merge_lora_state_dict(state, lora.alpha / lora.r)
    base = model.get_base_model() if is_lora(model) else model
    save_llava(
        folder,
        config=base.config,
        state_dict=state,
        processor=processor,
        generation_config=base.generation_config,
    )
    save_resolved(recipe, folder)


def train(recipe, dist, resume: bool) -> Path:
    """The whole stage on this process; ``dist`` from ``init_distributed()``."""
    run = recipe.run
    out = Path(recipe.output_dir)
    torch.manual_seed(run.seed)
    precision = (
        run.precision if run.precision != "auto" else ("bf16" if dist.device.type == "cuda" else "fp32")
    )
    strategy = run.strategy if run.strategy != "auto" else ("ddp" if dist.world_size > 1 else "single")

    # --- model -----------------------------------------------------------------------------------------------
    model_dir = resolve_model_folder(recipe.model)
    model, processor = load_llava(model_dir)
    tokenizer = processor.tokenizer
    n_image_tokens = image_seq_len(processor)
    if run.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.lora.r > 0:
        if (
            run.gradient_checkpointing
        ):  # frozen embeddings: checkpointed blocks would see no grad-requiring input
            model.enable_input_require_grads()
        model = apply_lora(
            model, recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout, recipe.lora.target_modules
        )
    set_trainable(
        model,
        {
            "vision": recipe.trainable.vision,
            "projector": recipe.trainable.projector,
            "llm": recipe.trainable.llm and recipe.lora.r == 0,
        },
    )
    llava = model.get_base_model() if is_lora(model) else model
    if dist.is_main:
        print(format_parameter_table(parameter_table(model), f"{recipe.kind}: {model_dir}"))

    # --- data ------------------------------------------------------------------------------------------------
    data = recipe.data
    seed = data.seed if data.seed is not None else run.seed
    samples, mix = build_mix(data.sources, seed, data.strict)
    encoded = [encode_sft(s, tokenizer, llava.config.image_token_id, n_image_tokens) for s in samples]
    encoded, fit = fit_all(encoded, data.max_length, data.overlong)
    units = _units(encoded, data.packing, data.max_length)
    global_batch = run.micro_batch_size * run.grad_accum * dist.world_size
    if len(units) < global_batch:
        raise AlignError(
            f"{len(units)} training {'packed rows' if data.packing else 'rows'} after length filtering, fewer than "
            f"one global batch ({run.micro_batch_size} micro x {run.grad_accum} accum x {dist.world_size} ranks)"
        )
    steps_per_epoch = len(units) // global_batch
    total_steps = min(run.max_steps or 10**12, run.epochs * steps_per_epoch)
    if dist.is_main:
        print(mix.table())
        print(fit)
        print(
            f"{len(units)} units, global batch {global_batch}, {steps_per_epoch} steps/epoch, {total_steps} steps"
        )

    cache = None
    if recipe.feature_cache != "off":
        ip = processor.image_processor.to_dict()
        fp = cache_fingerprint(
            llava.model.vision_tower,
            ip,
            llava.config.vision_feature_layer,
            llava.config.vision_feature_select_strategy,
        )
        cache = FeatureCache(fp, recipe.feature_cache, out / "feature_cache")

    # --- engine ----------------------------------------------------------------------------------------------
    engine = setup(
        model,
        _param_groups(model, recipe.optim),
        dist=dist,
        strategy=strategy,
        micro_batch_size=run.micro_batch_size,
        grad_accum=run.grad_accum,
        max_grad_norm=recipe.optim.max_grad_norm,
        precision=precision,
        betas=tuple(recipe.optim.betas),
        deepspeed_config=run.deepspeed_config,
    )
    base_lrs = engine.lrs()  # before load_state, which restores the schedule's current values
    warmup = int(recipe.optim.warmup_ratio * total_steps)
    start_step = 0
    if resume and checkpoints(out):
        step_dir = checkpoints(out)[-1][1]
        extra = engine.load_state(step_dir / "state")
        start_step = extra["step"]
        if dist.is_main:
            print(f"resumed from {step_dir} at step {start_step}")
    elif dist.is_main:
        save_resolved(recipe, out)

    metrics = MetricsWriter(out, dist.is_main, run.tensorboard, run.wandb_project, to_dict(recipe))
    progress = Progress(total_steps, start_step, dist.is_main)
    device = dist.device
    t_start = time.perf_counter()
    tokens_seen = 0
    epoch_batches: dict[int, list[list[int]]] = {}
    engine.module.train()

    # --- the loop --------------------------------------------------------------------------------------------
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in epoch_batches:
            epoch_batches = {epoch: _global_batches(units, global_batch, seed, epoch, data.group_by_length)}
        step_units = [units[i] for i in epoch_batches[epoch][index]]
        # this rank's micro-batches: a contiguous slice of the global batch, split into grad_accum pieces
        per_rank = run.micro_batch_size * run.grad_accum
        mine = step_units[dist.rank * per_rank : (dist.rank + 1) * per_rank]
        micro = [mine[i : i + run.micro_batch_size] for i in range(0, per_rank, run.micro_batch_size)]
        n_tokens = max(1.0, _all_sum(dist, sum(_supervised(u) for u in mine)))
        torch.manual_seed(run.seed * 1_000_003 + step)  # dropout etc. depend on the step only: exact resume
        lrs = {n: lr_at(step, total_steps, base_lrs[n], recipe.optim.schedule, warmup) for n in base_lrs}
        engine.set_lrs(lrs)
        step_loss = 0.0
        for mb in micro:
            batch = _collate(mb, data.packing, tokenizer.pad_token_id)
            with engine.autocast():
                loss_sum, _ = forward_loss_sum(
                    engine.module, llava, batch, processor, cache, data.max_image_pixels, device
                )
            engine.backward(loss_sum * (dist.world_size * run.grad_accum) / n_tokens)
            grad_norm = engine.step()
            step_loss += float(loss_sum.detach())
        loss = _all_sum(dist, step_loss) / n_tokens
        step_tokens = _all_sum(dist, sum(len(u) for u in mine))
        tokens_seen += step_tokens
        dt = time.perf_counter() - t0
        if (step + 1) % run.log_every == 0 or step + 1 == total_steps:
            row = {
                "loss": loss,
                "lr": lrs.get("llm", next(iter(lrs.values()))),
                "grad_norm": grad_norm,
                "tokens_per_s": step_tokens / dt,
                "epoch": epoch,
                "step_time_s": dt,
            }
            if cache is not None:
                row["feature_cache_hits"] = cache.hits
            metrics.log(step + 1, row)
            progress.update(step, row)
        if run.save_every and (step + 1) % run.save_every == 0 and step + 1 < total_steps:
            step_dir = out / "checkpoints" / f"step-{step + 1:07d}"
            _save_model(engine, model, processor, step_dir / "model", recipe.lora, recipe)
            engine.save_state(step_dir / "state", extra={"step": step + 1})  # written last: marks it complete
            if dist.is_main:
                prune_checkpoints(out, run.keep_last)
            dist.barrier()

    # --- save ------------------------------------------------------------------------------------------------
    _save_model(engine, model, processor, out / "model", recipe.lora, recipe)
    if dist.is_main:
        if is_lora(model):
            with atomic_folder(out / "adapter") as tmp:
                save_adapter(model, tmp)
        wall = time.perf_counter() - t_start
        summary = {
            "stage": recipe.kind,
            "steps": total_steps,
            "resumed_from": start_step,
            "wall_time_s": wall,
            "tokens_per_s": tokens_seen / max(wall, 1e-9),
            "peak_memory_mb": peak_memory_mb(),
            "world_size": dist.world_size,
            "strategy": strategy,
            "precision": precision,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(
            f"done: {out / 'model'} | wall {wall:.1f}s | {summary['tokens_per_s']:.0f} tokens/s | "
            f"peak memory {summary['peak_memory_mb']:.0f} MB"
        )
    metrics.close()
    return out


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="stage recipe")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in output_dir"
    )


def run(args) -> int:
    recipe = load_any(args.recipe, args.overrides, expect="sft")
    dist = init_distributed()
    train(recipe, dist, args.resume)
    return dist.shutdown(0)
