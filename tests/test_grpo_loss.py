"""GRPO advantages and loss: parity with TRL 1.16's own code, plus tables for the edge cases.

The loss parity calls ``GRPOTrainer._compute_loss`` unbound on a ``SimpleNamespace`` that holds only the
attributes it reads (a missing one raises AttributeError, so the list below is exactly what TRL needs), with
``_get_per_token_logps_and_entropies`` replaced by a function returning our per-token log-probs.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import nanstd as trl_nanstd

from align.errors import AlignError
from align.grpo.loss import (
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_TYPES,
    SCALE_REWARDS,
    STD_EPS,
    combine_rewards,
    group_advantages,
    grpo_loss,
    mask_truncated,
)

NAN = float("nan")
G = 4
LENGTHS = [7, 3, 1, 5, 7, 2, 0, 6, 4, 4, 7, 1]  # row 6 is a truncated completion, fully masked
T = max(LENGTHS)
B = len(LENGTHS)
HIDDEN, VOCAB = 5, 11
EPSILON, EPSILON_HIGH = 0.2, 0.28
# group 0 and 1 vary, group 2 has zero std (advantages 0)
REWARDS = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.2, 0.9, 0.9, 0.0, 1.0, 1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def batch() -> SimpleNamespace:
    """A fixed batch: a linear 'policy' W whose log-probs carry gradients, and perturbed old/ref log-probs."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(B, T, HIDDEN, generator=gen)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    weight = torch.randn(HIDDEN, VOCAB, generator=gen)
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()

    def logps_of(w: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(features @ w, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    base = logps_of(weight).detach()
    old = base + 0.4 * torch.randn(B, T, generator=gen)
    ref = base + 0.3 * torch.randn(B, T, generator=gen)
    return SimpleNamespace(weight=weight, logps_of=logps_of, mask=mask, ids=ids, old=old, ref=ref)


class _Accelerator:
    """What ``_compute_loss`` uses of accelerate: the rank count and (single-process) gather/reduce."""

    def __init__(self, num_processes: int):
        self.num_processes = num_processes

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def reduce(self, x: torch.Tensor, reduction: str) -> torch.Tensor:
        return x


def trl_compute_loss(
    logps, inputs, *, beta, loss_type, accumulation_steps, num_processes, delta=None, level="token"
):
    """TRL's loss and logged metrics; every attribute ``_compute_loss`` reads is set here and nowhere else."""
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=EPSILON,
        epsilon_high=EPSILON_HIGH,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accumulation_steps,
        max_completion_length=T,
        accelerator=_Accelerator(num_processes),
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(
            use_bias_correction_kl=False, delta=delta, steps_per_generation=accumulation_steps
        ),
    )
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, trainer._metrics["train"]


def _trl_inputs(batch, advantages, old, ref, num_items):
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": batch.ids,
        "completion_mask": batch.mask,
        "advantages": advantages,
        "num_items_in_batch": torch.tensor(num_items),
    }
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return inputs


# (accumulation_steps, num_processes): one micro-batch on one rank, and an accumulated multi-rank step in which
# the other micro-batches/ranks hold 5 more tokens than copies of this one would.
STEPS = [(1, 1), (2, 3)]
CASES = list(itertools.product(LOSS_TYPES, SCALE_REWARDS, [0.0, 0.04], [False, True], STEPS, [None]))
CASES += [
    (lt, "group", 0.04, True, (1, 1), 1.3) for lt in LOSS_TYPES
]  # two-sided clipping (delta > 1 + EPSILON_HIGH)


# GSPO (importance_sampling_level "sequence") under every loss_type TRL runs it with
SEQUENCE_CASES = list(itertools.product(LOSS_TYPES, ["group"], [0.0, 0.04], [False, True], STEPS, [None]))
SEQUENCE_CASES += [(lt, "none", 0.04, True, (1, 1), 1.3) for lt in LOSS_TYPES]
ALL_CASES = [(*c, "token") for c in CASES] + [(*c, "sequence") for c in SEQUENCE_CASES]


@pytest.mark.parametrize(("loss_type", "scale", "beta", "with_old", "steps", "delta", "level"), ALL_CASES)
def test_loss_and_gradients_match_trl(batch, loss_type, scale, beta, with_old, steps, delta, level):
    accumulation_steps, num_processes = steps
    advantages, _ = group_advantages(REWARDS, G, scale)
    old = batch.old if with_old else None
    ref = batch.ref if beta else None
    local_tokens = int(batch.mask.sum())
    num_items = local_tokens if steps == (1, 1) else local_tokens * accumulation_steps * num_processes + 5

    w_ours = batch.weight.clone().requires_grad_(True)
    ours, parts = grpo_loss(
        batch.logps_of(w_ours), old, ref, advantages, batch.mask,
        beta=beta, epsilon=EPSILON, epsilon_high=EPSILON_HIGH, loss_type=loss_type,
        max_completion_length=T, num_items_in_batch=num_items, num_processes=num_processes,
        accumulation_steps=accumulation_steps, delta=delta, importance_sampling_level=level,
    )  # fmt: skip
    (grad_ours,) = torch.autograd.grad(ours, w_ours)

    w_trl = batch.weight.clone().requires_grad_(True)
    theirs, metrics = trl_compute_loss(
        batch.logps_of(w_trl), _trl_inputs(batch, advantages, old, ref, num_items),
        beta=beta, loss_type=loss_type, accumulation_steps=accumulation_steps,
        num_processes=num_processes, delta=delta, level=level,
    )  # fmt: skip
    (grad_trl,) = torch.autograd.grad(theirs, w_trl)

    # TRL divides by accumulation steps inside its loss; ours leaves that to the caller.
    assert abs(ours.item() - theirs.item() * accumulation_steps) < 1e-5
    assert (grad_ours - grad_trl * accumulation_steps).abs().max().item() < 1e-5
    assert grad_ours.abs().max().item() > 1e-3  # the comparison is not between two zeros
    assert abs((parts.policy + parts.kl_penalty).item() - ours.item()) < 1e-6
    if beta:
        assert abs(parts.kl.item() - metrics["kl"][0]) < 1e-6
    else:
        assert parts.kl is None and parts.kl_penalty.item() == 0.0
    for ours_ratio, trl_name in [
        (parts.clip_ratio_low, "clip_ratio/low_mean"),
        (parts.clip_ratio_high, "clip_ratio/high_mean"),
        (parts.clip_ratio_region, "clip_ratio/region_mean"),
    ]:
        assert abs(ours_ratio.item() - metrics[trl_name][0]) < 1e-6


def test_parity_batch_exercises_clipping_and_delta(batch):
    """The parity cases are only meaningful if both clip sides and the delta cap actually fire."""
    advantages, _ = group_advantages(REWARDS, G, "group")
    kwargs = dict(
        beta=0.0, epsilon=EPSILON, epsilon_high=EPSILON_HIGH, loss_type="bnpo", max_completion_length=T
    )
    logps = batch.logps_of(batch.weight)
    _, parts = grpo_loss(logps, batch.old, None, advantages, batch.mask, **kwargs)
    assert parts.clip_ratio_low.item() > 0.05 and parts.clip_ratio_high.item() > 0.05
    ratio = torch.exp(logps - batch.old)
    assert ((ratio > 1.3) & (advantages[:, None] < 0) & batch.mask.bool()).any()
    capped, _ = grpo_loss(logps, batch.old, None, advantages, batch.mask, delta=1.3, **kwargs)
    uncapped, _ = grpo_loss(logps, batch.old, None, advantages, batch.mask, **kwargs)
    assert abs(capped.item() - uncapped.item()) > 1e-3


def test_sequence_level_ratio_is_one_per_completion_and_clips(batch):
    """GSPO: one ratio per completion, exp of its mean token log-ratio; the parity batch clips completions on
    both sides, so the sequence-level parity cases are not between two unclipped losses."""
    advantages, _ = group_advantages(REWARDS, G, "group")
    logps = batch.logps_of(batch.weight)
    kwargs = dict(
        beta=0.0, epsilon=EPSILON, epsilon_high=EPSILON_HIGH, loss_type="grpo", max_completion_length=T
    )
    _, parts = grpo_loss(
        logps, batch.old, None, advantages, batch.mask, importance_sampling_level="sequence", **kwargs
    )
    m = batch.mask.float()
    per_completion = torch.exp(((logps - batch.old) * m).sum(-1) / m.sum(-1).clamp(min=1.0))
    assert parts.ratio_mean.item() == pytest.approx(per_completion.mean().item(), abs=1e-6)
    low = ((per_completion < 1 - EPSILON) & (advantages < 0)).float().mean().item()
    high = ((per_completion > 1 + EPSILON_HIGH) & (advantages > 0)).float().mean().item()
    assert (parts.clip_ratio_low.item(), parts.clip_ratio_high.item()) == pytest.approx((low, high), abs=1e-6)
    assert low > 0 and high > 0
    _, token_parts = grpo_loss(logps, batch.old, None, advantages, batch.mask, **kwargs)
    assert abs(token_parts.ratio_mean.item() - parts.ratio_mean.item()) > 1e-3, "the two levels differ"


def test_one_iteration_sequence_level_has_grpos_gradient(batch):
    """With old_logps=None every ratio is 1 at both levels, and with loss_type grpo the gradients coincide:
    d/dθ exp(mean_t (l_t - sg l_t)) = mean_t dl_t, which is what the per-token mean of grpo gives."""
    advantages, _ = group_advantages(REWARDS, G, "group")
    grads = {}
    for level in IMPORTANCE_SAMPLING_LEVELS:
        weight = batch.weight.clone().requires_grad_(True)
        loss, _ = grpo_loss(
            batch.logps_of(weight), None, None, advantages, batch.mask, beta=0.0, epsilon=EPSILON,
            epsilon_high=EPSILON_HIGH, loss_type="grpo", max_completion_length=T, importance_sampling_level=level,
        )  # fmt: skip
        (grads[level],) = torch.autograd.grad(loss, weight)
    assert grads["token"].abs().max().item() > 1e-3
    assert torch.allclose(grads["token"], grads["sequence"], atol=1e-6)


def _trl_reference_advantages(per_func, weights, num_generations, scale):
    """TRL 1.16 grpo_trainer.py ``_generate_and_score_completions``, ``sum_then_normalize`` branch
    (lines 2757-2812): nansum over weighted functions, all-NaN rows -> NaN, group nanmean, nanstd per group
    ("group"/"none") or over the batch ("batch"), divide by std + 1e-4 unless "none", NaN -> 0. That block is
    inline in the method, so it is restated here around TRL's own ``nanstd``."""
    rewards = (per_func * torch.tensor(weights).unsqueeze(0)).nansum(dim=1)
    rewards[torch.isnan(per_func).all(dim=1)] = NAN
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale == "batch":
        std = trl_nanstd(rewards).expand_as(rewards)
    else:
        std = trl_nanstd(grouped, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("scale", SCALE_REWARDS)
def test_advantages_match_trl_formula(scale):
    per_func = torch.tensor(
        [[1.0, 0.0], [0.0, NAN], [0.5, 1.0], [1.0, 1.0],  # group with a None from one function
         [NAN, NAN], [0.3, 0.2], [0.9, 0.0], [0.1, 0.6],  # group with an unscorable completion
         [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]  # zero-std group
    )  # fmt: skip
    weights = [1.0, 0.5]
    ours, stats = group_advantages(combine_rewards(per_func, weights), G, scale)
    reference = _trl_reference_advantages(per_func, weights, G, scale)
    assert torch.allclose(ours, reference, atol=1e-6)
    assert ours[4].item() == 0.0 and stats.num_unscorable == 1
    assert stats.frac_reward_zero_std == pytest.approx(1 / 3)


ROOT_THIRD = math.sqrt(1 / 3)  # sample std of [0, 0, 1, 1]
BATCH_STD = math.sqrt(5.5 / 7)  # sample std of [0, 0, 1, 1, 2, 2, 2, 2]


@pytest.mark.parametrize(
    ("rewards", "num_generations", "scale", "expected"),
    [
        ([1, 1, 1, 1], 4, "group", [0, 0, 0, 0]),  # zero-variance group: no signal
        ([0.7, 0.7, 0.7, 0.7], 4, "batch", [0, 0, 0, 0]),
        ([0, 0, 1, 1], 4, "group", [-0.5 / (ROOT_THIRD + STD_EPS)] * 2 + [0.5 / (ROOT_THIRD + STD_EPS)] * 2),
        ([0, 0, 1, 1], 4, "none", [-0.5, -0.5, 0.5, 0.5]),  # no division
        ([0, 0, 1, 1, 2, 2, 2, 2], 4, "batch", [-0.5 / (BATCH_STD + STD_EPS)] * 2
         + [0.5 / (BATCH_STD + STD_EPS)] * 2 + [0, 0, 0, 0]),  # batch std, group mean
        ([3, NAN, 1, 2], 4, "none", [1, 0, -1, 0]),  # unscorable: out of the baseline, advantage 0
        ([NAN, NAN, NAN, 4], 4, "group", [0, 0, 0, 0]),  # one scored value: std undefined -> 0
        ([5, 7], 1, "group", [0, 0]),  # one generation per prompt
    ],
)  # fmt: skip
def test_group_advantages_table(rewards, num_generations, scale, expected):
    advantages, _ = group_advantages(torch.tensor(rewards, dtype=torch.float32), num_generations, scale)
    assert advantages.tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("scale", SCALE_REWARDS)
def test_advantage_stats(scale):
    _, stats = group_advantages(torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4, scale)
    assert stats.frac_reward_zero_std == 0.5
    assert stats.reward_mean == pytest.approx(1.25)
    assert stats.reward_std == pytest.approx(BATCH_STD)
    assert stats.num_unscorable == 0


@pytest.mark.parametrize(
    ("per_func", "weights", "expected"),
    [
        ([[1.0, 0.5], [None, 1.0], [2.0, None]], [2.0, 1.0], [2.5, 1.0, 4.0]),
        ([[1.0, 0.5], [0.0, 0.0]], None, [1.5, 0.0]),
        ([[None, None], [1.0, None]], [1.0, 3.0], [NAN, 1.0]),  # every function abstained -> NaN, not 0
    ],
)
def test_combine_rewards_table(per_func, weights, expected):
    got = combine_rewards(per_func, weights)
    assert torch.allclose(got, torch.tensor(expected), equal_nan=True)


def test_combine_rewards_rejects_wrong_weight_count():
    with pytest.raises(AlignError, match="reward_weights has 3 values but there are 2 reward functions"):
        combine_rewards(torch.zeros(4, 2), [1.0, 1.0, 1.0])


@pytest.mark.parametrize(
    ("mask", "truncated", "expected"),
    [
        ([[1, 1, 1], [1, 1, 0]], [True, False], [[0, 0, 0], [1, 1, 0]]),
        ([[1, 1, 1], [1, 0, 0]], [False, False], [[1, 1, 1], [1, 0, 0]]),
        ([[1, 1, 1], [1, 1, 1]], [True, True], [[0, 0, 0], [0, 0, 0]]),
    ],
)
def test_mask_truncated_table(mask, truncated, expected):
    got = mask_truncated(torch.tensor(mask), torch.tensor(truncated))
    assert got.tolist() == expected and got.dtype == torch.long


def test_one_iteration_ratio_is_one_and_still_has_a_gradient(batch):
    advantages, _ = group_advantages(REWARDS, G, "group")
    weight = batch.weight.clone().requires_grad_(True)
    loss, parts = grpo_loss(
        batch.logps_of(weight), None, None, advantages, batch.mask,
        beta=0.0, epsilon=EPSILON, epsilon_high=EPSILON_HIGH, loss_type="grpo", max_completion_length=T,
    )  # fmt: skip
    has_tokens = (batch.mask.sum(-1) > 0).float()
    assert parts.policy.item() == pytest.approx(-(advantages * has_tokens).mean().item(), abs=1e-6)
    assert parts.ratio_mean.item() == 1.0 and parts.clip_ratio_region.item() == 0.0
    (grad,) = torch.autograd.grad(loss, weight)
    assert grad.abs().max().item() > 1e-3


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_accumulated_micro_batches_give_the_step_objective(batch, loss_type):
    """Two micro-batches, each loss divided by accumulation_steps and summed, equal the whole batch at once."""
    advantages, _ = group_advantages(REWARDS, G, "group")
    logps = batch.logps_of(batch.weight).detach()
    kwargs = dict(
        beta=0.04, epsilon=EPSILON, epsilon_high=EPSILON_HIGH, loss_type=loss_type, max_completion_length=T,
        num_items_in_batch=int(batch.mask.sum()),
    )  # fmt: skip
    whole, _ = grpo_loss(logps, batch.old, batch.ref, advantages, batch.mask, **kwargs)
    halves = [slice(0, B // 2), slice(B // 2, B)]
    accumulated = sum(
        grpo_loss(
            logps[h], batch.old[h], batch.ref[h], advantages[h], batch.mask[h], accumulation_steps=2, **kwargs
        )[0]
        / 2
        for h in halves
    )
    assert accumulated.item() == pytest.approx(whole.item(), abs=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(loss_type="cispo"), "loss_type must be one of"),
        (dict(loss_type="dapo"), "pass num_items_in_batch"),
        (dict(beta=0.04), "beta=0.04, ref_logps missing"),
        (dict(advantages=torch.zeros(3)), r"advantages has shape \(3,\)"),
        (dict(importance_sampling_level="batch"), "importance_sampling_level must be one of"),
    ],
)
def test_grpo_loss_rejects_inconsistent_inputs(batch, change, message):
    kwargs = dict(
        advantages=torch.zeros(B), beta=0.0, epsilon=EPSILON, epsilon_high=None, loss_type="grpo",
        max_completion_length=T,
    )  # fmt: skip
    kwargs.update(change)
    advantages = kwargs.pop("advantages")
    with pytest.raises(ValueError, match=message):
        grpo_loss(batch.logps_of(batch.weight), None, None, advantages, batch.mask, **kwargs)


def test_group_advantages_rejects_partial_groups():
    with pytest.raises(ValueError, match="6 rewards do not split into groups of num_generations=4"):
        group_advantages(torch.zeros(6), 4)
