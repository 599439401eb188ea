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

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from align.checkpoint import image_seq_len, resolve_model_folder
from align.config import RecipeError, to_dict
from align.data.batching import image_origins, length_grouped_batches, pack, packed_collate, pad_collate
from align.data.check import checked_mix, stage_row_check
from align.data.config import DataConfig
from align.data.encode import IGNORE_INDEX, encode_sft, fit_all
from align.data.images import load_image
from align.engine import gathered
from align.errors import AlignError
from align.feature_cache import FeatureCache, cache_fingerprint, tower_features
from align.model import image_features, llava_of
from align.runfolder import hold_output_dir
from align.stages.common import (
    LoRASpec,
    MetricsWriter,
    OptimSpec,
    Progress,
    RunControl,
    RunSpec,
    TrainableSpec,
    Training,
    add_stage_arguments,
    begin_outputs,
    build_engine,
    check_trainable,
    finish,
    load_trainable,
    resume_from_checkpoint,
    resume_point,
    run_stage,
    save_checkpoint,
    step_lrs,
    training_of,
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
    """Projected features, ``[images x image tokens, hidden]``, of ``images`` (of one blank image if none), by
    the one image-embedding path (:func:`align.model.image_features`); the frozen tower's part may come from
    the feature cache.

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
    return image_features(model, tower_output=feats).flatten(0, 1)


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


@dataclass
class SFTRun:
    """What the phases of a step share: built once by :func:`_set_up`."""

    recipe: SFTRecipe
    dist: Any
    training: Training
    model: nn.Module  # what trains (peft-wrapped with LoRA); the engine wraps it
    processor: Any
    engine: Any
    cache: FeatureCache | None
    units: list  # encoded rows, or packed rows
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    base_lrs: dict[str, float]
    metrics: MetricsWriter
    progress: Progress
    memory: dict[str, int]
    data_seed: int
    epoch_batches: dict[int, list[list[int]]] = field(default_factory=dict)
    tokens_seen: float = 0.0
    loss: float = float("nan")  # the last step's
    cache_counts: dict[str, float] = field(default_factory=dict)  # feature-cache hits and misses, all ranks

    @property
    def llava(self) -> nn.Module:
        return llava_of(self.model)


def train(recipe, dist, resume: bool, overwrite: bool = False) -> Path:
    """The whole stage on this process (``dist`` from ``init_distributed()``), holding its output_dir."""
    with hold_output_dir(recipe.output_dir, dist):
        s, start_step = _set_up(recipe, dist, resume, overwrite)
        t_start = time.perf_counter()
        s.engine.module.train()
        try:
            with RunControl(recipe.run, dist) as control:
                for step in range(start_step, s.total_steps):
                    _step(s, step, control)
        finally:
            s.metrics.close()
        summary = {
            "steps": s.total_steps,
            "resumed_from": start_step,
            "tokens_seen": s.tokens_seen,
            "final_loss": s.loss,
            "memory_elements": s.memory,  # rank 0's, beside align plan's accounting
        }
        if s.cache is not None:  # hits and misses of all ranks; the memory is this rank's
            summary.update(s.cache_counts, feature_cache_mb=s.cache.nbytes / 2**20)
        return finish(s.engine, s.model, s.processor, recipe, dist, s.training, t_start, summary)


def _step(s: SFTRun, step: int, control: RunControl) -> None:
    """One optimizer step, its phases in the order they run: this rank's micro-batches of the step's global
    batch, their counts over all ranks, the learning rates, forward/backward of each micro-batch, the log row,
    a checkpoint when one is due."""
    run, t0 = s.recipe.run, time.perf_counter()
    micro, epoch = _micro_batches(s, step)
    counts = s.dist.all_sum(
        {
            "supervised": sum(_supervised(u) for mb in micro for u in mb),
            "tokens": sum(len(u) for mb in micro for u in mb),
            "images": sum(u.n_images for mb in micro for u in mb),
            "text_only_micro_batches": sum(all(u.n_images == 0 for u in mb) for mb in micro),
        }
    )
    torch.manual_seed(run.seed * 1_000_003 + step)  # dropout etc. depend on the step only: exact resume
    lrs = step_lrs(s.engine, step, s.total_steps, s.base_lrs, s.recipe.optim, s.warmup_steps)
    grad_norm = _optimizer_step(s, micro, max(1.0, counts["supervised"]))
    s.tokens_seen += counts["tokens"]
    dt = time.perf_counter() - t0
    if (step + 1) % run.log_every == 0 or step + 1 == s.total_steps:
        row = {
            "loss": s.loss,
            "lr": lrs.get("llm", next(iter(lrs.values()))),
            **{f"lr_{name}": value for name, value in lrs.items()},
            "grad_norm": grad_norm,
            "tokens_per_s": counts["tokens"] / dt,
            "epoch": epoch,
            "step_time_s": dt,
            "supervised_tokens": counts["supervised"],
            "images": counts["images"],
            "text_only_micro_batches": counts["text_only_micro_batches"],
            **s.cache_counts,  # feature-cache hits and misses so far, all ranks
        }
        s.metrics.log(step + 1, row)
        s.progress.update(step, row)
    save, stop = control.at_step_end(
        step + 1, s.total_steps, bool(run.save_every) and (step + 1) % run.save_every == 0
    )
    if save:
        folder = save_checkpoint(s.engine, s.model, s.processor, s.recipe, s.dist, step + 1, {})
        if stop:
            raise control.stopped(step + 1, s.total_steps, folder)


def _micro_batches(s: SFTRun, step: int) -> tuple[list[list], int]:
    """This rank's micro-batches of step ``step``: a contiguous slice of the global batch, in grad_accum pieces;
    and the epoch the step is in."""
    run, dist = s.recipe.run, s.dist
    epoch, index = divmod(step, s.steps_per_epoch)
    if epoch not in s.epoch_batches:
        batches = _global_batches(s.units, s.global_batch, s.data_seed, epoch, s.recipe.data.group_by_length)
        s.epoch_batches = {epoch: batches}
    step_units = [s.units[i] for i in s.epoch_batches[epoch][index]]
    per_rank = run.micro_batch_size * run.grad_accum
    mine = step_units[dist.rank * per_rank : (dist.rank + 1) * per_rank]
    return [mine[i : i + run.micro_batch_size] for i in range(0, per_rank, run.micro_batch_size)], epoch


def _optimizer_step(s: SFTRun, micro: list[list], n_tokens: float) -> Any:
    """Forward and backward of each micro-batch, the optimizer stepping after the last; sets ``s.loss`` (the
    global batch's mean token loss) and returns the gradient norm.

    Each micro-batch's summed token loss is scaled by ``ranks x grad_accum / n_tokens`` (``n_tokens``: the
    global batch's supervised tokens): the engine averages gradients over ranks and accumulation steps, so
    the update is that of the mean over every supervised token of the global batch, however it is split.
    """
    run, dist, data = s.recipe.run, s.dist, s.recipe.data
    step_loss = 0.0
    for mb in micro:
        batch = _collate(mb, data.packing, s.processor.tokenizer.pad_token_id)
        with s.engine.autocast():
            loss_sum, _ = forward_loss_sum(
                s.engine.module, s.llava, batch, s.processor, s.cache, data.max_image_pixels, dist.device
            )
        s.engine.backward(loss_sum * (dist.world_size * run.grad_accum) / n_tokens)
        grad_norm = s.engine.step()
        step_loss += float(loss_sum.detach())
    after = dist.all_sum({"loss": step_loss, **(s.cache.counts() if s.cache is not None else {})})
    s.loss = after.pop("loss") / n_tokens
    s.cache_counts = after
    return grad_norm


# --- set-up -----------------------------------------------------------------------------------------------------


def _set_up(recipe, dist, resume: bool, overwrite: bool) -> tuple[SFTRun, int]:
    """Everything before the first step, cheapest checks first: the resume point and the model folder, every
    row, the model, the training units, the feature cache, the engine, the checkpoint, the logs."""
    run, data = recipe.run, recipe.data
    torch.manual_seed(run.seed)
    training = training_of(recipe, dist)
    resume_from = resume_point(recipe.output_dir, resume, overwrite)  # never replaces an earlier run silently
    model_dir = resolve_model_folder(recipe.model)  # a wrong folder fails in a second, not after the rows
    # every row checked (images decoded, placeholders, answers, boxes, a target to learn), data.strict applied
    data_seed = data.seed if data.seed is not None else run.seed
    samples, mix = checked_mix(data, data_seed, stage_row_check(recipe.kind), log=dist.log)
    model, processor = load_trainable(recipe, dist, training, model_dir)
    llava = llava_of(model)
    encoded = [
        encode_sft(sample, processor.tokenizer, llava.config.image_token_id, image_seq_len(processor))
        for sample in samples
    ]
    encoded, fit = fit_all(encoded, data.max_length, data.overlong)
    units = pack(encoded, data.max_length) if data.packing else list(encoded)
    global_batch = run.micro_batch_size * run.grad_accum * dist.world_size
    if len(units) < global_batch:
        raise AlignError(
            f"{len(units)} training {'packed rows' if data.packing else 'rows'} after length filtering, fewer than "
            f"one global batch ({run.micro_batch_size} micro x {run.grad_accum} accum x {dist.world_size} ranks)"
        )
    steps_per_epoch = len(units) // global_batch
    total_steps = min(run.max_steps or 10**12, run.epochs * steps_per_epoch)
    dist.log(mix.table())
    dist.log(fit)
    dist.log(
        f"{len(units)} units, global batch {global_batch}, {steps_per_epoch} steps/epoch, {total_steps} steps"
    )
    cache = _feature_cache(recipe, llava, processor)
    engine, memory = build_engine(model, model, recipe, dist, training)
    base_lrs = engine.lrs()  # before load_state, which restores the schedule's current values
    start_step = resume_from_checkpoint(engine, resume_from, recipe, resume, dist).get("step", 0)
    begin_outputs(recipe, dist, resume_from is not None, start_step, overwrite)
    s = SFTRun(
        recipe, dist, training, model, processor, engine, cache, units, global_batch, steps_per_epoch, total_steps,
        int(recipe.optim.warmup_ratio * total_steps), base_lrs,
        MetricsWriter(Path(recipe.output_dir), dist.is_main, run.tensorboard, run.wandb_project, to_dict(recipe)),
        Progress(total_steps, start_step, dist.is_main), memory, data_seed,
    )  # fmt: skip
    return s, start_step


def _feature_cache(recipe, llava, processor) -> FeatureCache | None:
    """The frozen tower's features per image (``feature_cache: memory | disk``), keyed by the tower's weights,
    its image processor and the feature layer it is read from."""
    if recipe.feature_cache == "none":
        return None
    tower = llava.model.vision_tower
    with gathered(tower.parameters()):
        fingerprint = cache_fingerprint(
            tower,
            processor.image_processor.to_dict(),
            llava.config.vision_feature_layer,
            llava.config.vision_feature_select_strategy,
        )
    return FeatureCache(fingerprint, recipe.feature_cache, Path(recipe.output_dir) / "feature_cache")


add_arguments = add_stage_arguments


def run(args) -> int:
    return run_stage(args, "sft", train)
