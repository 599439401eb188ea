"""TRL's vLLM importance-sampling correction (``align.grpo.loss.vllm_importance_sampling``) as a table, and how
:func:`align.grpo.loss.grpo_loss` applies its weights (policy term only). Pure tensors, no model, no vLLM.

    .venv/bin/pytest -q tests/test_vllm_importance_sampling.py
"""

from __future__ import annotations

import math

import pytest
import torch

from align.grpo.loss import grpo_loss, vllm_importance_sampling

# One completion of 3 tokens + 1 padding slot; trainer - sampler log-prob differences per token:
#   +ln 2, -ln 4, +ln 8 (sum: ln 4), and a huge NaN-free value on the padding (must be ignored).
LN2, LN4, LN8 = math.log(2), math.log(4), math.log(8)
TRAINER = torch.tensor([[LN2, -LN4, LN8, 50.0]])
SAMPLER = torch.zeros(1, 4)
MASK = torch.tensor([[1, 1, 1, 0]])

# mode, clip_min, clip_max -> expected weights
TABLE = [
    ("token_truncate", None, 3.0, [[2.0, 0.25, 3.0, 1.0]]),  # padding: exp(0) = 1 (masked out by the loss)
    ("token_truncate", 0.5, 3.0, [[2.0, 0.5, 3.0, 1.0]]),
    ("token_mask", None, 3.0, [[2.0, 0.25, 0.0, 1.0]]),
    ("token_mask", 0.5, None, [[2.0, 0.0, 8.0, 1.0]]),
    ("sequence_truncate", None, 3.0, [[3.0]]),  # exp(ln 4) = 4, clamped
    ("sequence_truncate", None, 5.0, [[4.0]]),
    ("sequence_mask", None, 3.0, [[0.0]]),  # TRL's default: 4 > 3 -> the completion is dropped
    ("sequence_mask", 0.5, 5.0, [[4.0]]),
]


@pytest.mark.parametrize(("mode", "clip_min", "clip_max", "expected"), TABLE)
def test_weights_table(mode: str, clip_min, clip_max, expected) -> None:
    weights, _ = vllm_importance_sampling(
        TRAINER, SAMPLER, MASK, mode=mode, clip_min=clip_min, clip_max=clip_max
    )
    assert torch.allclose(weights, torch.tensor(expected), atol=1e-6), weights


def test_metrics_are_trls() -> None:
    """|trainer - sampler| over completion tokens; ratio stats over tokens (token modes) or rows (sequence)."""
    _, token = vllm_importance_sampling(
        TRAINER, SAMPLER, MASK, mode="token_truncate", clip_min=None, clip_max=3.0
    )
    assert token.logp_difference_mean == pytest.approx((LN2 + LN4 + LN8) / 3)
    assert token.logp_difference_max == pytest.approx(LN8)
    assert (token.ratio_min, token.ratio_max) == pytest.approx((0.25, 3.0))
    assert token.ratio_mean == pytest.approx((2 + 0.25 + 3) / 3)
    _, seq = vllm_importance_sampling(
        TRAINER, SAMPLER, MASK, mode="sequence_mask", clip_min=None, clip_max=5.0
    )
    assert (seq.ratio_min, seq.ratio_mean, seq.ratio_max) == pytest.approx((4.0, 4.0, 4.0))


def test_nan_sampler_logps_count_as_no_correction() -> None:
    sampler = torch.tensor([[float("nan"), 0.0, 0.0, 0.0]])
    weights, stats = vllm_importance_sampling(
        TRAINER, sampler, MASK, mode="token_truncate", clip_min=None, clip_max=9.0
    )
    assert weights[0, 0] == 1.0 and weights[0, 2] == pytest.approx(8.0)
    assert stats.logp_difference_max == pytest.approx(LN8)  # the NaN token is left out, not counted as 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        vllm_importance_sampling(TRAINER, SAMPLER, MASK, mode="tokens", clip_min=None, clip_max=3.0)
    with pytest.raises(ValueError, match="needs clip_min or clip_max"):
        vllm_importance_sampling(TRAINER, SAMPLER, MASK, mode="token_truncate", clip_min=None, clip_max=None)
    with pytest.raises(ValueError, match=r"sampling_logps has shape \(1, 3\)"):
        vllm_importance_sampling(
            TRAINER, SAMPLER[:, :3], MASK, mode="token_mask", clip_min=None, clip_max=3.0
        )


def test_grpo_loss_weighs_the_policy_term_not_the_kl() -> None:
    """TRL: ``per_token_loss = surrogate * is_ratio`` before adding ``beta * kl``."""
    torch.manual_seed(0)
    logps = torch.randn(2, 3).requires_grad_()
    ref = torch.randn(2, 3)
    advantages = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    weights = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0]])
    args = dict(beta=0.1, epsilon=0.2, epsilon_high=0.2, loss_type="bnpo", max_completion_length=3)
    _, plain_parts = grpo_loss(logps, None, ref, advantages, mask, **args)
    weighted, parts = grpo_loss(logps, None, ref, advantages, mask, sampling_weights=weights, **args)
    # ratio 1: the surrogate per token is -A; weighted by w, token mean over the 5 completion tokens
    expected_policy = -(advantages[:, None] * weights * mask).sum() / mask.sum()
    assert parts.policy == pytest.approx(float(expected_policy))
    assert parts.kl_penalty == pytest.approx(float(plain_parts.kl_penalty))
    assert weighted.item() == pytest.approx(float(expected_policy + plain_parts.kl_penalty))
    # a sequence-level weight [B, 1] broadcasts over the tokens
    _, seq = grpo_loss(
        logps, None, ref, advantages, mask, sampling_weights=torch.tensor([[2.0], [0.0]]), **args
    )
    assert seq.policy == pytest.approx(float(-(2.0 * advantages[0] * 3) / 5))
