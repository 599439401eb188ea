"""Stage 3: GRPO with rule-based rewards (R1-V / VLM-R1 style), TRL's option names and math.

Run::

    align grpo RECIPE [key=value ...] [--resume]
    torchrun --nproc_per_node 8 -m align.cli grpo RECIPE run.strategy=zero3 run.deepspeed_config=recipes/deepspeed/zero3.json

Read it top to bottom: recipe -> model (+ reference) -> data -> engine -> rounds -> save. One *round*
samples G completions for each of this step's questions (one vision pass and one prefill per question batch,
the cache shared by the G completions), scores them, turns rewards into group-normalised advantages, and then
takes ``num_iterations`` optimizer steps on those completions (TRL's meaning). A step in the logs and in
``max_steps`` / ``save_every`` is an optimizer step. ``run.micro_batch_size`` counts *questions*; TRL's
``per_device_train_batch_size`` counts completions (= questions x ``num_generations``).

Defaults and why (TRL's defaults differ where noted):
* ``beta: 0.04`` — R1-V and VLM-R1 used 0.04; TRL now defaults to 0 (no reference model). ``beta: 0`` loads
  no reference model here too. The reference is a frozen copy of the input model (under ZeRO-3 partitioned
  across the ranks like the policy, not a full copy per rank), or with LoRA the same model with its adapters
  disabled (no second copy).
* ``loss_type: grpo`` and ``scale_rewards: group`` — the original GRPO the R1 vision projects trained with;
  TRL's default is ``dapo``. Every TRL value listed in the schema is implemented with TRL's math.
* ``num_generations: 8``, ``temperature: 1.0``, ``epsilon: 0.2`` — TRL's and R1-V's.
* ``max_completion_length: 256`` — long enough for the synthetic task's reasoning; real runs raise it.

What is computed once: with ``num_iterations: 1`` the sampling policy is the trained one, so no old log-probs
exist (TRL's shortcut); with more, the sampler returns the log-probs of the tokens it drew and they serve as
the old log-probs of every iteration (no extra forward). Under ZeRO-3 the engine gathers the weights once for
the whole rollout phase, which also holds the reference pass (with LoRA it runs on those gathered weights). In
multi-process runs a rank whose questions have no image runs the tower on a blank image and adds 0 x its
features, so that every rank calls the same modules (ZeRO-3 gathers collectively; DDP needs every gradient). The
reward functions see the full reasoning text: a ``<think>\\n`` the chat template prefilled is put back in
front of every completion. SigLIP's attention-pooling head, whose output Llava never reads, is switched off.

Per step the metrics show reward mean/std per function, the fraction of groups whose rewards do not vary
(their advantages are 0 and they teach nothing), completion length (mean/max/truncated share), KL, clip
ratios, entropy, the loss split into its policy-gradient and KL parts (with ``num_iterations: 1`` the ratio is
exactly 1, so the policy-gradient part is ~0 while its gradient is not), throughput and where the time went
(``time/rollout_s``, ``time/rewards_s``, ``time/reference_s``, ``time/update_s``). Sampled completions go to
``completions.jsonl`` with their rewards.

DAPO's dynamic sampling (``dynamic_sampling: true``, which TRL does not have; verl's ``filter_groups``): after
each rollout round every rank keeps its question groups whose rewards vary; while any rank has fewer than its
``micro_batch_size x grad_accum``, every rank rolls out the next questions of the data order (the decision is
taken on the shortfall summed over ranks, so all do the same rounds and updates), up to
``dynamic_sampling_max_rounds``, after which zero-variance groups fill the gaps (verl stops with an error
there). Advantages and the reward metrics are then those of the groups trained on;
``dynamic_sampling/dropped_groups`` counts the zero-variance groups left out over all ranks and
``dynamic_sampling/rounds`` the rounds used. Steps keep their number, so a run reads its data faster; the
number of rounds drawn is saved with each checkpoint, and resuming continues the same data order and seeds.

Rollouts through vLLM (``grpo.rollout.backend: vllm``, TRL's ``vllm_*`` names; :mod:`align.grpo.vllm_backend`):
before each round that follows an optimizer step every rank walks the policy one module at a time (ZeRO-3
gathers each module, then frees it) and vLLM gets the changed components in llava-hf names, LoRA merged
(colocated: each rank's own engine; server: rank 0 sends). The completions then carry vLLM's log-probs; the
trainer scores them once without gradients (TRL's old log-probs) and, with
``vllm_importance_sampling_correction`` (on by default, as in TRL), the policy-gradient term of each token is
weighted by the truncated or masked ratio pi_trainer / pi_vllm. Logged per step (TRL's names):
``sampling/sampling_logp_difference/mean|max``, ``sampling/importance_sampling_ratio/min|mean|max``; and
``time/weight_sync_s``, ``time/old_logps_s``. Tests: ``.venv/bin/pytest -q tests/test_vllm_backend.py`` (vLLM from ``.venv-vllm``).

Where this differs from TRL 1.16 on purpose: micro-batches hold whole question groups (TRL shuffles
completions across the micro-batches of a generation batch, which only changes how ``grpo``/``bnpo`` average
within a micro-batch); reward functions get the columns ``solution``, ``box``, ``image_size``, ``family`` and
TRL's ``completion_ids`` (not ``prompts``); the prefill is restored before scoring (TRL scores the raw completion).

Tests: ``.venv/bin/pytest -q tests/test_grpo_stage.py`` (``-m distributed`` for the 2-process runs).
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from align.checkpoint import (
    atomic_folder,
    eos_token_ids,
    image_seq_len,
    load_llava,
    resolve_model_folder,
    save_llava,
)
from align.config import MAX_TOKENS, RecipeError, load_any, ranged, save_resolved, to_dict
from align.data.check import checked_mix, stage_row_check
from align.data.config import DataConfig
from align.data.encode import encode_prompt
from align.data.images import load_image, pixel_values
from align.engine import held_parameters, init_distributed, partitioned_loading, setup
from align.errors import AlignError
from align.grpo.logps import completion_logps_and_entropy
from align.grpo.loss import (
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_TYPES,
    SCALE_REWARDS,
    VLLM_IMPORTANCE_SAMPLING_MODES,
    combine_rewards,
    group_advantages,
    grpo_loss,
    mask_truncated,
    vllm_importance_sampling,
)
from align.grpo.rollout import (
    RolloutBatch,
    all_sum,
    fill_groups,
    global_std,
    has_signal,
    llava_of,
    merge_groups,
    reference_logps,
    reward_columns,
    reward_names,
    rollout_metrics,
    skip_pooling_head,
    split_groups,
)
from align.grpo.sampler import SharedPrefixSampler
from align.grpo.vllm_backend import changing_parameters, open_backend, sync_weights
from align.lora import apply_lora, is_lora, merge_lora_state_dict, save_adapter
from align.model import (
    format_parameter_table,
    parameter_table,
    set_trainable,
)
from align.plot import plot_run
from align.rewards import R1_PREFILL, load_reward, score_all, warm_up, with_prefill
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
class RolloutSpec:
    """Who samples the rollouts (``grpo.rollout``): our sampler, or vLLM with TRL's ``vllm_*`` option names."""

    backend: Literal["align", "vllm"] = (
        "align"  # vllm: pip install -e ".[vllm]" (see align/grpo/vllm_backend.py)
    )
    vllm_mode: Literal["colocate", "server"] = (
        "colocate"  # vLLM in the training processes, or a separate server
    )
    vllm_server_host: str = "0.0.0.0"  # server mode: where the vLLM server listens
    vllm_server_port: int = ranged(8000, ge=1, le=65535)  # server mode: its port
    vllm_server_timeout: float = ranged(240.0, gt=0)  # seconds to wait for the server to answer /health
    vllm_gpu_memory_utilization: float = ranged(0.3, gt=0, le=1)  # colocate: share of each GPU vLLM takes
    vllm_enable_sleep_mode: bool = False  # colocate: vLLM frees its weights and KV cache outside rollouts
    vllm_max_model_length: int | None = ranged(
        None, ge=1, le=MAX_TOKENS
    )  # colocate: vLLM's context; None: the model's; >= data.max_length
    vllm_importance_sampling_correction: bool = (
        True  # reweigh the loss by pi_trainer / pi_vllm (TRL's default)
    )
    vllm_importance_sampling_mode: Literal[
        "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"
    ] = "sequence_mask"  # per token or per completion; clamp to [clip_min, clip_max] or zero outside
    vllm_importance_sampling_clip_min: float | None = ranged(None, ge=0)  # None: no lower bound
    vllm_importance_sampling_clip_max: float | None = ranged(3.0, gt=0)  # None: no upper bound

    def check(self) -> None:
        defaults = RolloutSpec()
        if self.backend == "align":
            changed = [k for k in vars(self) if k != "backend" and getattr(self, k) != getattr(defaults, k)]
            if changed:
                raise RecipeError.at(
                    changed[0], "applies to backend vllm only; this recipe has backend: align"
                )
        if self.vllm_mode == "server":
            for key in ("vllm_gpu_memory_utilization", "vllm_enable_sleep_mode", "vllm_max_model_length"):
                if getattr(self, key) != getattr(defaults, key):
                    raise RecipeError.at(
                        key, "applies to vllm_mode colocate; a server takes it on its own command line"
                    )
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if low is not None and high is not None and low >= high:
            raise RecipeError.at(
                "vllm_importance_sampling_clip_min",
                f"must be below vllm_importance_sampling_clip_max ({high:g}), got {low:g}",
            )
        if self.vllm_importance_sampling_mode.endswith("_truncate") and low is None and high is None:
            raise RecipeError.at(
                "vllm_importance_sampling_mode",
                f"{self.vllm_importance_sampling_mode} clamps to [clip_min, clip_max]: set at least one of them",
            )
        assert self.vllm_importance_sampling_mode in VLLM_IMPORTANCE_SAMPLING_MODES


@dataclass
class GRPOSpec:
    """TRL ``GRPOConfig`` names and meanings."""

    num_generations: int = ranged(8, ge=2, note="GRPO compares completions")  # G completions per question
    max_completion_length: int = ranged(256, ge=1, le=MAX_TOKENS)  # tokens
    temperature: float = ranged(1.0, gt=0)  # GRPO samples: 0 (greedy) would give G equal completions
    top_p: float = ranged(1.0, gt=0, le=1)
    top_k: int | None = ranged(None, ge=0, note="0 or null: off")
    beta: float = ranged(0.04, ge=0)  # KL coefficient; 0: no reference model term
    epsilon: float = ranged(0.2, ge=0, le=1)  # the ratio is clipped below at 1 - epsilon
    epsilon_high: float | None = ranged(None, ge=0)  # >= epsilon; None: epsilon (DAPO's clip-higher: 0.28)
    num_iterations: int = ranged(1, ge=1)
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    importance_sampling_level: Literal["token", "sequence"] = (
        "token"  # pi/pi_old per token, or per completion: exp(mean token log-ratio), GSPO (with loss_type grpo)
    )
    mask_truncated_completions: bool = (
        False  # DAPO's overlong filtering: completions cut at max_completion_length add no loss
    )
    dynamic_sampling: bool = (
        False  # DAPO: drop groups whose G rewards are all equal, roll out more questions to fill the step
    )
    dynamic_sampling_max_rounds: int = ranged(
        10, ge=2, note="1 could not refill"
    )  # rollout rounds per step at most (verl's max_num_gen_batches); then zero-variance groups fill the rest
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy", "format"]
    )  # names or module:function
    reward_params: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # keyword arguments per reward_funcs entry (any YAML value), e.g. {soft_overlong: {soft_punish_cache: 32}}
    reward_weights: list[float] | None = ranged(None)  # one per reward function, any sign; None: all 1
    reward_errors: Literal["skip", "raise"] = "skip"  # an exception inside a reward: count + skip, or stop
    shared_prefix: bool = (
        True  # training forward runs each question's image+prompt once for its G completions
    )
    log_completions: int = ranged(4, ge=0)  # completions per step written to completions.jsonl
    rollout: RolloutSpec = field(default_factory=RolloutSpec)  # our sampler or vLLM

    def check(self) -> None:
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon:
            raise RecipeError.at(
                "epsilon_high",
                f"clips the ratio above at 1 + epsilon_high: must be >= epsilon ({self.epsilon:g}), "
                f"got {self.epsilon_high:g}",
            )
        if not self.reward_funcs:
            raise RecipeError.at("reward_funcs", "needs at least one reward function")
        if len(set(self.reward_funcs)) != len(self.reward_funcs):
            raise RecipeError.at("reward_funcs", f"lists a function twice: {self.reward_funcs}")
        # a typo or a missing module stops here, not after minutes of loading
        for i, spec in enumerate(self.reward_funcs):
            try:
                load_reward(spec)
            except AlignError as err:
                raise RecipeError.at(f"reward_funcs[{i}]", str(err)) from None
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise RecipeError.at(
                "reward_weights",
                f"{len(self.reward_weights)} weights for {len(self.reward_funcs)} reward functions {self.reward_funcs}",
            )
        for spec in self.reward_params:
            if spec not in self.reward_funcs:
                raise RecipeError.at(
                    f"reward_params.{spec}", f"is not one of reward_funcs {self.reward_funcs}"
                )
        # each reward bound as the stage binds it: a misspelt or impossible parameter stops here
        for spec in self.reward_funcs:
            params = self.reward_params_for(spec)
            if params:
                try:
                    load_reward(spec, params)
                except AlignError as err:
                    raise RecipeError.at(f"reward_params.{spec}", str(err)) from None
        if self.dynamic_sampling and self.reward_weights is not None and not any(self.reward_weights):
            raise RecipeError.at(
                "dynamic_sampling",
                "every reward weight is 0, so every group has zero variance and none could ever be kept",
            )
        assert self.loss_type in LOSS_TYPES and self.scale_rewards in SCALE_REWARDS
        assert self.importance_sampling_level in IMPORTANCE_SAMPLING_LEVELS

    def reward_params_for(self, spec: str) -> dict:
        """The keyword arguments ``spec`` is bound with; soft_overlong's budget defaults to this stage's."""
        defaults = {"max_completion_len": self.max_completion_length} if spec == "soft_overlong" else {}
        return {**defaults, **self.reward_params.get(spec, {})}


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
        check_trainable(self.trainable, self.lora)
        length = self.grpo.rollout.vllm_max_model_length
        if length is not None and length < self.data.max_length:
            raise RecipeError.at(
                "grpo.rollout.vllm_max_model_length",
                f"{length} is below data.max_length ({self.data.max_length}): a prompt plus its completion may need "
                "that many tokens",
            )


class PolicyLogps(nn.Module):
    """The log-prob pass as a module forward, so DDP and ZeRO see exactly one forward per backward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        return completion_logps_and_entropy(llava_of(self.model), **kwargs)


def _trim_completions(output_dir: Path, after_step: int) -> None:
    """Drop completions.jsonl records of steps after ``after_step`` (0: all): a resumed run writes them again."""
    path = output_dir / "completions.jsonl"
    if path.exists():
        kept = [
            line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step
        ]
        path.write_text("".join(line + "\n" for line in kept))


def _sampling_correction(
    engine, policy: nn.Module, batches: list[RolloutBatch], cfg: GRPOSpec, dist, blank
) -> tuple[list, list, dict[str, float]]:
    """Per micro-batch: the old log-probs for the loss and the vLLM importance-sampling weights; the mismatch
    metrics under TRL's names (means over ranks, extremes over ranks).

    Our sampler: its own log-probs are the old ones (``num_iterations > 1``), no weights. vLLM: its log-probs are
    another engine's, so the trainer scores the completions once without gradients (TRL's
    ``old_per_token_logps``) when the correction is on or ``num_iterations > 1``; with one iteration the loss keeps
    the exact ratio-1 shortcut (the trainer's log-probs before the step are the current ones).
    """
    rs, n = cfg.rollout, len(batches)
    if rs.backend == "align":
        return [b.rollout.logps if cfg.num_iterations > 1 else None for b in batches], [None] * n, {}
    if not rs.vllm_importance_sampling_correction and cfg.num_iterations == 1:
        return [None] * n, [None] * n, {}
    trainer = []
    policy.eval()
    with torch.no_grad(), engine.autocast():
        for b in batches:  # every rank runs the same number of forwards (ZeRO-3 gathers in them)
            logps, _ = engine.module(
                prompt_ids=b.prompt_ids,
                pixel_values=b.pixels,
                images_per_prompt=b.images_per_prompt,
                completion_ids=b.rollout.completion_ids,
                completion_mask=b.rollout.completion_mask,
                num_generations=cfg.num_generations,
                temperature=cfg.temperature,
                shared_prefix=cfg.shared_prefix,
                blank_pixels=blank,
            )
            trainer.append(logps.float())
    policy.train()
    old = trainer if cfg.num_iterations > 1 else [None] * n
    if not rs.vllm_importance_sampling_correction:
        return old, [None] * n, {}
    weights, stats = [], []
    for b, logps in zip(batches, trainer, strict=True):
        w, s = vllm_importance_sampling(
            logps,
            b.rollout.logps,
            b.mask,
            mode=rs.vllm_importance_sampling_mode,
            clip_min=rs.vllm_importance_sampling_clip_min,
            clip_max=rs.vllm_importance_sampling_clip_max,
        )
        weights.append(w)
        stats.append(s)
    mean = lambda values: dist.all_reduce_mean(sum(values) / len(values))  # noqa: E731
    row = {
        "sampling/sampling_logp_difference/mean": mean([s.logp_difference_mean for s in stats]),
        "sampling/sampling_logp_difference/max": dist.all_reduce_max(
            max(s.logp_difference_max for s in stats)
        ),
        "sampling/importance_sampling_ratio/min": -dist.all_reduce_max(-min(s.ratio_min for s in stats)),
        "sampling/importance_sampling_ratio/mean": mean([s.ratio_mean for s in stats]),
        "sampling/importance_sampling_ratio/max": dist.all_reduce_max(max(s.ratio_max for s in stats)),
    }
    return old, weights, row


def _save_model(engine, model, processor, folder: Path, lora: LoRASpec, recipe) -> dict | None:
    """Consolidate (every rank), merge LoRA, write a plain Llava folder from rank 0.

    Returns the consolidated, unmerged peft-model state dict on rank 0 (for the adapter), ``None`` elsewhere.
    """
    state = engine.full_state_dict()  # every rank takes part; rank 0 gets the weights
    if state is None:
        return None
    state = {k.removeprefix("model."): v for k, v in state.items()}  # PolicyLogps wraps the model as .model
    merged = merge_lora_state_dict(state, lora.alpha / lora.r) if is_lora(model) else state
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


def train(recipe: GRPORecipe, dist, resume: bool) -> Path:
    """The whole stage on this process (``dist`` from ``init_distributed()``), holding its output_dir."""
    with hold_output_dir(recipe.output_dir, dist):
        return _train(recipe, dist, resume)


def _train(recipe: GRPORecipe, dist, resume: bool) -> Path:
    run, cfg = recipe.run, recipe.grpo
    out = Path(recipe.output_dir)
    torch.manual_seed(run.seed)
    precision = (
        run.precision if run.precision != "auto" else ("bf16" if dist.device.type == "cuda" else "fp32")
    )
    strategy = run.strategy if run.strategy != "auto" else ("ddp" if dist.world_size > 1 else "single")
    g = cfg.num_generations
    # before any heavy work: a fresh run into a folder with old checkpoints stops here
    resume_from = resume_point(out, resume)
    # the model folder's config.json before the data: a wrong folder fails in a second, not after the rows
    model_dir = resolve_model_folder(recipe.model)

    # every row checked (images decoded, boxes, a gold answer the rewards can score) and data.strict applied
    # before any model loads
    data = recipe.data
    seed = data.seed if data.seed is not None else run.seed
    row_check = stage_row_check("grpo", cfg.reward_funcs)
    samples, mix = checked_mix(data, seed, row_check, log=print if dist.is_main else None)

    # --- policy, reference, rewards --------------------------------------------------------------------------
    # ZeRO in bf16 trains bf16 weights (fp32 masters are made from them); single/ddp keep fp32 and autocast.
    # The reference takes the policy's dtype so that KL is exactly 0 before the first update.
    dtype = torch.bfloat16 if strategy.startswith("zero") and precision == "bf16" else torch.float32
    engine_values = {
        "micro_batch_size": run.micro_batch_size,
        "grad_accum": run.grad_accum,
        "max_grad_norm": recipe.optim.max_grad_norm,
        "precision": precision,
    }
    # zero3: policy and reference load straight into each rank's 1/N partition, never a whole copy per rank
    with partitioned_loading(dist, strategy, run.deepspeed_config, **engine_values):
        model, processor = load_llava(model_dir, dtype=dtype)
    tokenizer = processor.tokenizer
    n_image_tokens = image_seq_len(processor)
    if run.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.lora.r > 0:
        if run.gradient_checkpointing:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need an input with grad
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
    unreachable = freeze_unreachable_vision(
        llava_of(model)
    )  # DDP stops on trainable parameters without grads
    skip_pooling_head(llava_of(model))
    reference = None
    if cfg.beta > 0 and not is_lora(model):  # with LoRA the reference is the same model, adapters disabled
        with partitioned_loading(dist, strategy, run.deepspeed_config, **engine_values):
            reference, _ = load_llava(model_dir, dtype=dtype)
        skip_pooling_head(reference)
    rewards = {
        name: load_reward(spec, cfg.reward_params_for(spec))
        for name, spec in zip(reward_names(cfg.reward_funcs), cfg.reward_funcs, strict=True)
    }
    weights = cfg.reward_weights or [1.0] * len(rewards)
    eos_ids = eos_token_ids(tokenizer, llava_of(model).generation_config)
    if dist.is_main:
        print(format_parameter_table(parameter_table(model), f"grpo: {model_dir}"))
        if unreachable:
            print(f"vision: {len(unreachable)} tensors feed no image feature and stay frozen")
        print(
            f"rewards: {', '.join(f'{n} x{w}' for n, w in zip(rewards, weights, strict=True))}; reference model: "
            f"{'none (beta 0)' if cfg.beta == 0 else 'adapters disabled' if is_lora(model) else 'frozen copy'}"
        )

    # --- data ------------------------------------------------------------------------------------------------
    if "accuracy" in cfg.reward_funcs:
        warm_up()  # math_verify's grammar loads once here, not inside the first timed reward call
    prompts = []
    image_token_id = llava_of(model).config.image_token_id
    for s in samples:
        enc = encode_prompt(s, tokenizer, image_token_id, n_image_tokens)
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
    total_steps = run.epochs * rounds_per_epoch * cfg.num_iterations
    if run.max_steps:
        total_steps = min(total_steps, run.max_steps)
    total_rounds = -(-total_steps // cfg.num_iterations)  # the last round may stop before num_iterations
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
            f"completions, {total_rounds} rounds x {cfg.num_iterations} iterations -> {total_steps} steps"
        )

    # --- engine ----------------------------------------------------------------------------------------------
    policy = PolicyLogps(model)
    engine = setup(
        policy,
        param_groups(policy, recipe.optim),
        dist=dist,
        strategy=strategy,
        betas=tuple(recipe.optim.betas),
        deepspeed_config=run.deepspeed_config,
        **engine_values,
    )
    memory_text, memory = memory_vs_plan(model, engine, strategy, dist.world_size)
    if dist.is_main:
        print(memory_text)
    # A rank whose questions have no image still runs the tower (on this blank) in its rollout, reference and
    # training forwards: ZeRO-3 gathers collectively, and at each forward start it checks that the ranks called
    # the same modules in the same order since the last one, the rollout's prefill included (without the blank
    # there: "disagreement on list length between rank0 and rank1" at step 2); DDP wants a gradient for every
    # trainable parameter.
    size = llava_of(model).config.vision_config.image_size
    blank = torch.zeros(1, 3, size, size) if dist.distributed else None
    if reference is not None:
        reference = engine.frozen(reference)  # zero3: partitioned like the policy, not a full copy per rank
        if dist.is_main:
            held, total = held_parameters(reference)
            print(f"reference model: this rank holds {held:,} of its {total:,} parameters")
    base_lrs = engine.lrs()  # before load_state, which restores the schedule's current values
    warmup = int(recipe.optim.warmup_ratio * total_steps)
    start_round = draws = 0
    if resume_from is not None:
        saved = engine.load_state(resume_from / "state")
        start_round = saved["round"]
        draws = saved.get("draws", start_round)  # states written before dynamic sampling: a draw per round
        if dist.is_main:
            print(f"resumed from {resume_from} at round {start_round}")
    start_step = start_round * cfg.num_iterations
    if dist.is_main:
        for stale in remove_incomplete_checkpoints(out):
            print(f"removed {stale}: an interrupted save")
        truncate_metrics(out, start_step)  # steps after the checkpoint are logged again
        _trim_completions(out, start_step)
        if resume_from is None:
            save_resolved(recipe, out)
    # --- rollout backend: vLLM gets the policy's weights before each rollout phase that follows an update ------
    rs = cfg.rollout
    backend = None
    if rs.backend == "vllm":
        backend = open_backend(
            rs.vllm_mode,
            model_dir,
            image_token_id=image_token_id,
            host=rs.vllm_server_host,
            port=rs.vllm_server_port,
            timeout=rs.vllm_server_timeout,
            gpu_memory_utilization=rs.vllm_gpu_memory_utilization,
            enable_sleep_mode=rs.vllm_enable_sleep_mode,
            max_model_len=rs.vllm_max_model_length,
            dtype="bfloat16" if precision == "bf16" else "float32",
            seed=run.seed + dist.rank,
            distributed=dist.distributed,
            max_images_per_prompt=max((len(s.images) for s, _ in kept), default=1),
        )
        if dist.is_main:
            where = "in this process" if rs.vllm_mode == "colocate" else f"at {backend.base}"
            print(f"rollouts: vLLM {rs.vllm_mode} {where}")
    # a colocated engine starts from model_dir, which a fresh run trains from; a server may serve anything
    synced_steps = 0 if rs.vllm_mode == "colocate" and resume_from is None else None
    sync_select = changing_parameters(policy.named_parameters())
    lora_scaling = recipe.lora.alpha / recipe.lora.r if is_lora(model) else None
    pushes_weights = rs.vllm_mode == "colocate" or dist.is_main  # server mode: rank 0 sends, all gather
    announced = False  # the first sync is printed
    metrics = MetricsWriter(out, dist.is_main, run.tensorboard, run.wandb_project, to_dict(recipe))
    samples_file = (out / "completions.jsonl").open("a") if dist.is_main else None
    progress = Progress(total_steps, start_step, dist.is_main)
    t_start = time.perf_counter()
    order: dict[int, list[int]] = {}
    per_rank = run.micro_batch_size * run.grad_accum
    max_draws = cfg.dynamic_sampling_max_rounds if cfg.dynamic_sampling else 1

    # --- the loop: one round = rollouts for this step's questions, then num_iterations updates ---------------
    for rnd in range(start_round, total_rounds):
        t_round = time.perf_counter()
        torch.manual_seed(run.seed * 1_000_003 + rnd)  # dropout depends on the round only: exact resume
        # A draw reads the next step's worth of questions in the data order (and seeds sampling by its number):
        # one per round, or with dynamic sampling more until every rank holds per_rank groups with signal.
        varied: list[RolloutBatch] = []  # dynamic sampling: this rank's question groups whose rewards vary
        flat: list[RolloutBatch] = []  # and those whose G rewards are all equal
        reward_errors = dict.fromkeys(rewards, 0)
        seconds = dict.fromkeys(("rollout", "reference", "rewards"), 0.0)
        if backend is not None:
            seconds["weight_sync"] = 0.0
            if synced_steps != engine.optimizer_steps:  # every rank: ZeRO-3 gathers collectively
                t_sync = time.perf_counter()
                sent = sync_weights(
                    backend if pushes_weights else None,
                    lambda: engine.gathered_parameters_in_chunks(sync_select),
                    lora_scaling,
                    strip="model.",  # PolicyLogps holds the model as .model
                )
                # server mode: rank 0 alone sends; another rank generating before the last chunk landed would
                # run a half-reloaded model (vLLM: "Tensor on device meta is not on the expected device cpu")
                dist.barrier()
                seconds["weight_sync"] = time.perf_counter() - t_sync
                if dist.is_main and not announced:
                    announced = True
                    print(
                        f"vllm: synced {sent} tensors in {seconds['weight_sync']:.2f} s (after every update)"
                    )
                synced_steps = engine.optimizer_steps
        first_draw = draws
        for _ in range(max_draws):
            t_draw = time.perf_counter()
            epoch, index = divmod(draws, rounds_per_epoch)
            if epoch not in order:
                shuffled = random.Random(f"grpo-order:{seed}:{epoch}").sample(range(len(kept)), len(kept))
                order = {epoch: shuffled}
            round_ids = order[epoch][index * questions_per_round : (index + 1) * questions_per_round]
            mine = [kept[i] for i in round_ids[dist.rank * per_rank : (dist.rank + 1) * per_rank]]
            micro = [mine[i : i + run.micro_batch_size] for i in range(0, per_rank, run.micro_batch_size)]
            generator = torch.Generator().manual_seed(run.seed * 1_000_003 + draws * 1009 + dist.rank)
            draws += 1

            # rollouts: one gathered phase for all micro-batches; old log-probs come from the sampler, once.
            # vLLM holds its own weights: the policy is gathered only for the LoRA reference pass.
            batches: list[RolloutBatch] = []
            policy.eval()
            gather = backend is None or (cfg.beta > 0 and reference is None)
            phase = engine.gathered_for_generation() if gather else contextlib.nullcontext(engine.model)
            with phase as gathered, engine.autocast():
                sampler = backend if backend is not None else SharedPrefixSampler(llava_of(gathered.model))
                for mb in micro:
                    pixels, flat_sizes = pixel_values(
                        [im for s, _ in mb for im in s.images],
                        processor.image_processor,
                        data.max_image_pixels,
                        [s.origin for s, _ in mb for _ in s.images],
                    )
                    sizes, at = [], 0  # per row: its images' sizes
                    for s, _ in mb:
                        sizes.append(flat_sizes[at : at + len(s.images)])
                        at += len(s.images)
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
                        blank_pixels=blank,
                        images=None
                        if backend is None
                        else [
                            load_image(im, data.max_image_pixels, s.origin) for s, _ in mb for im in s.images
                        ],
                    )
                    batches.append(b)
                t_rollout = time.perf_counter()
                if cfg.beta > 0 and reference is None:  # LoRA: the policy's gathered weights, adapters off
                    for b in batches:
                        b.ref_logps = reference_logps(
                            None, gathered.model, b, g, cfg.temperature, cfg.shared_prefix, blank
                        )
            policy.train()
            # the frozen copy: after the block, so the gathered policy is released first
            if reference is not None:
                with engine.autocast():
                    for b in batches:
                        b.ref_logps = reference_logps(
                            reference, model, b, g, cfg.temperature, cfg.shared_prefix, blank
                        )
            t_reference = time.perf_counter()

            for b in batches:
                texts = tokenizer.batch_decode(b.rollout.completion_ids, skip_special_tokens=True)
                b.texts = with_prefill(texts, prefill) if prefill else texts  # rewards see the full reasoning
                b.scores, errors = score_all(
                    rewards,
                    b.texts,
                    reward_columns(b.samples, b.sizes, g, b.rollout),
                    on_error=cfg.reward_errors,
                )
                for name, n in errors.items():
                    reward_errors[name] += n
                b.per_func = torch.tensor(
                    [[float("nan") if v is None else v for v in row] for row in b.scores]
                )
                b.rewards = combine_rewards(b.per_func, weights)
                b.mask = b.rollout.completion_mask
                if cfg.mask_truncated_completions:
                    b.mask = mask_truncated(b.mask, b.rollout.is_truncated)
            t_rewards = time.perf_counter()
            seconds["rollout"] += t_rollout - t_draw
            seconds["reference"] += t_reference - t_rollout
            seconds["rewards"] += t_rewards - t_reference
            if not cfg.dynamic_sampling:
                break
            for b in batches:
                for piece, signal in zip(split_groups(b, g), has_signal(b.rewards, g).tolist(), strict=True):
                    (varied if signal else flat).append(piece)
            # all ranks draw again while any one lacks groups with signal: one decision, on the summed shortfall
            if all_sum(dist, max(0, per_rank - len(varied))) == 0:
                break

        if cfg.dynamic_sampling:  # the update sees per_rank groups: with signal, or filled at the round limit
            chosen, dropped = fill_groups(varied, flat, per_rank)
            batches = [
                merge_groups(chosen[i : i + run.micro_batch_size], tokenizer.pad_token_id)
                for i in range(0, per_rank, run.micro_batch_size)
            ]

        # advantages: per group of G; "batch" scales by the std of the whole global batch, as TRL does
        all_rewards = torch.cat([b.rewards for b in batches])
        batch_std = global_std(dist, all_rewards) if cfg.scale_rewards == "batch" else None
        zero_std = []
        for b in batches:
            b.advantages, stats = group_advantages(
                b.rewards, g, "none" if batch_std is not None else cfg.scale_rewards
            )
            if batch_std is not None:
                b.advantages = b.advantages / (batch_std + 1e-4)
            zero_std.append(stats.frac_reward_zero_std)
        # vLLM's completions: the trainer's own log-probs (old log-probs) and the importance-sampling weights
        t_old = time.perf_counter()
        old_logps, sampling_weights, mismatch = _sampling_correction(
            engine, policy, batches, cfg, dist, blank
        )
        if backend is not None:
            seconds["old_logps"] = time.perf_counter() - t_old
        rollout_row = rollout_metrics(dist, batches, list(rewards), reward_errors, zero_std, g)
        rollout_row.update({f"time/{k}_s": v for k, v in seconds.items()})
        rollout_row.update(mismatch)
        if cfg.dynamic_sampling:
            rollout_row["dynamic_sampling/dropped_groups"] = all_sum(dist, dropped)
            rollout_row["dynamic_sampling/rounds"] = draws - first_draw

        # updates: num_iterations optimizer steps on the same completions
        n_tokens = all_sum(dist, sum(float(b.mask.sum()) for b in batches))
        t_step = t_round
        for step in range(rnd * cfg.num_iterations, min((rnd + 1) * cfg.num_iterations, total_steps)):
            t_update = time.perf_counter()
            lrs = {n: lr_at(step, total_steps, base_lrs[n], recipe.optim.schedule, warmup) for n in base_lrs}
            engine.set_lrs(lrs)
            sums: dict[str, float] = {}
            for b, old, sampling_weight in zip(batches, old_logps, sampling_weights, strict=True):
                with engine.autocast():
                    logps, entropy = engine.module(
                        prompt_ids=b.prompt_ids,
                        pixel_values=b.pixels,
                        images_per_prompt=b.images_per_prompt,
                        completion_ids=b.rollout.completion_ids,
                        completion_mask=b.rollout.completion_mask,  # attention; the loss masks with b.mask
                        num_generations=g,
                        temperature=cfg.temperature,
                        shared_prefix=cfg.shared_prefix,
                        blank_pixels=blank,
                    )
                loss, parts = grpo_loss(
                    logps,
                    old,
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
                    importance_sampling_level=cfg.importance_sampling_level,
                    sampling_weights=sampling_weight,
                )
                engine.backward(loss)
                grad_norm = engine.step()
                values = {
                    "loss": loss.detach(),
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
            now = time.perf_counter()
            row = {k: float(dist.all_reduce_mean(v)) for k, v in sums.items()}
            row.update(rollout_row)
            row.update(
                {
                    "lr": lrs.get("llm", next(iter(lrs.values()))),
                    "grad_norm": grad_norm,
                    "time/update_s": now - t_update,
                    "step_time_s": now - t_step,  # the round's first step also carries its rollout phase
                    "completion_tokens_per_s": rollout_row["completion_tokens"] / (now - t_round),
                }
            )
            t_step = now
            if (step + 1) % run.log_every == 0 or step + 1 == total_steps:
                metrics.log(step + 1, row)
                progress.update(step, row)
        done = step + 1
        if samples_file is not None:
            b = batches[0]
            for i in range(min(cfg.log_completions, len(b.texts))):
                s = b.samples[i // g]
                record = {
                    "step": done,
                    "origin": s.origin,
                    "gold": s.answer,
                    "completion": b.texts[i],
                    "rewards": dict(zip(rewards, b.scores[i], strict=True)),
                }
                samples_file.write(json.dumps(record) + "\n")
            samples_file.flush()

        crossed = run.save_every and done // run.save_every > rnd * cfg.num_iterations // run.save_every
        if crossed and rnd + 1 < total_rounds:
            step_dir = out / "checkpoints" / f"step-{done:07d}"
            _save_model(engine, model, processor, step_dir / "model", recipe.lora, recipe)
            engine.save_state(step_dir / "state", extra={"round": rnd + 1, "draws": draws})
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
            "stage": "grpo",
            "steps": total_steps,
            "resumed_from_round": start_round,
            "wall_time_s": wall,
            "peak_memory_mb": peak_memory_mb(),
            "world_size": dist.world_size,
            "strategy": strategy,
            "precision": precision,
            "memory_elements": memory,  # rank 0's policy, beside align plan's accounting
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        samples_file.close()
        print(f"done: {out / 'model'} | wall {wall:.1f}s | peak memory {summary['peak_memory_mb']:.0f} MB")
    metrics.close()
    if dist.is_main:
        print(f"plots: {len(plot_run(out))} PNG charts in {out / 'plots'}")
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
