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

from align.checkpoint import eos_token_ids, image_seq_len, resolve_model_folder
from align.config import MAX_TOKENS, RecipeError, ranged, to_dict
from align.data.check import checked_mix, stage_row_check
from align.data.config import DataConfig
from align.data.encode import encode_prompt, prompt_prefill, prompt_template_problem
from align.data.images import load_image
from align.engine import held_parameters
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
    fill_groups,
    global_std,
    has_signal,
    merge_groups,
    reference_logps,
    reward_columns,
    reward_names,
    rollout_metrics,
    skip_pooling_head,
    split_groups,
)
from align.grpo.sampler import SamplingSettings, SharedPrefixSampler, run_tower_on_text_only
from align.grpo.vllm_backend import PolicyWeightSync, open_backend
from align.lora import is_lora
from align.model import llava_of
from align.rewards import load_reward, score_all, warm_up, with_prefill
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
    load_model,
    load_trainable,
    resume_from_checkpoint,
    resume_point,
    run_stage,
    save_checkpoint,
    step_lrs,
    training_of,
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
    # a raw prompt for base models instead of the chat template (R1-Zero style), {question} = the user turn;
    # a template ending in <think> prefills it as R1's chat template does
    prompt_template: str | None = None
    rollout: RolloutSpec = field(default_factory=RolloutSpec)  # our sampler or vLLM

    def check(self) -> None:
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon:
            raise RecipeError.at(
                "epsilon_high",
                f"clips the ratio above at 1 + epsilon_high: must be >= epsilon ({self.epsilon:g}), "
                f"got {self.epsilon_high:g}",
            )
        problem = None if self.prompt_template is None else prompt_template_problem(self.prompt_template)
        if problem is not None:
            raise RecipeError.at("prompt_template", problem)
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


KEY_PREFIX = "model."  # what PolicyLogps adds in front of the model's parameter names


@dataclass(frozen=True)
class Schedule:
    """How the usable questions become rounds and optimizer steps on this launch."""

    questions_per_round: int  # micro_batch_size x grad_accum x ranks
    per_rank: int  # question groups each rank trains on per step
    rounds_per_epoch: int
    total_steps: int
    total_rounds: int  # the last round may stop before num_iterations
    warmup_steps: int


@dataclass
class GRPORun:
    """What the phases of a round share: built once by :func:`_set_up`; the rounds advance ``draws``."""

    recipe: GRPORecipe
    dist: Any
    training: Training
    model: nn.Module  # the policy (peft-wrapped with LoRA)
    policy: PolicyLogps  # the module the engine wraps
    processor: Any
    engine: Any
    reference: nn.Module | None  # the frozen copy; None with beta 0 or LoRA (adapters disabled instead)
    rewards: dict[str, Any]  # metric name -> reward function
    reward_weights: list[float]
    questions: list[tuple[Any, Any]]  # (sample, encoded prompt) whose prompt + completion fit max_length
    schedule: Schedule
    base_lrs: dict[str, float]
    prefill: str  # what the chat template writes after the assistant opening (R1: "<think>\n")
    sampling: SamplingSettings  # the recipe's sampling options and the end/pad tokens
    backend: Any  # None: our sampler; else the vLLM backend
    weight_sync: PolicyWeightSync | None
    metrics: MetricsWriter
    progress: Progress
    samples_file: Any  # completions.jsonl on rank 0
    memory: dict[str, int]
    data_seed: int
    draws: int = 0  # question draws so far (one per round; more with dynamic sampling)
    flat_rounds: int = 0  # rounds in a row in which no group's rewards varied
    order: dict[int, list[int]] = field(default_factory=dict)  # the current epoch's question order

    @property
    def cfg(self) -> GRPOSpec:
        return self.recipe.grpo

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer


@dataclass
class GroupPool:
    """Dynamic sampling's question groups of one step on this rank, by whether their G rewards vary."""

    varied: list[RolloutBatch] = field(default_factory=list)
    flat: list[RolloutBatch] = field(default_factory=list)


def train(recipe: GRPORecipe, dist, resume: bool, overwrite: bool = False) -> Path:
    """The whole stage on this process (``dist`` from ``init_distributed()``), holding its output_dir."""
    with hold_output_dir(recipe.output_dir, dist):
        s, start_round = _set_up(recipe, dist, resume, overwrite)
        t_start = time.perf_counter()
        try:
            with RunControl(recipe.run, dist) as control:
                for rnd in range(start_round, s.schedule.total_rounds):
                    _round(s, rnd, control)
        finally:
            s.metrics.close()
            if s.samples_file is not None:
                s.samples_file.close()
        summary = {
            "steps": s.schedule.total_steps,
            "resumed_from_round": start_round,
            "memory_elements": s.memory,
        }
        return finish(s.engine, s.model, s.processor, recipe, dist, s.training, t_start, summary, KEY_PREFIX)


def _round(s: GRPORun, rnd: int, control: RunControl) -> None:
    """One round, its phases in the order they run: rollouts of this step's questions, their rewards (with
    dynamic sampling, more draws until every rank has groups with signal), advantages, then ``num_iterations``
    optimizer steps on those completions, each logged."""
    cfg = s.cfg
    t_round = time.perf_counter()
    torch.manual_seed(s.recipe.run.seed * 1_000_003 + rnd)  # dropout depends on the round only: exact resume
    seconds = dict.fromkeys(("rollout", "reference", "rewards"), 0.0)
    if s.weight_sync is not None:  # vLLM generates with the weights of the last optimizer step
        seconds["weight_sync"] = s.weight_sync(s.engine, s.dist)
    errors = dict.fromkeys(s.rewards, 0)
    pool = GroupPool() if cfg.dynamic_sampling else None
    first_draw = s.draws
    for _ in range(cfg.dynamic_sampling_max_rounds if cfg.dynamic_sampling else 1):
        batches = _rollout(s, seconds)
        _score(s, batches, errors, seconds)
        if pool is None or _dynamic_sampling_round(s, batches, pool):
            break
    dropped = None
    if pool is not None:
        batches, dropped = _keep_groups(s, pool)
    zero_std = _advantages(s, batches)
    old_logps, is_weights, mismatch = _sampling_correction(s, batches, seconds)
    row = _rollout_row(s, batches, errors, zero_std, seconds, mismatch)
    if dropped is not None:
        row["dynamic_sampling/dropped_groups"] = s.dist.all_sum(dropped)
        row["dynamic_sampling/rounds"] = s.draws - first_draw
    _warn_if_nothing_to_learn(s, row)
    done = _update(s, batches, old_logps, is_weights, row, rnd, t_round)
    _log_completions(s, batches, done)
    run = s.recipe.run
    crossed = run.save_every and done // run.save_every > rnd * cfg.num_iterations // run.save_every
    save, stop = control.at_step_end(done, s.schedule.total_steps, bool(crossed))
    if save:
        state = {"round": rnd + 1, "draws": s.draws}
        folder = save_checkpoint(s.engine, s.model, s.processor, s.recipe, s.dist, done, state, KEY_PREFIX)
        if stop:
            raise control.stopped(done, s.schedule.total_steps, folder)


FLAT_ROUNDS_WARNING = 3  # rounds in a row whose groups all had equal rewards before the stage says so


def _warn_if_nothing_to_learn(s: GRPORun, row: dict[str, float]) -> None:
    """One warning when every group's rewards were equal for FLAT_ROUNDS_WARNING rounds in a row: all advantages
    are then 0 and the updates change nothing (a reward that cannot score these completions, or too few)."""
    s.flat_rounds = s.flat_rounds + 1 if row["frac_reward_zero_std"] >= 1.0 else 0
    if s.flat_rounds == FLAT_ROUNDS_WARNING:
        s.dist.log(
            f"warning: every group's {s.cfg.num_generations} rewards were equal for {FLAT_ROUNDS_WARNING} rounds in "
            f"a row (frac_reward_zero_std 1.0, reward {row['reward']:.3g}): all advantages are 0, nothing is "
            "learned; look at the rewards in completions.jsonl"
        )


# --- phases of a round ------------------------------------------------------------------------------------------


def _draw(s: GRPORun) -> tuple[list[list[tuple[Any, Any]]], torch.Generator]:
    """This rank's micro-batches of the next step's worth of questions in the data order, and the generator
    that samples them (seeded by the draw's number and the rank: exact resume)."""
    sch, run, dist = s.schedule, s.recipe.run, s.dist
    epoch, index = divmod(s.draws, sch.rounds_per_epoch)
    if epoch not in s.order:
        n = len(s.questions)
        s.order = {epoch: random.Random(f"grpo-order:{s.data_seed}:{epoch}").sample(range(n), n)}
    ids = s.order[epoch][index * sch.questions_per_round : (index + 1) * sch.questions_per_round]
    mine = [s.questions[i] for i in ids[dist.rank * sch.per_rank : (dist.rank + 1) * sch.per_rank]]
    generator = torch.Generator().manual_seed(run.seed * 1_000_003 + s.draws * 1009 + dist.rank)
    s.draws += 1
    return [
        mine[i : i + run.micro_batch_size] for i in range(0, sch.per_rank, run.micro_batch_size)
    ], generator


def _micro_batch(s: GRPORun, questions: list[tuple[Any, Any]]) -> tuple[RolloutBatch, list[Any]]:
    """One micro-batch of questions and its images, each decoded once (pixels for our forwards, the decoded
    images for vLLM)."""
    max_pixels = s.recipe.data.max_image_pixels
    images = [load_image(im, max_pixels, sample.origin) for sample, _ in questions for im in sample.images]
    processed = s.processor.image_processor(images=images, return_tensors="pt") if images else None
    sizes, at = [], 0  # per row: its images' sizes
    for sample, _ in questions:
        sizes.append([im.size for im in images[at : at + len(sample.images)]])
        at += len(sample.images)
    batch = RolloutBatch(
        [sample for sample, _ in questions],
        [enc.input_ids for _, enc in questions],
        None if processed is None else processed["pixel_values"],
        [len(sample.images) for sample, _ in questions],
        sizes,
    )
    return batch, images


def _rollout(s: GRPORun, seconds: dict[str, float]) -> list[RolloutBatch]:
    """G completions for each question of the next draw (one vision pass and prefill per micro-batch, shared by
    its G completions), and the reference's log-probs of them. The policy is gathered once for the phase."""
    cfg, t_draw = s.cfg, time.perf_counter()
    micro, generator = _draw(s)
    batches: list[RolloutBatch] = []
    s.policy.eval()
    # vLLM holds its own weights: the policy is gathered only for the LoRA reference pass
    gather = s.backend is None or (cfg.beta > 0 and s.reference is None)
    phase = s.engine.gathered_for_generation() if gather else contextlib.nullcontext(s.engine.model)
    with phase as gathered, s.engine.autocast():
        sampler = s.backend if s.backend is not None else SharedPrefixSampler(llava_of(gathered.model))
        for questions in micro:
            b, images = _micro_batch(s, questions)
            b.rollout = sampler.generate(
                b.prompt_ids,
                b.pixels,
                b.images_per_prompt,
                s.sampling,
                generator,
                None if s.backend is None else images,
            )
            batches.append(b)
        t_rollout = time.perf_counter()
        if cfg.beta > 0 and s.reference is None:  # LoRA: the policy's gathered weights, adapters off
            for b in batches:
                b.ref_logps = reference_logps(None, gathered.model, b, cfg.temperature, cfg.shared_prefix)
    s.policy.train()
    if s.reference is not None:  # the frozen copy: after the block, so the gathered policy is released first
        with s.engine.autocast():
            for b in batches:
                b.ref_logps = reference_logps(s.reference, s.model, b, cfg.temperature, cfg.shared_prefix)
    seconds["rollout"] += t_rollout - t_draw
    seconds["reference"] += time.perf_counter() - t_rollout
    return batches


def _score(
    s: GRPORun, batches: list[RolloutBatch], errors: dict[str, int], seconds: dict[str, float]
) -> None:
    """Every completion's rewards (the prefill put back in front: rewards see the full reasoning), their weighted
    sum, and the loss mask (with mask_truncated_completions, DAPO's overlong filtering)."""
    cfg, t0 = s.cfg, time.perf_counter()
    for b in batches:
        texts = s.tokenizer.batch_decode(b.rollout.completion_ids, skip_special_tokens=True)
        b.texts = with_prefill(texts, s.prefill) if s.prefill else texts
        columns = reward_columns(b.samples, b.sizes, cfg.num_generations, b.rollout)
        b.scores, failed = score_all(s.rewards, b.texts, columns, on_error=cfg.reward_errors)
        for name, n in failed.items():
            errors[name] += n
        b.per_func = torch.tensor([[float("nan") if v is None else v for v in row] for row in b.scores])
        b.rewards = combine_rewards(b.per_func, s.reward_weights)
        b.mask = b.rollout.completion_mask
        if cfg.mask_truncated_completions:
            b.mask = mask_truncated(b.mask, b.rollout.is_truncated)
    seconds["rewards"] += time.perf_counter() - t0


def _dynamic_sampling_round(s: GRPORun, batches: list[RolloutBatch], pool: GroupPool) -> bool:
    """DAPO: this draw's question groups sorted into those whose rewards vary and those that do not. True when
    every rank holds enough varied groups: one decision, on the shortfall summed over ranks, so all ranks draw
    the same number of times."""
    g = s.cfg.num_generations
    for b in batches:
        for piece, signal in zip(split_groups(b, g), has_signal(b.rewards, g).tolist(), strict=True):
            (pool.varied if signal else pool.flat).append(piece)
    return s.dist.all_sum(max(0, s.schedule.per_rank - len(pool.varied))) == 0


def _keep_groups(s: GRPORun, pool: GroupPool) -> tuple[list[RolloutBatch], int]:
    """The micro-batches the update trains on: groups with signal, filled with zero-variance ones only at the
    round limit; and how many zero-variance groups were left out."""
    chosen, dropped = fill_groups(pool.varied, pool.flat, s.schedule.per_rank)
    size = s.recipe.run.micro_batch_size
    pad = s.tokenizer.pad_token_id
    return [merge_groups(chosen[i : i + size], pad) for i in range(0, len(chosen), size)], dropped


def _advantages(s: GRPORun, batches: list[RolloutBatch]) -> list[float]:
    """Advantages per group of G; ``scale_rewards: batch`` divides by the std of the whole global batch instead
    (TRL's). Returns each micro-batch's share of groups whose rewards do not vary."""
    cfg = s.cfg
    batch_std = None
    if cfg.scale_rewards == "batch":
        batch_std = global_std(s.dist, torch.cat([b.rewards for b in batches]))
    zero_std = []
    for b in batches:
        scaling = "none" if batch_std is not None else cfg.scale_rewards
        b.advantages, stats = group_advantages(b.rewards, cfg.num_generations, scaling)
        if batch_std is not None:
            b.advantages = b.advantages / (batch_std + 1e-4)
        zero_std.append(stats.frac_reward_zero_std)
    return zero_std


def _forward_inputs(s: GRPORun, b: RolloutBatch) -> dict[str, Any]:
    """The training forward's inputs for one micro-batch: its completions scored at the sampling temperature
    (the loss masks with ``b.mask``; the forward attends by the completion mask)."""
    return {"batch": b.completions(), "temperature": s.cfg.temperature, "shared_prefix": s.cfg.shared_prefix}


def _sampling_correction(
    s: GRPORun, batches: list[RolloutBatch], seconds: dict[str, float]
) -> tuple[list, list, dict[str, float]]:
    """Per micro-batch: the old log-probs for the loss and the vLLM importance-sampling weights; the mismatch
    metrics under TRL's names (means over ranks, extremes over ranks).

    Our sampler: its own log-probs are the old ones (``num_iterations > 1``), no weights. vLLM: its log-probs are
    another engine's, so the trainer scores the completions once without gradients (TRL's
    ``old_per_token_logps``) when the correction is on or ``num_iterations > 1``; with one iteration the loss keeps
    the exact ratio-1 shortcut (the trainer's log-probs before the step are the current ones).
    """
    cfg, n, t0 = s.cfg, len(batches), time.perf_counter()
    rs = cfg.rollout
    if rs.backend == "align":
        return [b.rollout.logps if cfg.num_iterations > 1 else None for b in batches], [None] * n, {}
    if not rs.vllm_importance_sampling_correction and cfg.num_iterations == 1:
        seconds["old_logps"] = time.perf_counter() - t0
        return [None] * n, [None] * n, {}
    s.policy.eval()
    with torch.no_grad(), s.engine.autocast():  # every rank runs the same forwards (ZeRO-3 gathers in them)
        trainer = [s.engine.module(**_forward_inputs(s, b))[0].float() for b in batches]
    s.policy.train()
    seconds["old_logps"] = time.perf_counter() - t0
    old = trainer if cfg.num_iterations > 1 else [None] * n
    if not rs.vllm_importance_sampling_correction:
        return old, [None] * n, {}
    weights, stats = [], []
    for b, logps in zip(batches, trainer, strict=True):
        w, st = vllm_importance_sampling(
            logps,
            b.rollout.logps,
            b.mask,
            mode=rs.vllm_importance_sampling_mode,
            clip_min=rs.vllm_importance_sampling_clip_min,
            clip_max=rs.vllm_importance_sampling_clip_max,
        )
        weights.append(w)
        stats.append(st)
    return old, weights, _mismatch_row(s.dist, stats)


def _mismatch_row(dist, stats: list) -> dict[str, float]:
    """TRL's sampling mismatch metrics: means over micro-batches and ranks, extremes over both."""
    mean = lambda values: dist.all_reduce_mean(sum(values) / len(values))  # noqa: E731
    return {
        "sampling/sampling_logp_difference/mean": mean([st.logp_difference_mean for st in stats]),
        "sampling/sampling_logp_difference/max": dist.all_reduce_max(
            max(st.logp_difference_max for st in stats)
        ),
        "sampling/importance_sampling_ratio/min": -dist.all_reduce_max(-min(st.ratio_min for st in stats)),
        "sampling/importance_sampling_ratio/mean": mean([st.ratio_mean for st in stats]),
        "sampling/importance_sampling_ratio/max": dist.all_reduce_max(max(st.ratio_max for st in stats)),
    }


def _rollout_row(s, batches, errors, zero_std, seconds, mismatch) -> dict[str, float]:
    """The round's rollout metrics (rewards, zero-variance groups, lengths; all ranks), timings and mismatch."""
    row = rollout_metrics(s.dist, batches, list(s.rewards), errors, zero_std, s.cfg.num_generations)
    row.update({f"time/{k}_s": v for k, v in seconds.items()})
    row.update(mismatch)
    return row


def _update(s: GRPORun, batches, old_logps, is_weights, rollout_row, rnd: int, t_round: float) -> int:
    """``num_iterations`` optimizer steps on this round's completions (the last round may stop early), each one
    logged. Returns the number of optimizer steps done so far."""
    cfg, sch, dist = s.cfg, s.schedule, s.dist
    n_tokens = dist.all_sum(sum(float(b.mask.sum()) for b in batches))  # the loss's token count, all ranks
    t_step, first = t_round, rnd * cfg.num_iterations
    for step in range(first, min(first + cfg.num_iterations, sch.total_steps)):
        t_update = time.perf_counter()
        lrs = step_lrs(s.engine, step, sch.total_steps, s.base_lrs, s.recipe.optim, sch.warmup_steps)
        sums, grad_norm = _policy_step(s, batches, old_logps, is_weights, n_tokens)
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
        if (step + 1) % s.recipe.run.log_every == 0 or step + 1 == sch.total_steps:
            s.metrics.log(step + 1, row)
            s.progress.update(step, row)
    return step + 1


def _policy_step(s: GRPORun, batches, old_logps, is_weights, n_tokens: float) -> tuple[dict[str, float], Any]:
    """One optimizer step over this rank's micro-batches: training forward, GRPO's loss, backward. Returns the
    micro-batch means of the loss and its parts, and the gradient norm."""
    cfg, sums = s.cfg, {}
    for b, old, weight in zip(batches, old_logps, is_weights, strict=True):
        with s.engine.autocast():
            logps, entropy = s.engine.module(**_forward_inputs(s, b))
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
            num_processes=s.dist.world_size,
            accumulation_steps=s.recipe.run.grad_accum,
            importance_sampling_level=cfg.importance_sampling_level,
            sampling_weights=weight,
        )
        s.engine.backward(loss)
        grad_norm = s.engine.step()
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
    return sums, grad_norm


def _log_completions(s: GRPORun, batches: list[RolloutBatch], done: int) -> None:
    """The first ``log_completions`` completions of the step, with their rewards, to completions.jsonl."""
    if s.samples_file is None:
        return
    b, g = batches[0], s.cfg.num_generations
    for i in range(min(s.cfg.log_completions, len(b.texts))):
        sample = b.samples[i // g]
        record = {
            "step": done,
            "origin": sample.origin,
            "gold": sample.gold,
            "completion": b.texts[i],
            "rewards": dict(zip(s.rewards, b.scores[i], strict=True)),
        }
        s.samples_file.write(json.dumps(record) + "\n")
    s.samples_file.flush()


# --- set-up -----------------------------------------------------------------------------------------------------


def _set_up(recipe: GRPORecipe, dist, resume: bool, overwrite: bool) -> tuple[GRPORun, int]:
    """Everything before the first round, cheapest checks first: the resume point and the model folder, every
    row, the policy and reference, the questions, the engine, the checkpoint, the rollout backend, the logs."""
    run, cfg = recipe.run, recipe.grpo
    torch.manual_seed(run.seed)
    training = training_of(recipe, dist)
    resume_from = resume_point(recipe.output_dir, resume, overwrite)  # never replaces an earlier run silently
    model_dir = resolve_model_folder(recipe.model)  # a wrong folder fails in a second, not after the rows
    # every row checked (images decoded, boxes, a gold answer the rewards can score), data.strict applied
    data_seed = recipe.data.seed if recipe.data.seed is not None else run.seed
    row_check = stage_row_check("grpo", cfg.reward_funcs)
    samples, mix = checked_mix(recipe.data, data_seed, row_check, log=dist.log)
    model, processor = load_trainable(recipe, dist, training, model_dir)
    reference = None
    if cfg.beta > 0 and not is_lora(model):  # with LoRA the reference is the same model, adapters disabled
        reference, _ = load_model(model_dir, dist, training, run.deepspeed_config)
    for llava in (llava_of(model), reference) if reference is not None else (llava_of(model),):
        skip_pooling_head(llava)
        if dist.distributed:  # every rank runs the same modules, whatever its questions hold
            run_tower_on_text_only(llava)
    rewards = {
        name: load_reward(spec, cfg.reward_params_for(spec))
        for name, spec in zip(reward_names(cfg.reward_funcs), cfg.reward_funcs, strict=True)
    }
    weights = cfg.reward_weights or [1.0] * len(rewards)
    kind = "none (beta 0)" if cfg.beta == 0 else "adapters disabled" if is_lora(model) else "frozen copy"
    dist.log(
        f"rewards: {', '.join(f'{n} x{w}' for n, w in zip(rewards, weights, strict=True))}; reference model: {kind}"
    )
    dist.log(mix.table())
    questions, schedule = _questions(recipe, dist, samples, processor.tokenizer, llava_of(model), processor)
    policy = PolicyLogps(model)
    engine, memory = build_engine(policy, model, recipe, dist, training)
    if reference is not None:
        reference = engine.frozen(reference)  # zero3: partitioned like the policy, not a full copy per rank
        held, total = held_parameters(reference)
        dist.log(f"reference model: this rank holds {held:,} of its {total:,} parameters")
    base_lrs = engine.lrs()  # before load_state, which restores the schedule's current values
    saved = resume_from_checkpoint(engine, resume_from, recipe, resume, dist)
    start_round = saved.get("round", 0)
    begin_outputs(recipe, dist, resume_from is not None, start_round * cfg.num_iterations, overwrite)
    backend, weight_sync = _rollout_backend(recipe, dist, training, model_dir, policy, questions, resume_from)
    s = GRPORun(
        recipe, dist, training, model, policy, processor, engine, reference, rewards, weights, questions, schedule,
        base_lrs, prompt_prefill(processor.tokenizer, cfg.prompt_template),
        _sampling(cfg, processor.tokenizer, llava_of(model)),
        backend, weight_sync,
        MetricsWriter(Path(recipe.output_dir), dist.is_main, run.tensorboard, run.wandb_project, to_dict(recipe)),
        Progress(schedule.total_steps, start_round * cfg.num_iterations, dist.is_main),
        (Path(recipe.output_dir) / "completions.jsonl").open("a") if dist.is_main else None,
        memory, data_seed,
        draws=saved.get("draws", start_round),  # states written before dynamic sampling: a draw per round
    )  # fmt: skip
    return s, start_round


def _questions(recipe: GRPORecipe, dist, samples, tokenizer, llava, processor) -> tuple[list, Schedule]:
    """The encoded questions whose prompt + max_completion_length fit ``data.max_length`` (with ``overlong:
    error`` one that does not stops the run), and how they become rounds and steps."""
    cfg, run, data = recipe.grpo, recipe.run, recipe.data
    if "accuracy" in cfg.reward_funcs:
        warm_up()  # math_verify's grammar loads once here, not inside the first timed reward call
    n_image_tokens = image_seq_len(processor)
    prompts = []
    for sample in samples:
        enc = encode_prompt(
            sample, tokenizer, llava.config.image_token_id, n_image_tokens, cfg.prompt_template
        )
        if len(enc) + cfg.max_completion_length > data.max_length and data.overlong == "error":
            raise AlignError(
                f"{sample.origin}: prompt {len(enc)} + max_completion_length {cfg.max_completion_length} "
                f"tokens exceed max_length {data.max_length}"
            )
        prompts.append((sample, enc))
    kept = [p for p in prompts if len(p[1]) + cfg.max_completion_length <= data.max_length]
    per_rank = run.micro_batch_size * run.grad_accum
    questions_per_round = per_rank * dist.world_size
    if len(kept) < questions_per_round:
        raise AlignError(
            f"{len(kept)} usable questions (of {len(prompts)}; prompt + max_completion_length must fit "
            f"max_length {data.max_length}) for {questions_per_round} questions per step"
        )
    rounds_per_epoch = len(kept) // questions_per_round
    total_steps = run.epochs * rounds_per_epoch * cfg.num_iterations
    if run.max_steps:
        total_steps = min(total_steps, run.max_steps)
    total_rounds = -(-total_steps // cfg.num_iterations)
    warmup = int(recipe.optim.warmup_ratio * total_steps)
    dist.log(
        f"{len(kept)} questions ({len(prompts) - len(kept)} too long), {questions_per_round} per step x "
        f"{cfg.num_generations} completions, {total_rounds} rounds x {cfg.num_iterations} iterations -> "
        f"{total_steps} steps"
    )
    return kept, Schedule(questions_per_round, per_rank, rounds_per_epoch, total_steps, total_rounds, warmup)


def _sampling(cfg: GRPOSpec, tokenizer: Any, llava: nn.Module) -> SamplingSettings:
    """The recipe's sampling options; the sampler returns its log-probs when they serve as the old ones."""
    return SamplingSettings(
        num_generations=cfg.num_generations,
        max_new_tokens=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        eos_token_ids=eos_token_ids(tokenizer, llava.generation_config),
        pad_token_id=tokenizer.pad_token_id,
        return_logps=cfg.num_iterations > 1,
    )


def _rollout_backend(recipe, dist, training, model_dir, policy, questions, resume_from):
    """``(backend, weight sync)`` for ``grpo.rollout.backend: vllm``; ``(None, None)`` for our sampler."""
    rs = recipe.grpo.rollout
    if rs.backend != "vllm":
        return None, None
    llava = llava_of(policy.model)
    backend = open_backend(
        rs.vllm_mode,
        model_dir,
        image_token_id=llava.config.image_token_id,
        host=rs.vllm_server_host,
        port=rs.vllm_server_port,
        timeout=rs.vllm_server_timeout,
        gpu_memory_utilization=rs.vllm_gpu_memory_utilization,
        enable_sleep_mode=rs.vllm_enable_sleep_mode,
        max_model_len=rs.vllm_max_model_length,
        dtype="bfloat16" if training.precision == "bf16" else "float32",
        seed=recipe.run.seed + dist.rank,
        distributed=dist.distributed,
        max_images_per_prompt=max((len(sample.images) for sample, _ in questions), default=1),
    )
    dist.log(
        f"rollouts: vLLM {rs.vllm_mode} {'in this process' if rs.vllm_mode == 'colocate' else f'at {backend.base}'}"
    )
    lora = recipe.lora
    sync = PolicyWeightSync(
        backend,
        policy.named_parameters(),
        lora.alpha / lora.r if is_lora(policy.model) else None,
        sends=rs.vllm_mode == "colocate" or dist.is_main,  # server mode: rank 0 sends, all gather
        # a colocated engine starts from model_dir, which a fresh run trains from; a server may serve anything
        synced_at=0 if rs.vllm_mode == "colocate" and resume_from is None else None,
        strip=KEY_PREFIX,
    )
    return backend, sync


add_arguments = add_stage_arguments


def run(args) -> int:
    return run_stage(args, "grpo", train)
