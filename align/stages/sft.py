"""Stage 2: supervised fine-tuning (long chain-of-thought) of projector + LLM, optionally LoRA or the tower.

Also the program behind stage 1 (``align projector``): projector alignment is this loop with other defaults
(only the projector trains, captions, a higher LR, frozen-feature cache); see ``align/stages/projector.py``.

Run::

    align sft RECIPE [key=value ...] [--resume]
    torchrun --nproc_per_node 8 -m align.cli sft RECIPE run.strategy=zero3 run.deepspeed_config=recipes/deepspeed/zero3.json

Read it top to bottom: recipe -> model -> data -> engine -> one loop -> save.

Loss: cross-entropy summed over every supervised token of the *global* batch (all ranks, all accumulation
micro-batches) divided by their count, so 1 process and N processes with the same global batch give the same
loss and gradients whatever the split. Rows with and without images mix freely (see ``input_embeddings``).

Tests: ``tests/test_stages.py`` (what trains, outputs, LoRA, packing), ``tests/test_stage_resume.py``
(kill and resume), ``tests/test_stage_distributed.py`` (DDP / ZeRO-2 / ZeRO-3 vs one process).
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

from align.checkpoint import atomic_folder, image_seq_len, load_llava, resolve_model_folder, save_llava
from align.config import RecipeError, load_any, save_resolved, to_dict
from align.data.batching import image_origins, length_grouped_batches, pack, packed_collate, pad_collate
from align.data.check import checked_mix, stage_row_check
from align.data.config import DataConfig
from align.data.encode import IGNORE_INDEX, encode_sft, fit_all
from align.data.images import load_image
from align.engine import gathered, init_distributed, partitioned_loading, setup
from align.errors import AlignError
from align.feature_cache import FeatureCache, cache_fingerprint, tower_features
from align.lora import apply_lora, is_lora, merge_lora_state_dict, save_adapter
from align.model import format_parameter_table, parameter_table, set_trainable
from align.plot import plot_run
from align.runfolder import hold_output_dir
from align.stages.common import (
    LoRASpec,
    MetricsWriter,
    OptimSpec,
    Progress,
    RunSpec,
    TrainableSpec,
    check_trainable,
    freeze_unreachable_vision,
    lr_at,
    memory_vs_plan,
    param_groups,
    peak_memory_mb,
    prune_checkpoints,
    remove_incomplete_checkpoints,
    resume_point,
    truncate_metrics,
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
    feature_cache: Literal["none", "memory", "disk"] = "none"  # frozen-tower features computed once per image

    def check(self) -> None:
        check_trainable(self.trainable, self.lora)
        if self.feature_cache != "none":
            if self.trainable.vision:
                raise RecipeError.at(
                    "feature_cache", "caches frozen-tower features; trainable.vision is true"
                )
            if self.run.strategy == "zero3":
                raise RecipeError.at(
                    "feature_cache",
                    "ZeRO-3 partitions the tower, so every rank must run it every step; use 'none'",
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
    """Indices of each optimizer step's units: a function of (seed, epoch) only, so resume replays it exactly.

    Only full global batches are kept (the few units left over change from epoch to epoch). A short
    length-grouped batch is dropped as a whole rather than spliced into its neighbours, which would mix lengths.
    """
    if group_by_length:
        batches = length_grouped_batches([len(u) for u in units], global_batch, seed, epoch)
        return [b for b in batches if len(b) == global_batch]
    order = list(range(len(units)))
    random.Random(f"sft-order:{seed}:{epoch}").shuffle(order)
    return [order[i : i + global_batch] for i in range(0, len(order) - global_batch + 1, global_batch)]


def _collate(units, packing: bool, pad_id: int) -> dict:
    batch = packed_collate(units, pad_id) if packing else pad_collate(units, pad_id)
    batch["images"] = [im for u in units for im in u.images]
    batch["image_origins"] = image_origins(units)
    return batch


def _image_features(
    model, images: list, processor, cache: FeatureCache | None, max_pixels: int, origins=None
) -> torch.Tensor:
    """Projected features, ``[images x image tokens, hidden]``, of ``images`` (of one blank image if none).

    ``origins``: each image's row, named by a load error (the cache computes a subset, hence by identity).
    """
    cfg = model.config
    tower = model.model.vision_tower
    origin_of = {id(im): o for im, o in zip(images, origins, strict=True)} if origins else {}

    def compute(ims):
        loaded = [load_image(im, max_pixels, origin_of.get(id(im))) for im in ims]
        px = processor.image_processor(images=loaded, return_tensors="pt")["pixel_values"]
        px = px.to(tower.device, tower.dtype)
        return tower_features(tower, px, cfg.vision_feature_layer, cfg.vision_feature_select_strategy)

    if not images:
        size = cfg.vision_config.image_size
        blank = torch.zeros(1, 3, size, size, device=tower.device, dtype=tower.dtype)
        feats = tower_features(tower, blank, cfg.vision_feature_layer, cfg.vision_feature_select_strategy)
    elif cache is not None:
        with torch.no_grad():
            feats = cache.get(images, compute).to(tower.device)
    else:
        feats = compute(images)
    return model.model.multi_modal_projector(feats).flatten(0, 1)


def input_embeddings(model, batch, processor, cache, max_pixels: int, device) -> torch.Tensor:
    """Token embeddings of a micro-batch with its image features written into the image-token positions.

    A text-only micro-batch still runs the tower and projector, on a blank image, and adds 0 x those features
    to its embeddings. Every rank thus runs the same modules forward *and backward* whatever its rows hold:
    ZeRO-3 gathers parameters collectively in both passes, and with a frozen LLM or LoRA a text-only rank
    would otherwise skip the backward of every layer before the first adapter and hang the others; DDP wants
    a gradient for every trainable parameter.
    """
    ids = batch["input_ids"].to(device)
    embeds = model.get_input_embeddings()(ids)
    features = _image_features(
        model, batch["images"], processor, cache, max_pixels, batch.get("image_origins")
    ).to(embeds.dtype)
    if not batch["images"]:
        return embeds + 0.0 * features.sum()
    mask = ids == model.config.image_token_id
    if int(mask.sum()) != features.shape[0]:
        raise AlignError(
            f"{int(mask.sum())} image tokens in the micro-batch but {features.shape[0]} image features "
            f"({len(batch['images'])} images): the data was encoded for another image size"
        )
    return embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), features)


def forward_loss_sum(module, model, batch, processor, cache, max_pixels, device) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies, supervised tokens) for one micro-batch.

    ``module`` runs the forward (the engine's wrapper); ``model`` is the unwrapped Llava whose tower, projector
    and embeddings build the inputs.
    """
    embeds = input_embeddings(model, batch, processor, cache, max_pixels, device)
    kwargs = {k: batch[k].to(device) for k in ("attention_mask", "position_ids") if k in batch}
    logits = module(inputs_embeds=embeds, **kwargs, use_cache=False).logits
    labels = batch["labels"].to(device)
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    loss_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, int((shift_labels != IGNORE_INDEX).sum())


def _all_sum(dist, counts: dict[str, float]) -> dict[str, float]:
    """Sums over ranks of this rank's numbers, in one collective (float64: token counts stay exact)."""
    mean = dist.all_reduce_mean(torch.tensor(list(counts.values()), dtype=torch.float64))
    return dict(zip(counts, (mean * dist.world_size).tolist(), strict=True))


def _save_model(engine, model, processor, folder: Path, lora: LoRASpec, recipe) -> dict | None:
    """Consolidate (every rank), merge LoRA, and write a plain Llava folder from rank 0.

    Returns the consolidated (unmerged) state dict on rank 0, ``None`` elsewhere.
    """
    state = engine.full_state_dict()
    if state is None:
        return None
    merged = merge_lora_state_dict(state, lora.alpha / lora.r) if is_lora(model) else state
    base = model.get_base_model() if is_lora(model) else model
    save_llava(
        folder,
        config=base.config,
        state_dict=merged,
        processor=processor,
        generation_config=base.generation_config,
    )
    save_resolved(recipe, folder)
    return state


def train(recipe, dist, resume: bool) -> Path:
    """The whole stage on this process (``dist`` from ``init_distributed()``), holding its output_dir."""
    with hold_output_dir(recipe.output_dir, dist):
        return _train(recipe, dist, resume)


def _train(recipe, dist, resume: bool) -> Path:
    run = recipe.run
    out = Path(recipe.output_dir)
    torch.manual_seed(run.seed)
    precision = (
        run.precision if run.precision != "auto" else ("bf16" if dist.device.type == "cuda" else "fp32")
    )
    strategy = run.strategy if run.strategy != "auto" else ("ddp" if dist.world_size > 1 else "single")
    # before any heavy work: a fresh run into a folder with old checkpoints stops here
    resume_from = resume_point(out, resume)
    # the model folder's config.json before the data: a wrong folder fails in a second, not after the rows
    model_dir = resolve_model_folder(recipe.model)
    # every row checked (images decoded, placeholders, answers, boxes, a target to learn) and data.strict
    # applied before the model loads
    data = recipe.data
    seed = data.seed if data.seed is not None else run.seed
    samples, mix = checked_mix(data, seed, stage_row_check(recipe.kind), log=print if dist.is_main else None)

    # --- model -----------------------------------------------------------------------------------------------
    # ZeRO in bf16 trains bf16 weights (fp32 masters are made from them): loading in bf16 halves host memory.
    # single/ddp keep fp32 weights and autocast.
    zero_bf16 = strategy.startswith("zero") and precision == "bf16"
    engine_values = {
        "micro_batch_size": run.micro_batch_size,
        "grad_accum": run.grad_accum,
        "max_grad_norm": recipe.optim.max_grad_norm,
        "precision": precision,
    }
    # zero3: every rank loads only its 1/N partition of the weights, never the whole model
    with partitioned_loading(dist, strategy, run.deepspeed_config, **engine_values):
        model, processor = load_llava(model_dir, dtype=torch.bfloat16 if zero_bf16 else torch.float32)
    tokenizer = processor.tokenizer
    n_image_tokens = image_seq_len(processor)
    if run.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.lora.r > 0:
        if run.gradient_checkpointing:
            # the embeddings are frozen: checkpointed blocks would otherwise see no input that requires grad
            model.enable_input_require_grads()
        # the adapters' random init must not depend on what loading consumed (zero.Init draws nothing)
        torch.manual_seed(run.seed)
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
    unreachable = freeze_unreachable_vision(llava)
    if dist.is_main:
        print(format_parameter_table(parameter_table(model), f"{recipe.kind}: {model_dir}"))
        if unreachable:
            print(
                f"vision: {len(unreachable)} tensors feed no image feature (layer "
                f"{llava.config.vision_feature_layer}) and stay frozen, e.g. {', '.join(unreachable[:3])}"
            )

    # --- data ------------------------------------------------------------------------------------------------
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
    if recipe.feature_cache != "none":
        ip = processor.image_processor.to_dict()
        with gathered(llava.model.vision_tower.parameters()):
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
        param_groups(model, recipe.optim),
        dist=dist,
        strategy=strategy,
        betas=tuple(recipe.optim.betas),
        deepspeed_config=run.deepspeed_config,
        **engine_values,
    )
    memory_text, memory = memory_vs_plan(model, engine, strategy, dist.world_size)
    if dist.is_main:
        print(memory_text)
    base_lrs = engine.lrs()  # before load_state, which restores the schedule's current values
    warmup = int(recipe.optim.warmup_ratio * total_steps)
    start_step = 0
    if resume_from is not None:
        start_step = engine.load_state(resume_from / "state")["step"]
        if dist.is_main:
            print(f"resumed from {resume_from} at step {start_step}")
    elif resume and dist.is_main:
        print(f"--resume: no complete checkpoint under {out / 'checkpoints'}; starting at step 0")
    if dist.is_main:
        for stale in remove_incomplete_checkpoints(out):
            print(f"removed {stale}: an interrupted save")
        truncate_metrics(out, start_step)  # steps after the checkpoint are logged again
        if resume_from is None:
            save_resolved(recipe, out)

    metrics = MetricsWriter(out, dist.is_main, run.tensorboard, run.wandb_project, to_dict(recipe))
    progress = Progress(total_steps, start_step, dist.is_main)
    device = dist.device
    t_start = time.perf_counter()
    tokens_seen = 0
    loss = float("nan")
    after: dict[str, float] = {}
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
        counts = _all_sum(
            dist,
            {
                "supervised": sum(_supervised(u) for u in mine),
                "tokens": sum(len(u) for u in mine),
                "images": sum(u.n_images for u in mine),
                "text_only_micro_batches": sum(all(u.n_images == 0 for u in mb) for mb in micro),
            },
        )
        n_tokens = max(1.0, counts["supervised"])
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
        after = _all_sum(dist, {"loss": step_loss, **(cache.counts() if cache is not None else {})})
        loss = after.pop("loss") / n_tokens
        tokens_seen += counts["tokens"]
        dt = time.perf_counter() - t0
        if (step + 1) % run.log_every == 0 or step + 1 == total_steps:
            row = {
                "loss": loss,
                "lr": lrs.get("llm", next(iter(lrs.values()))),
                **{f"lr_{name}": value for name, value in lrs.items()},
                "grad_norm": grad_norm,
                "tokens_per_s": counts["tokens"] / dt,
                "epoch": epoch,
                "step_time_s": dt,
                "supervised_tokens": counts["supervised"],
                "images": counts["images"],
                "text_only_micro_batches": counts["text_only_micro_batches"],
            }
            if cache is not None:
                row.update(after)  # feature-cache hits and misses so far, all ranks
            metrics.log(step + 1, row)
            progress.update(step, row)
        if run.save_every and (step + 1) % run.save_every == 0 and step + 1 < total_steps:
            ckpt = out / "checkpoints" / f"step-{step + 1:07d}"
            _save_model(engine, model, processor, ckpt / "model", recipe.lora, recipe)
            engine.save_state(ckpt / "state", extra={"step": step + 1})  # written last: marks it complete
            if dist.is_main:
                prune_checkpoints(out, run.keep_last)
            dist.barrier()

    # --- save ------------------------------------------------------------------------------------------------
    state = _save_model(engine, model, processor, out / "model", recipe.lora, recipe)
    if dist.is_main:
        if is_lora(model):
            with atomic_folder(out / "adapter") as tmp:
                save_adapter(model, tmp, state)
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
            "final_loss": loss,
            "memory_elements": memory,  # rank 0's, beside align plan's accounting
        }
        if cache is not None:  # hits and misses of all ranks; the memory is this rank's
            summary.update(after, feature_cache_mb=cache.nbytes / 2**20)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(
            f"done: {out / 'model'} | wall {wall:.1f}s | {summary['tokens_per_s']:.0f} tokens/s | "
            f"peak memory {summary['peak_memory_mb']:.0f} MB"
        )
    metrics.close()
    if dist.is_main:
        print(f"plots: {len(plot_run(out))} PNG charts in {out / 'plots'}")
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
