"""GRPO advantages and loss as pure functions on tensors, with TRL's option names and math.

This module owns the arithmetic of one GRPO step and nothing else (no models, generation, devices or ranks):

* :func:`combine_rewards`: weighted sum over reward functions (``reward_weights``), ``None``/NaN skipped;
* :func:`group_advantages`: group-relative advantages (``num_generations``, ``scale_rewards``) and the
  statistics that explain a zero loss (:class:`AdvantageStats`);
* :func:`mask_truncated`: ``mask_truncated_completions``;
* :func:`grpo_loss`: clipped surrogate + k3 KL (``beta``, ``epsilon``, ``epsilon_high``, ``delta``,
  ``loss_type``, ``importance_sampling_level``), returning the loss and its parts (:class:`LossParts`);
* :func:`vllm_importance_sampling`: the truncated (or masking) importance-sampling correction for rollouts a
  different engine sampled (vLLM), TRL's ``vllm_importance_sampling_correction`` / ``_mode`` / ``_clip_min`` /
  ``_clip_max``, with the mismatch metrics TRL logs (:class:`SamplingMismatch`).

Every option means what it means in TRL 1.16's ``GRPOTrainer`` with
``multi_objective_aggregation="sum_then_normalize"``, ``use_bias_correction_kl=False``,
``top_entropy_quantile=1.0`` and no entropy bonus. ``old_logps=None`` is TRL's
``num_iterations=1`` shortcut.

Gradient accumulation: :func:`grpo_loss` returns the loss of ONE micro-batch *before* dividing by the number
of accumulation steps, for every ``loss_type`` alike; the caller (the engine, or DeepSpeed's ``backward``)
divides by ``accumulation_steps`` and DDP averages over ranks. TRL divides inside its loss instead, so
``grpo_loss(...) == TRL loss * accumulation_steps``; the tests check exactly that.

Run the parity tests against TRL: ``.venv/bin/pytest -q tests/test_grpo_loss.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from align.errors import AlignError

ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ImportanceSamplingLevel = Literal["token", "sequence"]
VLLMImportanceSamplingMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
SCALE_REWARDS: tuple[str, ...] = get_args(ScaleRewards)
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = get_args(ImportanceSamplingLevel)
VLLM_IMPORTANCE_SAMPLING_MODES: tuple[str, ...] = get_args(VLLMImportanceSamplingMode)

# TRL adds this to the std so that a zero-variance group divides 0 by 1e-4 rather than by 0.
STD_EPS = 1e-4


def combine_rewards(
    per_func: Tensor | Sequence[Sequence[float | None]], weights: Sequence[float] | Tensor | None = None
) -> Tensor:
    """Weighted sum over reward functions: ``r_i = nansum_f w_f * R[i, f]``.

    ``per_func`` is ``[N completions, F functions]``; ``None`` (a function that abstains on that completion)
    and NaN are skipped by the sum. A completion on which *every* function abstained gets NaN, not 0, so that
    :func:`group_advantages` leaves it out of its group's baseline and gives it advantage 0 (as TRL does).
    ``weights=None`` weighs every function 1.
    """
    values = (
        per_func
        if isinstance(per_func, Tensor)
        else torch.tensor(
            [[float("nan") if v is None else float(v) for v in row] for row in per_func], dtype=torch.float32
        )
    )
    if values.dim() != 2:
        raise ValueError(
            f"per-function rewards must be [completions, functions], got shape {tuple(values.shape)}"
        )
    n_funcs = values.shape[1]
    w = (
        torch.ones(n_funcs, dtype=values.dtype)
        if weights is None
        else torch.as_tensor(weights, dtype=values.dtype).flatten()
    )
    if w.numel() != n_funcs:
        raise AlignError(f"reward_weights has {w.numel()} values but there are {n_funcs} reward functions")
    rewards = (values * w.to(values.device)).nansum(dim=1)
    rewards[values.isnan().all(dim=1)] = float("nan")
    return rewards


def _nanstd(x: Tensor, dim: int) -> Tensor:
    """Sample std (Bessel-corrected) ignoring NaNs; NaN where fewer than 2 values remain."""
    count = (~x.isnan()).sum(dim)
    centred = x - x.nanmean(dim, keepdim=True)
    var = (centred**2).nansum(dim) / (count - 1).clamp(min=1)
    return torch.where(count > 1, var.sqrt(), torch.full_like(var, float("nan")))


@dataclass(frozen=True)
class AdvantageStats:
    """What a generation batch's rewards looked like (TRL's metric names where the meaning is the same).

    ``frac_reward_zero_std`` is the fraction of groups whose completions all got the same reward: those
    completions have advantage 0 and contribute nothing to the policy gradient, so a value near 1 explains a
    loss stuck near 0. TRL logs the same number for ``scale_rewards`` "group"/"none"; for "batch" TRL instead
    reports whether the whole batch has zero std, which does not say how many advantages are 0.
    """

    reward_mean: float  # nanmean of the combined rewards
    reward_std: float  # nanstd of the combined rewards over the whole batch
    frac_reward_zero_std: float
    num_unscorable: int  # completions every reward function abstained on: advantage forced to 0


def group_advantages(
    rewards: Tensor, num_generations: int, scale_rewards: ScaleRewards = "group"
) -> tuple[Tensor, AdvantageStats]:
    """Group-relative advantages, TRL's ``sum_then_normalize`` path.

    ``rewards`` is ``[N]``, combined over functions (:func:`combine_rewards`), ordered so that each run of
    ``num_generations`` consecutive rows holds the completions of one prompt. It must hold whole groups, i.e.
    be gathered across ranks before calling (needed anyway for "batch").

    * ``"group"``: ``A_i = (r_i - mean_g) / (std_g + 1e-4)``
    * ``"batch"``: ``A_i = (r_i - mean_g) / (std_batch + 1e-4)``
    * ``"none"``:  ``A_i = r_i - mean_g``

    Means and (Bessel-corrected) stds ignore NaN rewards (unscorable completions); any NaN advantage becomes 0.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [completions], got shape {tuple(rewards.shape)}")
    n = rewards.numel()
    if num_generations < 1 or n % num_generations:
        raise ValueError(
            f"{n} rewards do not split into groups of num_generations={num_generations}: "
            "pass whole groups (gathered across ranks)"
        )
    grouped = rewards.view(-1, num_generations)
    group_mean = grouped.nanmean(dim=1)
    group_std = _nanstd(grouped, dim=1) if num_generations > 1 else torch.zeros_like(group_mean)
    batch_std = _nanstd(rewards, dim=0) if n > 1 else torch.zeros((), dtype=rewards.dtype)

    advantages = rewards - group_mean.repeat_interleave(num_generations)
    if scale_rewards == "group":
        advantages = advantages / (group_std.repeat_interleave(num_generations) + STD_EPS)
    elif scale_rewards == "batch":
        advantages = advantages / (batch_std + STD_EPS)
    advantages = torch.nan_to_num(advantages, nan=0.0)

    stats = AdvantageStats(
        reward_mean=rewards.nanmean().item(),
        reward_std=batch_std.item(),
        frac_reward_zero_std=torch.isclose(group_std, torch.zeros_like(group_std)).float().mean().item(),
        num_unscorable=int(rewards.isnan().sum().item()),
    )
    return advantages, stats


def mask_truncated(completion_mask: Tensor, is_truncated: Tensor) -> Tensor:
    """``mask_truncated_completions``: zero the whole row of every truncated completion.

    ``completion_mask`` is ``[B, T]``; ``is_truncated`` is ``[B]`` (bool), True where generation stopped at
    ``max_completion_length`` without EOS. The result keeps ``completion_mask``'s dtype.
    """
    if is_truncated.shape != completion_mask.shape[:1]:
        raise ValueError(
            f"is_truncated has shape {tuple(is_truncated.shape)}, "
            f"expected [{completion_mask.shape[0]}] for completion_mask {tuple(completion_mask.shape)}"
        )
    keep = (~is_truncated.bool()).unsqueeze(1).to(completion_mask.dtype)
    return completion_mask * keep


@dataclass(frozen=True)
class LossParts:
    """The pieces of one micro-batch's :func:`grpo_loss`, all detached 0-d tensors.

    ``policy + kl_penalty == loss``. With ``old_logps=None`` (``num_iterations=1``) every ratio is 1, so
    ``policy`` is minus the aggregated advantage, which is near 0 because advantages are centred per group; its
    gradient is not 0. ``kl`` is None when ``beta == 0`` (no reference model). The means are over this
    micro-batch's completion tokens; ``num_tokens`` lets a caller weight them when averaging across ranks.
    """

    policy: Tensor  # clipped-surrogate part of the loss, aggregated like the loss
    kl_penalty: Tensor  # beta * aggregated k3 KL (0 when beta == 0)
    kl: Tensor | None  # mean per-token k3 estimate of KL(pi || pi_ref)  (TRL "kl")
    # The ratio and clip statistics are over completion tokens, or with importance_sampling_level "sequence"
    # over completions (every row of the micro-batch, one ratio each), as TRL's global_masked_mean counts them.
    ratio_mean: Tensor  # mean of pi / pi_old
    clip_ratio_low: Tensor  # fraction with ratio < 1 - epsilon and A < 0  (TRL clip_ratio/low_mean)
    clip_ratio_high: Tensor  # ratio > 1 + epsilon_high and A > 0  (TRL clip_ratio/high_mean)
    clip_ratio_region: Tensor  # either of the two  (TRL clip_ratio/region_mean)
    num_tokens: Tensor  # completion tokens in this micro-batch (sum of the mask)


def _aggregator(
    loss_type: str,
    mask: Tensor,
    max_completion_length: int,
    num_items_in_batch: int | float | Tensor | None,
    num_processes: int,
    accumulation_steps: int,
) -> Callable[[Tensor], Tensor]:
    """The per-token -> scalar reduction of ``loss_type`` (formulas in :func:`grpo_loss`)."""
    if loss_type == "grpo":
        return lambda x: ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return lambda x: (x * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return lambda x: (x * mask).sum() / (mask.shape[0] * max_completion_length)
    if num_items_in_batch is None:
        raise ValueError(
            "loss_type='dapo' normalises by the completion tokens of the whole optimizer step: "
            "pass num_items_in_batch (summed over ranks and accumulation micro-batches)"
        )
    total = torch.as_tensor(num_items_in_batch, dtype=mask.dtype, device=mask.device).clamp(min=1.0)
    # Average tokens per micro-batch per rank: after the caller's 1/accumulation_steps and DDP's 1/num_processes,
    # the step's gradient is that of sum(all tokens) / total.
    per_microbatch = total / (num_processes * accumulation_steps)
    return lambda x: (x * mask).sum() / per_microbatch


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _level_mean(x: Tensor, mask: Tensor) -> Tensor:
    """TRL's ``global_masked_mean`` on one rank: a ``[B, 1]`` value (one per sequence) is averaged over all B
    rows, masked ones included; a ``[B, T]`` value over the completion tokens."""
    return x.mean() if x.shape[-1] == 1 else _masked_mean(x, mask)


def _check_inputs(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    beta: float,
    loss_type: str,
    importance_sampling_level: str,
) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
            f"got {importance_sampling_level!r}"
        )
    if (ref_logps is None) != (beta == 0.0):
        raise ValueError(
            f"ref_logps must be given exactly when beta != 0 (beta={beta}, "
            f"ref_logps {'missing' if ref_logps is None else 'given'})"
        )
    shape = tuple(completion_mask.shape)
    for name, t in (("logps", logps), ("old_logps", old_logps), ("ref_logps", ref_logps)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, completion_mask has {shape}")
    if tuple(advantages.shape) not in ((shape[0],), shape):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected [{shape[0]}] or {shape}")


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    beta: float,
    epsilon: float,
    epsilon_high: float | None,
    loss_type: LossType,
    max_completion_length: int,
    num_items_in_batch: int | float | Tensor | None = None,
    num_processes: int = 1,
    accumulation_steps: int = 1,
    delta: float | None = None,
    importance_sampling_level: ImportanceSamplingLevel = "token",
    sampling_weights: Tensor | None = None,
) -> tuple[Tensor, LossParts]:
    """GRPO loss of one micro-batch (before the caller's division by ``accumulation_steps``).

    Inputs are ``[B, T]`` per-token log-probs of the completion tokens under the policy being trained
    (``logps``, with grad), the policy that sampled them (``old_logps``; None when ``num_iterations=1``, where
    it equals ``logps.detach()``) and the reference model (``ref_logps``; None iff ``beta == 0``);
    ``advantages`` is ``[B]``; ``completion_mask`` is ``[B, T]`` (0 on padding and masked completions).
    ``epsilon_high=None`` means ``epsilon``. ``delta`` (INTELLECT-2 two-sided clipping) caps the unclipped
    ratio too. Per token, with ``r = exp(logps - old_logps)`` and ``d = ref_logps - logps``::

        l_it = -min(r_it A_i, clip(r_it, 1 - epsilon, 1 + epsilon_high) A_i) + beta (exp(d_it) - d_it - 1)

    ``importance_sampling_level="sequence"`` (GSPO) replaces ``r_it`` by one ratio per completion,
    ``s_i = exp(sum_t m_it (logps_it - old_logps_it) / max(1, sum_t m_it))``, broadcast over its tokens and
    clipped (and capped by ``delta``) the same way; the KL term stays per token, as in TRL.

    ``sampling_weights`` (``[B, T]`` or ``[B, 1]``, no grad): :func:`vllm_importance_sampling`'s weights; they
    multiply the clipped-surrogate term of every token (not the KL term), as TRL applies its
    ``importance_sampling_ratio``.

    then, with ``m`` the mask and ``B`` the micro-batch size, ``loss_type`` aggregates:

    * ``grpo``:    ``L = 1/B sum_i [ sum_t m_it l_it / max(1, sum_t m_it) ]``  (per-sequence mean, then mean)
    * ``bnpo``:    ``L = sum_it m_it l_it / max(1, sum_it m_it)``  (token mean of this micro-batch)
    * ``dr_grpo``: ``L = sum_it m_it l_it / (B * max_completion_length)``
    * ``dapo``:    ``L = sum_it m_it l_it / (max(1, num_items_in_batch) / (num_processes * accumulation_steps))``

    For ``dapo``, ``num_items_in_batch`` is the number of completion tokens (mask sum) in the whole optimizer
    step: summed over all ranks and all accumulation micro-batches, so that once the caller divides by
    ``accumulation_steps`` and DDP averages ranks the step is a global token mean. (TRL counts tokens over a
    generation batch and rescales by ``gradient_accumulation_steps / steps_per_generation``; with one
    generation batch per optimizer step, TRL's default, both are the same count.)
    """
    _check_inputs(
        logps, old_logps, ref_logps, advantages, completion_mask, beta, loss_type, importance_sampling_level
    )
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.to(logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    aggregate = _aggregator(
        loss_type, mask, max_completion_length, num_items_in_batch, num_processes, accumulation_steps
    )

    # With one iteration the sampling policy is the current one: the ratio is exactly 1 but still carries
    # grad log pi, which is the whole policy gradient.
    log_ratio = logps - (logps.detach() if old_logps is None else old_logps)
    if importance_sampling_level == "sequence":  # [B, 1]: the broadcasts below apply it to every token
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    unclipped = ratio if delta is None else ratio.clamp(max=delta)
    clipped = ratio.clamp(1 - epsilon, 1 + eps_high)
    surrogate = -torch.min(unclipped * adv, clipped * adv)
    if sampling_weights is not None:
        surrogate = surrogate * sampling_weights
    policy = aggregate(surrogate)

    if ref_logps is None:
        kl = None
        kl_penalty = torch.zeros((), dtype=policy.dtype, device=policy.device)
    else:
        d = ref_logps - logps
        per_token_kl = torch.exp(d) - d - 1
        kl = _masked_mean(per_token_kl, mask).detach()
        kl_penalty = beta * aggregate(per_token_kl)
    loss = policy + kl_penalty

    with torch.no_grad():
        # TRL measures clipping on the delta-capped ratio; identical whenever delta > 1 + epsilon_high.
        low = ((unclipped < 1 - epsilon) & (adv < 0)).to(mask.dtype)
        high = ((unclipped > 1 + eps_high) & (adv > 0)).to(mask.dtype)
        parts = LossParts(
            policy=policy.detach(),
            kl_penalty=kl_penalty.detach(),
            kl=kl,
            ratio_mean=_level_mean(ratio, mask),
            clip_ratio_low=_level_mean(low, mask),
            clip_ratio_high=_level_mean(high, mask),
            clip_ratio_region=_level_mean(torch.maximum(low, high), mask),
            num_tokens=mask.sum(),
        )
    return loss, parts


@dataclass(frozen=True)
class SamplingMismatch:
    """How far the sampling engine's log-probs are from the trainer's, as TRL logs them (floats).

    ``logp_difference_*`` is ``|trainer - sampler|`` over the completion tokens; the ratio statistics are over
    the completion tokens (token modes) or the completions (sequence modes), after truncation or masking.
    """

    logp_difference_mean: float  # TRL sampling/sampling_logp_difference/mean
    logp_difference_max: float  # sampling/sampling_logp_difference/max
    ratio_min: float  # sampling/importance_sampling_ratio/min
    ratio_mean: float  # sampling/importance_sampling_ratio/mean
    ratio_max: float  # sampling/importance_sampling_ratio/max


def vllm_importance_sampling(
    trainer_logps: Tensor,
    sampling_logps: Tensor,
    completion_mask: Tensor,
    *,
    mode: VLLMImportanceSamplingMode,
    clip_min: float | None,
    clip_max: float | None,
) -> tuple[Tensor, SamplingMismatch]:
    """TRL's vLLM importance-sampling correction: weights ``pi_trainer / pi_sampler`` for :func:`grpo_loss`.

    The completions were drawn by another engine (vLLM), whose log-probs ``sampling_logps`` differ from the
    trainer's ``trainer_logps`` of the same weights (other kernels, bf16 rounding): the policy-gradient terms are
    reweighted by ``rho`` so that the update is the trainer policy's. With ``d_it = m_it (trainer - sampler)``
    (NaN sampler log-probs give ``d = 0``)::

        token_*:     rho_it = exp(d_it)                  [B, T]
        sequence_*:  rho_i  = exp(sum_t d_it)            [B, 1]
        *_truncate:  rho <- clamp(rho, clip_min, clip_max)       (a None bound is open)
        *_mask:      rho <- 0 where rho < clip_min or rho > clip_max

    Everything is detached (TRL computes it under no_grad). TRL's defaults: ``sequence_mask``, ``clip_max 3``,
    ``clip_min None``. Inputs are ``[B, T]``; the mask is 0 on padding.
    """
    if mode not in VLLM_IMPORTANCE_SAMPLING_MODES:
        raise ValueError(f"mode must be one of {VLLM_IMPORTANCE_SAMPLING_MODES}, got {mode!r}")
    if mode.endswith("_truncate") and clip_min is None and clip_max is None:
        raise ValueError(f"mode {mode!r} needs clip_min or clip_max (both are None)")
    shape = tuple(completion_mask.shape)
    for name, t in (("trainer_logps", trainer_logps), ("sampling_logps", sampling_logps)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, completion_mask has {shape}")
    with torch.no_grad():
        mask = completion_mask.bool()
        diff = torch.nan_to_num((trainer_logps.float() - sampling_logps.float()) * mask, nan=0.0)
        sequence = mode.startswith("sequence")
        ratio = torch.exp(diff.sum(-1, keepdim=True) if sequence else diff)
        low = -math.inf if clip_min is None else clip_min
        high = math.inf if clip_max is None else clip_max
        if mode.endswith("_truncate"):
            ratio = ratio.clamp(min=clip_min, max=clip_max)
        else:
            ratio = ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
        delta = (trainer_logps.float() - sampling_logps.float()).abs()
        delta = delta[mask & ~delta.isnan()]
        flat = ratio.flatten() if sequence else ratio[mask]

        def stat(x: Tensor, reduce) -> float:
            return float(reduce(x)) if x.numel() else 0.0

        stats = SamplingMismatch(
            logp_difference_mean=stat(delta, torch.mean),
            logp_difference_max=stat(delta, torch.max),
            ratio_min=stat(flat, torch.min),
            ratio_mean=stat(flat, torch.mean),
            ratio_max=stat(flat, torch.max),
        )
    return ratio, stats
