"""Stage 3: GRPO with rule-based rewards (R1-V / VLM-R1 style), TRL's option names and math.

Run::

    align grpo RECIPE [key=value ...] [--resume]
    torchrun --nproc_per_node 8 -m align.cli grpo RECIPE run.strategy=zero3 run.deepspeed_config=recipes/deepspeed/zero3.json

Read it top to bottom: recipe -> model (+ reference) -> data -> engine -> rounds -> save. One *round*
samples G completions for each of this step's questions (one vision pass and one prefill per question batch,
the cache shared by the G completions), scores them, turns rewards into group-normalised advantages, and then
takes ``num_iterations`` optimizer steps on those completions (TRL's meaning). A step in the logs and in
``max_steps`` / ``save_every`` is an optimizer step.

Defaults and why (TRL's defaults differ where noted):
* ``beta: 0.04`` — R1-V and VLM-R1 used 0.04; TRL now defaults to 0 (no reference model). ``beta: 0`` loads
  no reference model here too.
* ``loss_type: grpo`` and ``scale_rewards: group`` — the original GRPO the R1 vision projects trained with;
  TRL's default is ``dapo``. Every TRL value listed in the schema is implemented with TRL's math.
* ``num_generations: 8``, ``temperature: 1.0``, ``epsilon: 0.2`` — TRL's and R1-V's.
* ``max_completion_length: 256`` — long enough for the synthetic task's reasoning; real runs raise it.

Per step the metrics show reward mean/std per function, the fraction of groups whose rewards do not vary
(their advantages are 0 and they teach nothing), completion length (mean/max/truncated share), KL, clip
ratios, entropy, and the loss split into its policy-gradient and KL parts: with ``num_iterations: 1`` the
ratio is exactly 1, so the policy-gradient part is ~0 while its gradient is not. Sampled completions go to
``completions.jsonl`` with their rewards.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from align.checkpoint import atomic_folder, image_seq_len, load_llava, save_llava
from align.config import RecipeError, load_any, save_resolved, to_dict
from align.data.check import check_sources
from align.data.config import DataConfig
from align.data.encode import encode_prompt
from align.data.images import load_image
from align.data.mixing import build_mix
from align.engine import ParamGroup, init_distributed, setup
from align.errors import AlignError
from align.grpo.logps import completion_logps, completion_logps_and_entropy
from align.grpo.loss import (
    LOSS_TYPES,
    SCALE_REWARDS,
    combine_rewards,
    group_advantages,
    grpo_loss,
    mask_truncated,
)
from align.grpo.sampler import SharedPrefixSampler
from align.lora import apply_lora, is_lora, merge_lora_state_dict, save_adapter
from align.model import (
    COMPONENTS,
    component_parameters,
    format_parameter_table,
    parameter_table,
    set_trainable,
)
from align.rewards import R1_PREFILL, load_reward, score_all, warm_up, with_prefill
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
class GRPOSpec:
    """TRL ``GRPOConfig`` names and meanings."""

    num_generations: int = 8
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: same as epsilon (DAPO's clip-higher uses e.g. 0.28)
    num_iterations: int = 1
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    mask_truncated_completions: bool = False
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy", "format"]
    )  # names or module:function
    reward_weights: list[float] | None = None  # one per reward function; None: all 1
    reward_errors: Literal["skip", "raise"] = "skip"  # an exception inside a reward: count + skip, or stop
    shared_prefix: bool = (
        True  # training forward runs each question's image+prompt once for its G completions
    )
    log_completions: int = 4  # completions per step written to completions.jsonl

    def check(self) -> None:
        if self.num_generations < 2:
            raise RecipeError.at(
                "num_generations", f"GRPO compares completions: needs >= 2, got {self.num_generations}"
            )
        if self.max_completion_length < 1:
            raise RecipeError.at("max_completion_length", f"must be >= 1, got {self.max_completion_length}")
        if self.beta < 0:
            raise RecipeError.at("beta", f"must be >= 0, got {self.beta}")
        if self.num_iterations < 1:
            raise RecipeError.at("num_iterations", f"must be >= 1, got {self.num_iterations}")
        if not self.reward_funcs:
            raise RecipeError.at("reward_funcs", "needs at least one reward function")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise RecipeError.at(
                "reward_weights",
                f"{len(self.reward_weights)} weights for {len(self.reward_funcs)} reward functions {self.reward_funcs}",
            )
        assert self.loss_type in LOSS_TYPES and self.scale_rewards in SCALE_REWARDS


@dataclass
class GRPORecipe:
    kind: Literal["grpo"]
    model: str
    output_dir: str
    data: DataConfig
    grpo: GRPOSpec = field(default_factory=GRPOSpec)
    run: RunSpec = field(default_factory=lambda: RunSpec(micro_batch_size=2))  # questions per micro-batch
    optim: OptimSpec = field(default_factory=lambda: OptimSpec(lr=1e-6, warmup_ratio=0.0))
    trainable: TrainableSpec = field(default_factory=TrainableSpec)
    lora: LoRASpec = field(default_factory=LoRASpec)

    def check(self) -> None:
        if self.lora.r > 0 and not self.trainable.llm:
            raise RecipeError.at("lora.r", "LoRA adapts the LLM: it needs trainable.llm: true")


class PolicyLogps(nn.Module):
    """The log-prob pass as a module forward, so DDP and ZeRO see exactly one forward per backward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        return completion_logps_and_entropy(_llava(self.model), **kwargs)


def _llava(model: nn.Module) -> nn.Module:
    return model.get_base_model() if is_lora(model) else model


def _param_groups(module: nn.Module, optim: OptimSpec) -> list[ParamGroup]:
    lrs = {
        "vision": optim.vision_lr or optim.lr,
        "projector": optim.projector_lr or optim.lr,
        "llm": optim.lr,
    }
    groups = []
    for component in COMPONENTS:
        params = [p for _, p in component_parameters(module, component) if p.requires_grad]
        if params:
            groups.append(ParamGroup(component, params, lr=lrs[component], weight_decay=optim.weight_decay))
    return groups


def _all_sum(dist, value: float) -> float:
    return float(dist.all_reduce_mean(float(value))) * dist.world_size


def _eos_ids(tokenizer_eos: int, generation_eos: int | list[int] | None) -> list[int]:
    """End-of-turn ids: the tokenizer's eos and whatever the generation config adds."""
    extra = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    return sorted({tokenizer_eos, *extra})


def _pixels(samples, processor, max_pixels: int):
    """Pixel values of every image of ``samples`` in order (None when text-only) and each row's image sizes."""
    loaded = [[load_image(im, max_pixels) for im in s.images] for s in samples]
    sizes = [[im.size for im in row] for row in loaded]
    flat = [im for row in loaded for im in row]
    if not flat:
        return None, sizes
    return processor.image_processor(images=flat, return_tensors="pt")["pixel_values"], sizes


def _reward_columns(samples, sizes, g: int) -> dict[str, list]:
    """Dataset columns for the reward functions, one value per completion (question-major)."""
    rep = lambda values: [v for v in values for _ in range(g)]  # noqa: E731
    return {
        "solution": rep([s.answer for s in samples]),
        "box": rep([s.meta.get("box") for s in samples]),
        "image_size": rep([sz[0] if sz else None for sz in sizes]),
        "family": rep([s.meta.get("family") for s in samples]),
    }


@dataclass
class RolloutBatch:
    """One micro-batch of questions and what the round learns about it, filled in as the round goes."""

    samples: list
    prompt_ids: list[list[int]]
    pixels: torch.Tensor | None
    images_per_prompt: list[int]
    sizes: list[list[tuple[int, int]]]
    rollout: object = None
    texts: list[str] = field(default_factory=list)
    scores: list[list[float | None]] = field(default_factory=list)
    per_func: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    advantages: torch.Tensor | None = None


def _reference_logps(reference, model, b: RolloutBatch, g: int, cfg: GRPOSpec, engine) -> torch.Tensor:
    """Log-probs under the reference: the frozen copy, or with LoRA the same model with adapters disabled."""
    kwargs = dict(num_generations=g, temperature=cfg.temperature, shared_prefix=cfg.shared_prefix)
    args = (b.prompt_ids, b.pixels, b.images_per_prompt, b.rollout.completion_ids, b.mask)
    with torch.no_grad(), engine.autocast():
        if reference is not None:
            return completion_logps(reference, *args, **kwargs)
        with model.disable_adapter():
            return completion_logps(_llava(model), *args, **kwargs)


def _global_std(dist, rewards: torch.Tensor) -> float:
    finite = rewards[~rewards.isnan()]
    n = _all_sum(dist, finite.numel())
    mean = _all_sum(dist, float(finite.sum())) / max(n, 1)
    return (_all_sum(dist, float(((finite - mean) ** 2).sum())) / max(n - 1, 1)) ** 0.5


def _rollout_metrics(
    dist, batches: list[RolloutBatch], names: list[str], errors: dict, zero_std: list
) -> dict:
    """Reward per function, zero-variance groups and completion lengths, averaged over ranks."""
    per_func = torch.cat([b.per_func for b in batches])
    lengths = torch.cat([b.rollout.lengths for b in batches]).float()
    truncated = torch.cat([b.rollout.is_truncated for b in batches]).float()
    rewards = torch.cat([b.rewards for b in batches])
    mean = lambda t: float(t[~t.isnan()].mean()) if (~t.isnan()).any() else 0.0  # noqa: E731
    row = {}
    for j, name in enumerate(names):
        row[f"reward/{name}"] = float(dist.all_reduce_mean(mean(per_func[:, j])))
        col = per_func[:, j][~per_func[:, j].isnan()]
        row[f"reward_std/{name}"] = float(col.std()) if col.numel() > 1 else 0.0
        row[f"reward_errors/{name}"] = _all_sum(dist, errors[name])
    row.update(
        {
            "reward": float(dist.all_reduce_mean(mean(rewards))),
            "frac_reward_zero_std": float(dist.all_reduce_mean(sum(zero_std) / len(zero_std))),
            "completion_length": float(dist.all_reduce_mean(float(lengths.mean()))),
            "completion_length_max": float(lengths.max()),
            "truncated_share": float(dist.all_reduce_mean(float(truncated.mean()))),
            "completion_tokens": _all_sum(dist, float(lengths.sum())),
        }
    )
    return row


def _save_model(engine, model, processor, folder: Path, lora: LoRASpec, recipe) -> None:
    state = engine.full_state_dict()  # every rank takes part; rank 0 gets the weights
    if state is None:
        return
    state = {k.removeprefix("model."): v for k, v in state.items()}  # PolicyLogps wraps the model as .model
    if is_lora(model):
        state = merge_lora_state_dict(state, lora.alpha / lora.r)
    base = _llava(model)
    save_llava(
        folder,
        config=base.config,
        state_dict=state,
        processor=processor,
        generation_config=base.generation_config,
    )
    save_resolved(recipe, folder)


def train(recipe: GRPORecipe, dist, resume: bool) -> Path:
    """The whole stage on this process; ``dist`` from ``init_distributed()``."""
    run, cfg = recipe.run, recipe.grpo
    out = Path(recipe.output_dir)
    torch.manual_seed(run.seed)
    precision = (
        run.precision if run.precision != "auto" else ("bf16" if dist.device.type == "cuda" else "fp32")
    )
    strategy = run.strategy if run.strategy != "auto" else ("ddp" if dist.world_size > 1 else "single")
    g = cfg.num_generations

    # --- policy, reference, rewards --------------------------------------------------------------------------
    model_dir = resolve_model_folder(recipe.model)
    model, processor = load_llava(model_dir)
    tokenizer = processor.tokenizer
    n_image_tokens = image_seq_len(processor)
    if run.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.lora.r > 0:
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
    reference = None
    if cfg.beta > 0 and not is_lora(model):  # with LoRA the reference is the same model, adapters disabled
        reference, _ = load_llava(model_dir)
        reference.requires_grad_(False).eval().to(dist.device)
    rewards = {spec: load_reward(spec) for spec in cfg.reward_funcs}
    weights = cfg.reward_weights or [1.0] * len(rewards)
    eos_ids = _eos_ids(tokenizer.eos_token_id, _llava(model).generation_config.eos_token_id)
    if dist.is_main:
        print(format_parameter_table(parameter_table(model), f"grpo: {model_dir}"))
        print(
            f"rewards: {', '.join(f'{n} x{w}' for n, w in zip(rewards, weights, strict=True))}; reference model: "
            f"{'none (beta 0)' if cfg.beta == 0 else 'adapters disabled' if is_lora(model) else 'frozen copy'}"
        )

    # --- data ------------------------------------------------------------------------------------------------
    data = recipe.data
    seed = data.seed if data.seed is not None else run.seed
    report = check_sources(data.sources, data.max_image_pixels, decode_images=False)  # fast: headers only
    if not report.ok and data.strict:
        raise AlignError(f"data check failed:\n{report.listing(10)}\n(see all: align data check RECIPE)")
    samples, mix = build_mix(data.sources, seed, data.strict)
    warm_up()  # math_verify's grammar loads once here, not inside the first timed reward call
    prompts = []
    for s in samples:
        if s.answer is None:
            raise AlignError(f"{s.origin}: GRPO rows need a gold answer (solution) for the rewards")
        enc = encode_prompt(s, tokenizer, _llava(model).config.image_token_id, n_image_tokens)
        if len(enc) + cfg.max_completion_length > data.max_length and data.overlong == "error":
            raise AlignError(
                f"{s.origin}: prompt {len(enc)} + max_completion_length {cfg.max_completion_length} "
                f"tokens exceed max_length {data.max_length}"
            )
        prompts.append((s, enc))
    kept = [p for p in prompts if len(p[1]) + cfg.max_completion_length <= data.max_length]
    questions_per_round = run.micro_batch_size * run.grad_accum * dist.world_size
    if len(kept) < questions_per_round:
        raise AlignError(
            f"{len(kept)} usable questions (of {len(prompts)}; prompt + max_completion_length must fit "
            f"max_length {data.max_length}) for {questions_per_round} questions per step"
        )
    rounds_per_epoch = len(kept) // questions_per_round
    total_rounds = run.epochs * rounds_per_epoch
    if run.max_steps:
        total_rounds = min(total_rounds, -(-run.max_steps // cfg.num_iterations))
    total_steps = total_rounds * cfg.num_iterations
    prefill = (
        R1_PREFILL
        if tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
        ).endswith(R1_PREFILL)
        else ""
    )
    if dist.is_main:
        print(mix.table())
        print(
            f"{len(kept)} questions ({len(prompts) - len(kept)} too long), {questions_per_round} per step x {g} "
            f"completions, {total_rounds} rounds x {cfg.num_iterations} iterations = {total_steps} steps"
        )

    # --- engine ----------------------------------------------------------------------------------------------
    policy = PolicyLogps(model)
    engine = setup(
        policy,
        _param_groups(policy, recipe.optim),
        dist=dist,
        strategy=strategy,
        micro_batch_size=run.micro_batch_size,
        grad_accum=run.grad_accum,
        max_grad_norm=recipe.optim.max_grad_norm,
        precision=precision,
        betas=tuple(recipe.optim.betas),
        deepspeed_config=run.deepspeed_config,
    )
    base_lrs = engine.lrs()
    warmup = int(recipe.optim.warmup_ratio * total_steps)
    start_round = 0
    if resume and checkpoints(out):
        step_dir = checkpoints(out)[-1][1]
        start_round = engine.load_state(step_dir / "state")["round"]
        if dist.is_main:
            print(f"resumed from {step_dir} at round {start_round}")
    elif dist.is_main:
        save_resolved(recipe, out)
    metrics = MetricsWriter(out, dist.is_main, run.tensorboard, run.wandb_project, to_dict(recipe))
    samples_file = (out / "completions.jsonl").open("a") if dist.is_main else None
    progress = Progress(total_steps, start_round * cfg.num_iterations, dist.is_main)
    t_start = time.perf_counter()
    order: dict[int, list[int]] = {}

    # --- the loop: one round = rollouts for this step's questions, then num_iterations updates ---------------
    for rnd in range(start_round, total_rounds):
        t0 = time.perf_counter()
        epoch, index = divmod(rnd, rounds_per_epoch)
        if epoch not in order:
            order = {epoch: random.Random(f"grpo-order:{seed}:{epoch}").sample(range(len(kept)), len(kept))}
        round_ids = order[epoch][index * questions_per_round : (index + 1) * questions_per_round]
        per_rank = run.micro_batch_size * run.grad_accum
        mine = [kept[i] for i in round_ids[dist.rank * per_rank : (dist.rank + 1) * per_rank]]
        micro = [mine[i : i + run.micro_batch_size] for i in range(0, per_rank, run.micro_batch_size)]
        generator = torch.Generator().manual_seed(run.seed * 1_000_003 + rnd * 1009 + dist.rank)

        # rollouts: sample, decode, score (old log-probs come from the sampler, once per round)
        batches: list[RolloutBatch] = []
        policy.eval()
        with engine.gathered_for_generation() as gathered, engine.autocast():
            sampler = SharedPrefixSampler(_llava(gathered.model))
            for mb in micro:
                pixels, sizes = _pixels([s for s, _ in mb], processor, data.max_image_pixels)
                b = RolloutBatch(
                    [s for s, _ in mb],
                    [enc.input_ids for _, enc in mb],
                    pixels,
                    [len(s.images) for s, _ in mb],
                    sizes,
                )
                b.rollout = sampler.generate(
                    b.prompt_ids,
                    b.pixels,
                    b.images_per_prompt,
                    num_generations=g,
                    max_new_tokens=cfg.max_completion_length,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    top_k=cfg.top_k,
                    eos_token_ids=eos_ids,
                    pad_token_id=tokenizer.pad_token_id,
                    generator=generator,
                    return_logps=cfg.num_iterations > 1,
                )
                batches.append(b)
        policy.train()

        reward_errors = dict.fromkeys(rewards, 0)
        for b in batches:
            texts = tokenizer.batch_decode(b.rollout.completion_ids, skip_special_tokens=True)
            b.texts = with_prefill(texts, prefill) if prefill else texts  # rewards see the full reasoning
            b.scores, errors = score_all(
                rewards, b.texts, _reward_columns(b.samples, b.sizes, g), on_error=cfg.reward_errors
            )
            for name, n in errors.items():
                reward_errors[name] += n
            b.per_func = torch.tensor([[float("nan") if v is None else v for v in row] for row in b.scores])
            b.rewards = combine_rewards(b.per_func, weights)
            b.mask = b.rollout.completion_mask
            if cfg.mask_truncated_completions:
                b.mask = mask_truncated(b.mask, b.rollout.is_truncated)
            if cfg.beta > 0:
                b.ref_logps = _reference_logps(reference, model, b, g, cfg, engine)

        # advantages: per group of G; "batch" scales by the std of the whole global batch, as TRL does
        all_rewards = torch.cat([b.rewards for b in batches])
        batch_std = _global_std(dist, all_rewards) if cfg.scale_rewards == "batch" else None
        zero_std = []
        for b in batches:
            b.advantages, stats = group_advantages(
                b.rewards, g, "none" if batch_std is not None else cfg.scale_rewards
            )
            if batch_std is not None:
                b.advantages = b.advantages / (batch_std + 1e-4)
            zero_std.append(stats.frac_reward_zero_std)

        # updates: num_iterations optimizer steps on the same completions
        n_tokens = _all_sum(dist, sum(float(b.mask.sum()) for b in batches))
        for it in range(cfg.num_iterations):
            step = rnd * cfg.num_iterations + it
            lrs = {n: lr_at(step, total_steps, base_lrs[n], recipe.optim.schedule, warmup) for n in base_lrs}
            engine.set_lrs(lrs)
            sums: dict[str, float] = {}
            for b in batches:
                with engine.autocast():
                    logps, entropy = engine.module(
                        prompt_ids=b.prompt_ids,
                        pixel_values=b.pixels,
                        images_per_prompt=b.images_per_prompt,
                        completion_ids=b.rollout.completion_ids,
                        completion_mask=b.mask,
                        num_generations=g,
                        temperature=cfg.temperature,
                        shared_prefix=cfg.shared_prefix,
                    )
                loss, parts = grpo_loss(
                    logps,
                    b.rollout.logps if cfg.num_iterations > 1 else None,
                    b.ref_logps,
                    b.advantages,
                    b.mask,
                    beta=cfg.beta,
                    epsilon=cfg.epsilon,
                    epsilon_high=cfg.epsilon_high or cfg.epsilon,
                    loss_type=cfg.loss_type,
                    max_completion_length=cfg.max_completion_length,
                    num_items_in_batch=n_tokens,
                    num_processes=dist.world_size,
                    accumulation_steps=run.grad_accum,
                )
                engine.backward(loss)
                grad_norm = engine.step()
                values = {
                    "loss": loss,
                    "loss/policy": parts.policy,
                    "loss/kl": parts.kl_penalty,
                    "kl": parts.kl,
                    "ratio": parts.ratio_mean,
                    "clip_ratio/low": parts.clip_ratio_low,
                    "clip_ratio/high": parts.clip_ratio_high,
                    "clip_ratio/region": parts.clip_ratio_region,
                    "entropy": (entropy.detach() * b.mask).sum() / b.mask.sum().clamp(min=1),
                }
                for key, value in values.items():
                    if value is not None:
                        sums[key] = sums.get(key, 0.0) + float(value) / len(batches)
            row = {k: float(dist.all_reduce_mean(v)) for k, v in sums.items()}
            row.update(_rollout_metrics(dist, batches, list(rewards), reward_errors, zero_std))
            elapsed = time.perf_counter() - t0
            row.update(
                {
                    "lr": lrs.get("llm", next(iter(lrs.values()))),
                    "grad_norm": grad_norm,
                    "round_time_s": elapsed,
                    "completion_tokens_per_s": row["completion_tokens"] / elapsed,
                }
            )
            if (step + 1) % run.log_every == 0 or step + 1 == total_steps:
                metrics.log(step + 1, row)
                progress.update(step, row)
        if samples_file is not None:
            b = batches[0]
            for i in range(min(cfg.log_completions, len(b.texts))):
                s = b.samples[i // g]
                record = {
                    "step": (rnd + 1) * cfg.num_iterations,
                    "origin": s.origin,
                    "gold": s.answer,
                    "completion": b.texts[i],
                    "rewards": dict(zip(rewards, b.scores[i], strict=True)),
                }
                samples_file.write(json.dumps(record) + "\n")
            samples_file.flush()

        done = (rnd + 1) * cfg.num_iterations
        crossed = run.save_every and done // run.save_every > rnd * cfg.num_iterations // run.save_every
        if crossed and rnd + 1 < total_rounds:
            step_dir = out / "checkpoints" / f"step-{done:07d}"
            _save_model(engine, model, processor, step_dir / "model", recipe.lora, recipe)
            engine.save_state(step_dir / "state", extra={"round": rnd + 1})
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
            "stage": "grpo",
            "steps": total_steps,
            "resumed_from_round": start_round,
            "wall_time_s": wall,
            "peak_memory_mb": peak_memory_mb(),
            "world_size": dist.world_size,
            "strategy": strategy,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        samples_file.close()
        print(f"done: {out / 'model'} | wall {wall:.1f}s | peak memory {summary['peak_memory_mb']:.0f} MB")
    metrics.close()
    return out


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="grpo recipe")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in output_dir"
    )


def run(args) -> int:
    recipe = load_any(args.recipe, args.overrides, expect="grpo")
    dist = init_distributed()
    train(recipe, dist, args.resume)
    return dist.shutdown(0)
