"""Small cases that kill the mutants ``scripts/mutation.sh`` found surviving (docs/testing.md lists them).

Each expected number is worked out by hand here, not by the code under test. Pure tensors and strings: no
model, no zoo; the whole module runs in well under a second.

    .venv/bin/pytest -q tests/test_mutation_gaps.py
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from align.data.encode import Encoded
from align.grpo.loss import combine_rewards, grpo_loss, vllm_importance_sampling

# --- align/grpo/loss.py: vllm_importance_sampling ---------------------------------------------------------


def test_importance_weights_use_trainer_minus_sampler() -> None:
    """A sampler log-prob that is not 0: the weight is exp(trainer - sampler), and the logged difference is
    |trainer - sampler| (the table in test_vllm_importance_sampling.py has sampler = 0, where + and - agree)."""
    trainer = torch.tensor([[-1.0, -2.0]])
    sampler = torch.tensor([[-1.0 - math.log(2), -2.0 + math.log(4)]])  # differences: +ln 2, -ln 4
    mask = torch.ones(1, 2)
    weights, stats = vllm_importance_sampling(
        trainer, sampler, mask, mode="token_truncate", clip_min=None, clip_max=10.0
    )
    assert torch.allclose(weights, torch.tensor([[2.0, 0.25]]), atol=1e-6)
    assert stats.logp_difference_mean == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-6)
    assert stats.logp_difference_max == pytest.approx(math.log(4), rel=1e-6)


def test_sequence_weights_are_one_per_row() -> None:
    """Two completions: one ratio each, [B, 1], from each row's own sum (not the batch's)."""
    trainer = torch.tensor([[math.log(2), 0.0], [0.0, math.log(3)]])
    weights, stats = vllm_importance_sampling(
        trainer, torch.zeros(2, 2), torch.ones(2, 2), mode="sequence_truncate", clip_min=None, clip_max=10.0
    )
    assert weights.shape == (2, 1)
    assert torch.allclose(weights, torch.tensor([[2.0], [3.0]]), atol=1e-6)
    assert (stats.ratio_min, stats.ratio_mean, stats.ratio_max) == pytest.approx((2.0, 2.5, 3.0), rel=1e-6)


def test_mask_mode_keeps_a_ratio_equal_to_a_bound() -> None:
    """``*_mask`` drops ratios strictly outside [clip_min, clip_max]: a ratio of exactly 1 with both bounds 1
    is kept (trainer == sampler gives exp(0) == 1.0 exactly)."""
    same = torch.tensor([[-0.5, -1.5]])
    weights, _ = vllm_importance_sampling(
        same, same, torch.ones(1, 2), mode="token_mask", clip_min=1.0, clip_max=1.0
    )
    assert weights.tolist() == [[1.0, 1.0]]


def test_all_masked_batch_logs_zero_statistics() -> None:
    """No completion token at all (every row masked): the statistics are 0.0, not NaN or an error."""
    trainer = torch.tensor([[-1.0, -2.0]])
    _, stats = vllm_importance_sampling(
        trainer, torch.zeros(1, 2), torch.zeros(1, 2), mode="token_truncate", clip_min=None, clip_max=3.0
    )
    assert (
        stats.logp_difference_mean,
        stats.logp_difference_max,
        stats.ratio_min,
        stats.ratio_mean,
        stats.ratio_max,
    ) == (0.0, 0.0, 0.0, 0.0, 0.0)


# --- align/grpo/loss.py: combine_rewards, grpo_loss -------------------------------------------------------


def test_combine_rewards_keeps_a_float64_tensors_dtype_and_weights() -> None:
    """float64 rewards with weight 0.1: 0.1 in float64 (a float32 0.1 would be 0.10000000149...)."""
    per_func = torch.tensor([[1.0, 2.0], [3.0, float("nan")]], dtype=torch.float64)
    rewards = combine_rewards(per_func, [0.1, 1.0])
    assert rewards.dtype == torch.float64
    assert rewards.tolist() == [0.1 * 1.0 + 2.0, 0.1 * 3.0]


@pytest.mark.parametrize(("loss_type", "num_items"), [("bnpo", None), ("dapo", 1)])
def test_a_single_completion_token_is_not_divided_twice(loss_type: str, num_items) -> None:
    """One completion of one token: bnpo's and dapo's token means divide by 1 (the clamp is only against 0).

    logps = old = ln(1/2), ref = ln(1/4), A = 1, beta = 0.5: ratio 1, policy = -1; d = ref - logps = -ln 2,
    k3 = exp(d) - d - 1 = 1/2 + ln 2 - 1, kl_penalty = beta * k3, and the KL mean is k3 itself.
    """
    logp = torch.tensor([[math.log(0.5)]])
    loss, parts = grpo_loss(
        logp,
        logp.clone(),
        torch.tensor([[math.log(0.25)]]),
        torch.tensor([1.0]),
        torch.ones(1, 1),
        beta=0.5,
        epsilon=0.2,
        epsilon_high=None,
        loss_type=loss_type,
        max_completion_length=4,
        num_items_in_batch=num_items,
    )
    k3 = 0.5 + math.log(2) - 1
    assert parts.policy.item() == pytest.approx(-1.0, rel=1e-6)
    assert parts.kl.item() == pytest.approx(k3, rel=1e-5)
    assert parts.kl_penalty.item() == pytest.approx(0.5 * k3, rel=1e-5)
    assert loss.item() == pytest.approx(-1.0 + 0.5 * k3, rel=1e-5)


def _loss(mask_shape=(1, 3), **change):
    """grpo_loss on zeros of ``mask_shape`` with ``change`` applied (tensors or options)."""
    b, t = mask_shape
    args = dict(
        logps=torch.zeros(b, t), old_logps=None, ref_logps=None, advantages=torch.zeros(b),
        completion_mask=torch.ones(b, t), beta=0.0, epsilon=0.2, epsilon_high=None, loss_type="grpo",
        max_completion_length=t,
    )  # fmt: skip
    args.update(change)
    return grpo_loss(
        args.pop("logps"), args.pop("old_logps"), args.pop("ref_logps"), args.pop("advantages"),
        args.pop("completion_mask"), **args,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(logps=torch.zeros(1, 2)), r"^logps has shape \(1, 2\), completion_mask has \(1, 3\)$"),
        (dict(old_logps=torch.zeros(2, 3)), r"^old_logps has shape \(2, 3\), completion_mask has \(1, 3\)$"),
        (
            dict(ref_logps=torch.zeros(1, 4), beta=0.1),
            r"^ref_logps has shape \(1, 4\), completion_mask has \(1, 3\)$",
        ),
        (dict(ref_logps=torch.zeros(1, 3)), r"\(beta=0.0, ref_logps given\)$"),
        (dict(advantages=torch.zeros(2)), r"^advantages has shape \(2,\), expected \[1\] or \(1, 3\)$"),
        (
            dict(loss_type="dapo"),
            r"^loss_type='dapo' normalises by the completion tokens of the whole optimizer step: "
            r"pass num_items_in_batch \(summed over ranks and accumulation micro-batches\)$",
        ),
    ],
)
def test_grpo_loss_errors_name_the_input_and_its_shape(change, message) -> None:
    with pytest.raises(ValueError, match=message):
        _loss(**change)


def test_other_loss_errors_name_the_input_and_its_shape() -> None:
    from align.grpo.loss import mask_truncated

    with pytest.raises(
        ValueError, match=r"^per-function rewards must be \[completions, functions\], got shape \(3,\)$"
    ):
        combine_rewards(torch.zeros(3))
    with pytest.raises(
        ValueError, match=r"^is_truncated has shape \(3,\), expected \[2\] for completion_mask \(2, 4\)$"
    ):
        mask_truncated(torch.ones(2, 4), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^trainer_logps has shape \(1, 2\), completion_mask has \(1, 3\)$"):
        vllm_importance_sampling(
            torch.zeros(1, 2),
            torch.zeros(1, 3),
            torch.ones(1, 3),
            mode="token_mask",
            clip_min=None,
            clip_max=3.0,
        )


def test_group_advantages_with_two_generations() -> None:
    """Groups of 2: Bessel's std of (0, 1) is sqrt(1/2) (dividing by count - 1 = 1); the batch std is the same."""
    from align.grpo.loss import STD_EPS, group_advantages

    advantages, stats = group_advantages(torch.tensor([0.0, 1.0]), 2, "group")
    a = 0.5 / (math.sqrt(0.5) + STD_EPS)
    assert torch.allclose(advantages, torch.tensor([-a, a]), atol=1e-6)
    assert stats.reward_std == pytest.approx(math.sqrt(0.5), rel=1e-6)
    assert stats.frac_reward_zero_std == 0.0


def test_group_advantages_of_one_generation_and_of_one_reward() -> None:
    """num_generations=1: every group has std 0 (counted as zero-std); a single reward has batch std 0, not NaN."""
    from align.grpo.loss import group_advantages

    advantages, stats = group_advantages(torch.tensor([1.0, 2.0]), 1, "group")
    assert advantages.tolist() == [0.0, 0.0] and stats.frac_reward_zero_std == 1.0
    advantages, stats = group_advantages(torch.tensor([0.5]), 1, "batch")
    assert advantages.tolist() == [0.0] and stats.reward_std == 0.0 and stats.reward_mean == 0.5


def test_a_group_with_one_scorable_reward_has_no_std() -> None:
    """A group of 2 where one completion is unscorable (NaN): one value has no std (NaN), so the group is not
    counted as zero-std; its advantage is 0. The other group (0, 1) is an ordinary one."""
    from align.grpo.loss import group_advantages

    advantages, stats = group_advantages(torch.tensor([1.0, float("nan"), 0.0, 1.0]), 2, "group")
    assert advantages[:2].tolist() == [0.0, 0.0]
    assert stats.frac_reward_zero_std == 0.0 and stats.num_unscorable == 1


def test_per_token_advantages_of_several_completions() -> None:
    """[B, T] advantages are used as they are (not broadcast against every row): with ratio 1 the grpo loss is
    minus the per-sequence mean advantage, averaged: rows (1 + 2) / 2 and 3 / 1 -> -(1.5 + 3) / 2."""
    loss, _ = _loss(
        mask_shape=(2, 2),
        advantages=torch.tensor([[1.0, 2.0], [3.0, 10.0]]),
        completion_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
    )
    assert loss.item() == pytest.approx(-2.25, rel=1e-6)


def test_dapo_divisor_keeps_the_loss_dtype() -> None:
    """float64 dapo: 2 tokens over num_items 7 on 3 accumulation steps -> -2 / (7 / 3) = -6/7 to float64 precision
    (a float32 divisor would be off by ~1e-8)."""
    loss, parts = _loss(
        mask_shape=(1, 2),
        logps=torch.zeros(1, 2, dtype=torch.float64),
        advantages=torch.ones(1, dtype=torch.float64),
        loss_type="dapo",
        num_items_in_batch=7,
        accumulation_steps=3,
    )
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(-6 / 7, rel=1e-12)
    assert parts.num_tokens.item() == 2


def test_clip_statistics_are_strict_at_the_bounds() -> None:
    """A ratio exactly at 1 - epsilon (exp(ln 0.8) == float32(0.8)) is not clipped low; a ratio capped by
    delta == 1 + epsilon_high lands exactly on the upper bound and is not clipped high."""
    _, parts = _loss(
        logps=torch.full((1, 3), math.log(0.8)), old_logps=torch.zeros(1, 3), advantages=-torch.ones(1)
    )
    assert parts.clip_ratio_low.item() == 0.0
    _, parts = _loss(
        logps=torch.full((1, 3), math.log(2.0)),
        old_logps=torch.zeros(1, 3),
        advantages=torch.ones(1),
        epsilon_high=0.25,
        delta=1.25,
    )
    assert parts.clip_ratio_high.item() == 0.0


def test_advantage_errors_name_the_input() -> None:
    from align.grpo.loss import group_advantages

    with pytest.raises(
        ValueError, match=r"^scale_rewards must be one of \('group', 'batch', 'none'\), got 'x'$"
    ):
        group_advantages(torch.zeros(2), 1, "x")
    with pytest.raises(ValueError, match=r"^rewards must be 1-D \[completions\], got shape \(2, 1\)$"):
        group_advantages(torch.zeros(2, 1), 1)
    with pytest.raises(
        ValueError,
        match=r"^3 rewards do not split into groups of num_generations=2: pass whole groups \(gathered across ranks\)$",
    ):
        group_advantages(torch.zeros(3), 2)


# --- align/data/batching.py -------------------------------------------------------------------------------


def _row(length: int, images: int = 0, name: str = "f.jsonl:1") -> Encoded:
    ids = list(range(1, length + 1))
    return Encoded(
        input_ids=ids, labels=ids, n_images=images, origin=name, prompt_length=0, n_image_tokens=0,
        images=[f"{name}#{k}" for k in range(images)],
    )  # fmt: skip


def test_collates_give_long_tensors_and_a_0_1_attention_mask() -> None:
    from align.data.batching import pack, packed_collate, pad_collate

    batch = pad_collate([_row(2), _row(3)], pad_id=0)
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert {batch[k].dtype for k in ("input_ids", "attention_mask", "labels")} == {torch.long}
    packed = packed_collate(pack([_row(2), _row(3)], max_length=4), pad_id=0)
    assert {packed[k].dtype for k in ("input_ids", "labels", "position_ids")} == {torch.long}


def test_length_grouping_fills_the_first_batch_with_the_longest_rows() -> None:
    """Lengths 1..5 in batches of 2 (one megabatch): sorted longest first, so the batches are (5, 4), (3, 2),
    (1,) and the one holding the longest row, (5, 4), comes first."""
    from align.data.batching import length_grouped_batches

    lengths = [1, 2, 3, 4, 5]
    batches = length_grouped_batches(lengths, 2, seed=0, epoch=0)
    assert sorted(lengths[i] for i in batches[0]) == [4, 5]
    assert sorted(tuple(sorted(lengths[i] for i in b)) for b in batches) == [(1,), (2, 3), (4, 5)]


def test_length_grouping_with_batches_and_megabatches_of_one() -> None:
    from align.data.batching import length_grouped_batches

    batches = length_grouped_batches([3, 1, 2], 1, seed=0, epoch=0, megabatch=1)
    assert sorted(batches) == [[0], [1], [2]] and batches[0] == [0]
    with pytest.raises(ValueError, match=r"^batch_size and megabatch must be >= 1, got 0 and 1$"):
        length_grouped_batches([3], 0, seed=0, epoch=0, megabatch=1)


def test_default_megabatch_is_50_batches() -> None:
    """102 rows in batches of 2: megabatches of 100 rows by default (a megabatch of 51 batches groups other rows)."""
    from align.data.batching import length_grouped_batches

    lengths = list(range(1, 103))
    default = length_grouped_batches(lengths, 2, seed=3, epoch=0)
    assert default == length_grouped_batches(lengths, 2, seed=3, epoch=0, megabatch=50)
    assert default != length_grouped_batches(lengths, 2, seed=3, epoch=0, megabatch=51)


def test_image_origins_of_padded_and_packed_rows() -> None:
    from align.data.batching import image_origins, pack

    a, b, c = _row(2, images=2, name="a:1"), _row(3, name="b:2"), _row(2, images=1, name="c:3")
    assert image_origins([a, b, c]) == ["a:1", "a:1", "c:3"]
    packed = pack([a, c], max_length=4)
    assert image_origins(packed) == ["a:1", "a:1", "c:3"]


def test_pad_side_error_names_the_value() -> None:
    from align.data.batching import pad_collate

    with pytest.raises(ValueError, match=r"^pad_side must be 'right' or 'left', got 'top'$"):
        pad_collate([_row(2)], pad_id=0, pad_side="top")


def test_pack_fills_a_bin_exactly() -> None:
    """Rows of 3 and 1 tokens fill one row of 4 (best fit takes a bin whose space equals the row's length)."""
    from align.data.batching import pack

    rows = pack([_row(3), _row(1)], max_length=4)
    assert [(row.items, row.lengths) for row in rows] == [([0, 1], [3, 1])]


# --- align/rewards/ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "think"),
    [
        ("</think>the answer", ""),  # closed at once (no prefill put back): empty reasoning, not None
        ("</think><think>abc</think>x", "abc"),  # a stray close before the opening tag is not the end
    ],
)
def test_extract_think_edge_cases(completion: str, think: str) -> None:
    from align.rewards.extract import extract_think

    assert extract_think(completion) == think


def test_answer_block_ends_at_the_first_close_after_the_last_open() -> None:
    from align.rewards.extract import extract_answer, last_boxed

    assert extract_answer("<think>r</think><answer>a</answer> b</answer>") == "a"
    assert last_boxed("so \\boxed{3} is it") == "3"


def test_conversational_completion_and_a_leading_think_close() -> None:
    """A TRL conversational completion is its contents joined with nothing between; a completion that starts
    with ``</think>`` (closed at once) is answered by the text after it, even if a ``<think>`` follows."""
    from align.rewards.extract import as_text, extract_answer

    assert as_text([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]) == "ab"
    assert extract_answer("</think>a<think>") == "a"


def test_length_reward_default_target_and_tiny_targets() -> None:
    """The default target is 2000 characters; a target of 1 is a real target (any reasoning earns the cap), a
    target of 0 earns 0 instead of dividing by zero."""
    from align.rewards.reasoning import length

    completion = "<think>" + "a" * 1000 + "</think><answer>1</answer>"
    assert length(completion) == 0.5
    assert length(completion, target=1) == 1.0
    assert length(completion, target=0) == 0.0


def test_repetition_default_n_and_the_few_spaces_boundary() -> None:
    """Default n = 4: 'a b c d a b c d' has 5 word 4-grams, one repeated (5-grams would all differ). One
    space-free word of exactly 20 characters still counts as words (one word, no 4-gram: 0), not characters."""
    from align.rewards.reasoning import repetition

    assert repetition("a b c d a b c d") == pytest.approx(-0.2)
    assert repetition("a" * 20) == 0.0
    assert repetition("a" * 21) == pytest.approx(
        -(1 - 1 / 6)
    )  # 21 - 16 + 1 = 6 character 16-grams, 1 distinct


def test_valid_box_refuses_strings_bools_and_flat_boxes() -> None:
    from align.rewards.boxes import valid_box

    assert valid_box(["1", 2, 3, 4]) is None
    assert valid_box([0, 0, True, 2]) is None  # a bool is not a coordinate, though float(True) is 1.0
    assert valid_box([0, 1, 2, 1]) is None  # y2 == y1: no height
    assert valid_box([0, 1, 2, 1.5]) == (0.0, 1.0, 2.0, 1.5)


def test_clip_box_keeps_each_coordinate_in_its_place() -> None:
    from align.rewards.boxes import clip_box

    assert clip_box((5, 1, 10, 10), (20, 20)) == (5.0, 1.0, 10.0, 10.0)
    assert clip_box((0, 0, 4, 8), (20, 20)) == (0.0, 0.0, 4.0, 8.0)
    assert clip_box((-3, 2, 25, 30), (20, 10)) == (0.0, 2.0, 20.0, 10.0)


def test_box_iou_of_offset_non_square_boxes_and_boxes_touching_on_one_axis() -> None:
    """a = (0,0,4,4), b = (1,2,3,6): the overlap is 2 x 2 = 4, the union 16 + 8 - 4 = 20. Boxes side by side
    (overlapping on one axis only) have IoU 0, whichever axis it is."""
    from align.rewards.boxes import box_iou

    assert box_iou((0, 0, 4, 4), (1, 2, 3, 6)) == pytest.approx(0.2)
    assert box_iou((1, 2, 3, 6), (0, 0, 4, 4)) == pytest.approx(0.2)
    assert box_iou((0, 0, 1, 1), (2, 0, 3, 1)) == 0.0
    assert box_iou((0, 0, 1, 1), (0, 2, 1, 3)) == 0.0


def test_iou_soft_image_size_must_be_two_positive_numbers() -> None:
    from align.rewards.boxes import iou_soft

    completion = "<think>r</think><answer>[0, 0, 1, 1]</answer>"
    assert iou_soft(completion, [0, 0, 1, 1], image_size=(1, 1)) == 1.0  # a 1 x 1 image is an image
    assert iou_soft(completion, [0, 0, 1, 1], image_size=(True, 5)) is None
    assert iou_soft(completion, [0, 0, 1, 1], image_size=("10", 10)) is None


@pytest.mark.parametrize("target", [(0, 5), (5, 0), 0])
def test_box_mapping_refuses_an_empty_target(target) -> None:
    from align.rewards.boxes import box_to_model_input

    with pytest.raises(ValueError, match=r"^target_size must be > 0, got "):
        box_to_model_input((0, 0, 1, 1), (10, 10), target, "squash")


def test_box_mapping_offsets_are_whole_pixels_and_a_1_pixel_target_works() -> None:
    """pad: a 10 x 7 image sits at y offset (10 - 7) // 2 = 1 on its 10 x 10 square; centre crop of a 13 x 10
    image to 10 x 10 drops (13 - 10) // 2 = 1 column on the left. Both as the processors do, in whole pixels."""
    from align.rewards.boxes import box_to_model_input

    assert box_to_model_input((0, 0, 10, 7), (10, 7), 10, "pad") == (0.0, 1.0, 10.0, 8.0)
    assert box_to_model_input((0, 0, 13, 10), (13, 10), 10, "shortest_edge_center_crop") == (
        -1.0,
        0.0,
        12.0,
        10.0,
    )
    assert box_to_model_input((0, 0, 10, 10), (10, 10), (1, 1), "squash") == (0.0, 0.0, 1.0, 1.0)
    with pytest.raises(
        ValueError, match=r"^resize must be one of shortest_edge_center_crop, squash, pad, got 'x'$"
    ):
        box_to_model_input((0, 0, 1, 1), (10, 10), 10, "x")


@pytest.mark.parametrize(
    ("text", "trimmed"),
    [
        ("$\\boxed{\\text{\\mathrm{B}}}$", "\\mathrm{B}"),  # three layers come off, not a fourth
        ("$X$", "X"),
        ("\\( 42 \\)", "42"),
        ("\\(42\\)", "42"),  # exactly the two characters of each delimiter come off
        ("\\(x+1", "\\(x+1"),  # opened, never closed: not a wrapper
        ("\\boxed{1\n2}", "1\n2"),  # a boxed answer over two lines
    ],
)
def test_trim_takes_off_whole_answer_wrappers_only(text: str, trimmed: str) -> None:
    from align.rewards.answers import _trim

    assert _trim(text) == trimmed


def test_number_parsing_bounds_and_latex_wrappers() -> None:
    from fractions import Fraction

    from align.rewards.answers import last_number, parse_number

    assert parse_number("\\text{3}") == (Fraction(3), True)
    assert parse_number("1" * 100) == (Fraction(int("1" * 100)), True)  # MAX_DIGITS digits still count
    assert parse_number("1" * 101) is None
    assert last_number("there are " + "1" * 100) == int("1" * 100)
    assert last_number("there are " + "1" * 101) is None


@pytest.mark.parametrize(
    ("answer", "choice"),
    [
        ("`B`", "B"),
        ("X", "X"),
        ("(X)", "X"),
        ("cat", None),
        ("3", None),
        ("é", None),
        ("the answer is b  so", "B"),
    ],
)
def test_parse_choice_edge_cases(answer: str, choice) -> None:
    from align.rewards.answers import parse_choice

    assert parse_choice(answer) == choice


def test_gold_text_is_the_last_answer_block_and_accuracy_reads_it() -> None:
    from align.rewards.answers import accuracy, gold_problem, gold_text

    assert gold_text("<answer>2</answer> then <answer> 3 </answer>") == "3"
    assert gold_text("<answer>3</answer>") == "3"
    assert accuracy("<think>r</think><answer>3</answer>", "<answer>3</answer>") == 1.0
    assert gold_problem("$$") == "the gold answer '$$' is blank once $…$ / \\boxed{…} wrappers are removed"
    assert gold_problem([1]) == "the gold answer is a list ([1]), not text or a finite number"


@pytest.mark.parametrize(
    ("answer", "gold", "kwargs", "expected"),
    [
        ("no", "false", {}, 1.0),  # a false gold is a yes/no gold
        ("B", "(b)", {}, 1.0),  # a bracketed small letter is an option
        ("1e-3", "0.001", {}, 1.0),  # the whole answer is one number: not its last digits in prose
        ("1000.55", "1000.5", {}, 1.0),  # within rel_tol * |gold| = 0.1
        ("0.50048828125", "0.5", {"rel_tol": 2.0**-10, "abs_tol": 0.0}, 1.0),  # exactly on the tolerance
        ("0.5004882813", "0.5", {"rel_tol": 2.0**-10, "abs_tol": 0.0}, 0.0),
    ],
)
def test_accuracy_number_and_choice_edges(answer: str, gold: str, kwargs: dict, expected: float) -> None:
    from align.rewards.answers import accuracy

    assert accuracy(f"<think>r</think><answer>{answer}</answer>", gold, **kwargs) == expected


def test_math_deadlines_reach_math_verify(monkeypatch) -> None:
    """The ``timeout`` given to gold_problem / accuracy (default 1 s) is the deadline math_verify gets."""
    import align.rewards.answers as answers

    seen: list[tuple[str, float]] = []
    real_parse, real_equal = answers.parse_gold, answers.math_equal

    def parse_gold(gold, timeout=99.0):
        seen.append(("parse", timeout))
        return real_parse(gold, timeout)

    def math_equal(answer, gold, timeout=99.0):
        seen.append(("equal", timeout))
        return real_equal(answer, gold, timeout)

    monkeypatch.setattr(answers, "parse_gold", parse_gold)
    monkeypatch.setattr(answers, "math_equal", math_equal)
    assert answers.gold_problem("x^2") is None
    assert answers.gold_problem("x^2", timeout=5.0) is None
    assert answers.accuracy("<answer>x^2</answer>", "x^2", timeout=3.0) == 1.0
    assert (
        answers.accuracy("<answer>\\frac{1}{2}</answer>", "0.5", timeout=4.0) == 1.0
    )  # number gold, no number
    assert answers.accuracy("<answer>x^2</answer>", "x^2") == 1.0
    assert seen == [
        ("parse", 1.0),
        ("parse", 5.0),
        ("parse", 3.0),
        ("equal", 3.0),
        ("equal", 4.0),
        ("parse", 1.0),
        ("equal", 1.0),
    ]


# --- align/rewards/__init__.py: the registered wrappers and the gold self-check -----------------------------


@pytest.mark.parametrize(
    ("answer", "gold", "expected"),
    [
        ("2.5002", "2.5", 1.0),  # within the default relative tolerance: 1e-4 x 2.5 = 2.5e-4
        ("2.5003", "2.5", 0.0),  # outside it
        ("0.00001", "0.0", 0.0),  # a zero gold: only the absolute tolerance, 1e-9
        ("0.0000000005", "0.0", 1.0),
    ],
)
def test_accuracy_reward_keeps_accuracys_default_tolerances(answer: str, gold: str, expected: float) -> None:
    from align.rewards import REWARDS

    assert REWARDS["accuracy"]([f"<answer>{answer}</answer>"], solution=[gold]) == [expected]


def test_accuracy_reward_defaults_are_accuracys(monkeypatch) -> None:
    """What the wrapper hands ``accuracy`` when a recipe sets nothing: accuracy's own defaults (1e-4, 1e-9, 1 s)."""
    import align.rewards as rewards

    seen = []
    monkeypatch.setattr(rewards, "accuracy", lambda c, g, **kw: seen.append(kw) or 1.0)
    assert rewards.REWARDS["accuracy"](["<answer>3</answer>"], solution=["3"]) == [1.0]
    assert seen == [{"rel_tol": 1e-4, "abs_tol": 1e-9, "timeout": 1.0, "method": None}]


def test_accuracy_reward_errors_name_the_column_it_read() -> None:
    from align.rewards import REWARDS, RewardSetupError

    with pytest.raises(RewardSetupError) as err:
        REWARDS["accuracy"](["a", "b"], answer=["1"])
    assert str(err.value) == "reward 'accuracy': column 'answer' has 1 values for 2 completions"
    with pytest.raises(RewardSetupError) as err:
        REWARDS["accuracy"](["a", "b"], solution=["1", "2"], accu_reward_method=["mcq"])
    assert str(err.value) == "reward 'accuracy': column 'accu_reward_method' has 1 values for 2 completions"
    with pytest.raises(RewardSetupError) as err:
        REWARDS["accuracy"](["a"], solution=["1", "2"], answer=["1"])
    assert str(err.value) == "reward 'accuracy': column 'solution' has 2 values for 1 completions"


def test_the_self_check_does_not_judge_a_box_reward_on_a_row_without_a_valid_box() -> None:
    from align.rewards import REWARDS, gold_self_check

    for spec in ("iou", "iou_soft", "giou"):
        assert gold_self_check(spec, REWARDS[spec], "3", [1, 2]) is None
        assert gold_self_check(spec, REWARDS[spec], None, [5, 5, 1, 1]) is None
    # Qwen2-VL's corner form is a box to giou alone
    assert gold_self_check("iou", REWARDS["iou"], None, "(1,2),(3,4)") is None


def test_the_self_check_scores_with_the_rows_method() -> None:
    from align.rewards import REWARDS, gold_self_check

    # "yes" is a fine yes/no gold but no multiple-choice letter: under the row's mcq method it cannot score
    assert gold_self_check("accuracy", REWARDS["accuracy"], "yes", None) is None
    assert gold_self_check("accuracy", REWARDS["accuracy"], "yes", None, method="mcq") == (
        "reward 'accuracy' scores the gold itself None (not applicable) (its maximum is 1)"
    )


def test_the_self_check_gives_accuracy_its_generous_deadline(monkeypatch) -> None:
    import align.rewards as rewards

    seen = []

    def recording_accuracy(completion, gold, *, rel_tol, abs_tol, timeout, method):
        seen.append(timeout)
        return 1.0

    monkeypatch.setattr(rewards, "accuracy", recording_accuracy)
    assert rewards.gold_self_check("accuracy", rewards.REWARDS["accuracy"], "3", None) is None
    assert seen == [rewards.CHECK_TIMEOUT]


def test_the_self_check_passes_box_and_family_to_a_custom_reward() -> None:
    from align.rewards import gold_self_check

    def box_reward(completions, box, family, **kwargs):
        return [0.0 if family[0] == "grounding" and box[0] == [1, 2, 3, 4] else 1.0 for _ in completions]

    problem = gold_self_check("mine:box_reward", box_reward, "3", [1, 2, 3, 4], family="grounding")
    assert problem == "reward 'mine:box_reward' scores the gold itself 0"


def test_a_gold_written_with_less_than_full_confidence_cannot_earn_the_confidence_maximum() -> None:
    from align.rewards import REWARDS, gold_self_check

    gold = "<answer>[{'Position': [10, 10, 50, 50], 'Confidence': 0.5}]</answer>"
    assert gold_self_check("detection_iou", REWARDS["detection_iou"], gold, None) is None
    assert gold_self_check("detection_confidence", REWARDS["detection_confidence"], gold, None) == (
        "reward 'detection_confidence' scores the gold itself 0.5 (its maximum is 1)"
    )


def test_iou_reward_clips_the_answer_to_the_rows_image_size() -> None:
    from align.rewards import REWARDS

    # [0, 0, 20, 10] on a 10 x 10 image is [0, 0, 10, 10]: IoU 1 with the gold; unclipped it is 0.5, not above 0.5
    answer = ["<answer>[0, 0, 20, 10]</answer>"]
    assert REWARDS["iou"](answer, box=[[0, 0, 10, 10]], image_size=[[10, 10]]) == [1.0]
    assert REWARDS["iou"](answer, box=[[0, 0, 10, 10]]) == [0.0]


def test_reward_setup_errors_name_the_reward() -> None:
    from align.rewards import REWARDS, RewardSetupError

    with pytest.raises(RewardSetupError) as err:
        REWARDS["detection_confidence"](["a"])
    assert (
        str(err.value) == "reward 'detection_confidence' needs a 'solution' column in the data; it is missing"
    )


def test_unscorable_gold_reads_every_configured_reward_and_joins_their_reasons() -> None:
    from align.rewards import unscorable_gold

    assert (
        unscorable_gold(["format", "accuracy"], None)
        == "accuracy reward: the row has no gold answer (solution)"
    )
    assert unscorable_gold(["accuracy", "iou"], None, box=None) == (
        "accuracy reward: the row has no gold answer (solution); "
        "iou reward: no valid gold box [x1, y1, x2, y2] (box: None)"
    )
    # Qwen2-VL's corner form is giou's alone: iou reads [x1, y1, x2, y2]
    assert unscorable_gold(["giou"], None, box="(1,2),(3,4)") is None
    assert unscorable_gold(["iou"], None, box="(1,2),(3,4)") is not None


def test_a_custom_reward_reading_the_answer_column_is_judged() -> None:
    from align.rewards import _reads_gold, gold_self_check

    def by_answer(completions, answer=None, **kwargs):  # training passes no 'answer' column: it scores 0
        return [float(answer is not None) for _ in completions]

    def by_box(completions, box, **kwargs):
        return [0.0 for _ in completions]

    assert (
        gold_self_check("m:by_answer", by_answer, "3", None)
        == "reward 'm:by_answer' scores the gold itself 0"
    )
    assert _reads_gold(by_box) and not _reads_gold(max)  # max has no signature to read


def test_bound_parameters_for_custom_rewards() -> None:
    import functools

    from align.errors import AlignError
    from align.rewards import _bind

    def open_reward(completions, scale=1.0, **kwargs):
        return [scale * len(c) for c in completions]

    def closed_reward(completions, scale=1.0):
        return [scale * len(c) for c in completions]

    bound = _bind("m:open_reward", open_reward, {"scale": 2.0, "extra": 1})  # **kwargs takes any name
    assert (
        bound(["ab"]) == [4.0]
        and bound.__name__ == "open_reward"
        and bound.params == {"scale": 2.0, "extra": 1}
    )
    with pytest.raises(AlignError) as err:
        _bind("m:closed_reward", closed_reward, {"extra": 1, "more": 2})
    assert str(err.value) == "reward 'm:closed_reward' has no parameter 'extra', 'more' (parameters: scale)"
    # a callable without a __name__ (a partial) is named by its spec
    assert _bind("m:part", functools.partial(open_reward, scale=3.0), {"extra": 1}).__name__ == "m:part"
    with pytest.raises(AlignError, match="reward 'format' has no parameter 'extra'"):
        _bind("format", open_reward, {"extra": 1})  # a built-in is never open-ended, whatever its signature


def test_unknown_reward_messages() -> None:
    from align.errors import AlignError
    from align.rewards import REWARDS, load_reward

    with pytest.raises(AlignError) as err:
        load_reward("zzzzzz")
    assert str(err.value) == (
        f"unknown reward 'zzzzzz': built-in rewards are {', '.join(REWARDS)}; "
        "custom ones are written 'module:function' or 'path/to/file.py:function'"
    )


def test_custom_reward_files_with_a_colon_in_their_path_and_their_callables(tmp_path) -> None:
    from align.errors import AlignError
    from align.rewards import load_reward

    folder = tmp_path / "run:1"
    folder.mkdir()
    (folder / "mine.py").write_text("def score(completions, **kw):\n    return [1.0] * len(completions)\n")
    assert load_reward(f"{folder / 'mine.py'}:score")(["a"]) == [1.0]
    (folder / "empty.py").write_text("X = 1\n")
    with pytest.raises(AlignError) as err:
        load_reward(f"{folder / 'empty.py'}:score")
    assert str(err.value).endswith("has no 'score' (callables: none)")
    (folder / "two.py").write_text("def _hidden(c):\n    return c\n\ndef shown(c):\n    return c\n")
    with pytest.raises(AlignError) as err:
        load_reward(f"{folder / 'two.py'}:score")
    assert str(err.value).endswith("has no 'score' (callables: shown)")


def test_a_reward_that_returns_no_list_is_named() -> None:
    from align.errors import AlignError
    from align.rewards import score_all

    with pytest.raises(AlignError) as err:
        score_all({"m:f": lambda completions, **kw: 1.0}, ["a"], {}, on_error="raise")
    assert str(err.value) == "reward 'm:f' returned float scores for 1 completions"


def test_a_reward_that_fails_on_the_batch_is_retried_row_by_row_with_its_own_columns(caplog) -> None:
    import logging

    from align.rewards import score_all

    def picky(completions, solution, threshold, **kw):
        if len(completions) > 1:
            raise RuntimeError("one at a time")
        if solution[0] == "bad":
            raise ValueError("bad row")
        return [float(solution[0] == "a") * threshold]

    columns = {"solution": ["a", "b", "bad"], "threshold": 0.5}
    with caplog.at_level(logging.WARNING, logger="align.rewards"):
        matrix, errors = score_all({"m:picky": picky}, ["x", "y", "z"], columns)
    assert matrix == [[0.5], [0.0], [None]] and errors == {"m:picky": 1}
    assert caplog.messages == [
        "reward 'm:picky' failed (RuntimeError: one at a time); 1 of 3 scores set to None"
    ]


def test_coordinates_default_to_pixels() -> None:
    from align.rewards import _coordinates_problem

    assert _coordinates_problem({}) is None
    assert _coordinates_problem({"coordinates": "norm1000"}) is None
    assert "one of pixels, norm1000, norm1" in _coordinates_problem({"coordinates": "percent"})


# --- align/rewards/mathcheck.py ---------------------------------------------------------------------------


def test_brace_group_ends_after_its_own_close() -> None:
    from align.rewards.mathcheck import _brace_group

    assert _brace_group("{a{b}c}d", 0, "{", "}") == 7
    assert _brace_group("x(1)", 1, "(", ")") == 4
    assert _brace_group("{never", 0, "{", "}") == 6


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("x^ 2 y", [("2", "y")]),  # spaces before the exponent skipped
        ("x^Xy", [("X", "y")]),  # one token, not a group
        ("x^(2)+1", [("(2)", "+1")]),  # a bracket group closes with its own bracket
        ("x^{2}+1", [("{2}", "+1")]),
        ("x^2+1", [("2", "+1")]),
        ("x^2\t^3", [("2", "\t^3"), ("3", "")]),  # only spaces are skipped after it
    ],
)
def test_exponents_table(text: str, found: list) -> None:
    from align.rewards.mathcheck import _exponents

    assert list(_exponents(text)) == found


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("1+" * 256, None),  # exactly MAX_CHARS characters
        ("1+" * 256 + "1", "longer than 512 characters"),
        ("x^2 ^3", "a power tower"),
        ("x^2X^3", None),
        ("10000 choose 2", "a factorial or binomial of a power or of a number >= 1000"),
        ("1000!", "a factorial or binomial of a power or of a number >= 1000"),
        ("999!", None),
        ("XXXXXXX", None),
        ("(X(X(X(X(X(X(X", "brackets nested deeper than 6"),
        ("()()()()()()()", None),
        ("(()((((((", "brackets nested deeper than 6"),
        ("()((((((", None),
    ],
)
def test_unsafe_reason_bounds_table(text: str, reason) -> None:
    from align.rewards.mathcheck import unsafe_reason

    assert unsafe_reason(text) == reason


def test_call_before_reports_a_missed_deadline() -> None:
    import time

    from align.rewards.mathcheck import _call_before

    assert _call_before(0.05, lambda: time.sleep(2)) == (False, None)
    assert _call_before(1.0, lambda: 7) == (True, 7)


def test_only_math_verifys_timeout_notice_is_dropped() -> None:
    import logging

    from align.rewards.mathcheck import _DropTimeoutNotice

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("math_verify", logging.WARNING, "f", 1, message, None, None)

    notice = _DropTimeoutNotice()
    assert notice.filter(record("Timeout is disabled as timeout_seconds is None")) is False
    assert notice.filter(record("timeout is disabled")) is True
    assert notice.filter(record("something else")) is True


def test_prose_detection_ignores_latex_commands() -> None:
    from align.rewards.mathcheck import _looks_like_prose

    assert _looks_like_prose("the answer is 3") is True
    assert _looks_like_prose("\\frac{1}{2}") is False
    assert _looks_like_prose("\\text{ab}\\text{cd}") is False


class _FakeMathVerify:
    """Records what mathcheck asks of math_verify; parse gives [] for texts in ``empty``."""

    def __init__(self, empty: tuple[str, ...] = ()):
        self.parsed: list[tuple[object, dict]] = []
        self.empty = empty

    def parse(self, text, **options):
        self.parsed.append((text, options))
        return [] if text in self.empty else [text]

    def verify(self, gold, pred, timeout_seconds=None):
        return gold == pred


GOLD_OPTIONS = {"parsing_timeout": None, "extraction_mode": "first_match", "fallback_mode": "no_fallback"}
PRED_OPTIONS = {"parsing_timeout": None, "extraction_mode": "any_match", "fallback_mode": "first_match"}


def test_parse_options_and_delimiters(monkeypatch) -> None:
    import align.rewards.mathcheck as mathcheck

    fake = _FakeMathVerify(empty=("$x^2$",))
    monkeypatch.setattr(mathcheck, "_math_verify", lambda: fake)
    mathcheck._parse("$x^2$", gold=True)  # delimited: parsed as written
    mathcheck._parse("x^2", gold=False)  # bare: wrapped in $…$ first, then as written when that is empty
    mathcheck._parse("the answer is 3", gold=False)  # prose: as written
    assert fake.parsed == [
        ("$x^2$", GOLD_OPTIONS),
        ("$x^2$", PRED_OPTIONS),
        ("x^2", PRED_OPTIONS),
        ("the answer is 3", PRED_OPTIONS),
    ]


def test_math_equal_deadlines(monkeypatch) -> None:
    """parse_gold and math_equal default to 1 s; the prediction gets what is left of ``timeout`` after the
    gold was parsed, and nothing (False) when none is left."""
    import align.rewards.mathcheck as mathcheck

    fake = _FakeMathVerify()
    deadlines: list[float] = []

    def call_before(seconds, fn):
        deadlines.append(seconds)
        return True, fn()

    clock = iter([10.0, 10.25, 20.0, 21.0, 30.0, 31.5])
    monkeypatch.setattr(mathcheck, "_math_verify", lambda: fake)
    monkeypatch.setattr(mathcheck, "_call_before", call_before)
    monkeypatch.setattr(mathcheck.time, "monotonic", lambda: next(clock))
    assert mathcheck.parse_gold("3") == ["$3$"] and deadlines == [1.0]
    assert mathcheck.math_equal("3", "3") is True  # 0.25 s spent on the gold: 0.75 s left
    assert deadlines == [1.0, 1.0, 0.75]
    assert fake.parsed[-1] == ("$3$", PRED_OPTIONS)
    assert mathcheck.math_equal("3", "3", timeout=1.0) is False  # exactly none left: not checked
    assert deadlines == [1.0, 1.0, 0.75, 1.0]
    assert mathcheck.math_equal("3", "3", timeout=5.0) is True  # 1.5 s spent: 3.5 s left
    assert deadlines[-2:] == [5.0, 3.5]


# --- align/grpo/logps.py ----------------------------------------------------------------------------------


def _completions(ids: torch.Tensor, mask: torch.Tensor, prompts: int = 1, g: int = 2):
    from align.grpo.logps import Completions

    return Completions([[1, 2]] * prompts, None, [0] * prompts, ids, mask, g)


def test_completions_refuse_what_cannot_be_scored_naming_the_shapes() -> None:
    cases = [
        (
            torch.zeros(2, 3),
            torch.zeros(2, 4),
            "completion_ids (2, 3) and completion_mask (2, 4) must be the same [rows, length] shape",
        ),
        (
            torch.zeros(2, 3, 1),
            torch.zeros(2, 3, 1),
            "completion_ids (2, 3, 1) and completion_mask (2, 3, 1) must be the same [rows, length] shape",
        ),
        (torch.zeros(2, 0), torch.zeros(2, 0), "completion_ids has no columns: there is nothing to score"),
        (
            torch.zeros(3, 4),
            torch.zeros(3, 4),
            "3 completion rows for 1 prompts x num_generations=2 (expected 2)",
        ),
    ]
    for ids, mask, message in cases:
        with pytest.raises(ValueError) as err:
            _completions(ids, mask)
        assert str(err.value) == message


def test_entropy_is_minus_sum_p_log_p_of_the_scaled_logits(monkeypatch) -> None:
    import align.grpo.logps as logps

    # two tokens at 0 and ln 3 after scaling: p = 1/4, 3/4
    logits = torch.tensor([[[0.0, math.log(3)]]]).repeat(2, 1, 1)
    monkeypatch.setattr(logps, "_completion_logits", lambda *a: logits)
    batch = _completions(torch.tensor([[1], [0]]), torch.ones(2, 1))
    token_logps, entropy = logps.completion_logps_and_entropy(
        None, batch, temperature=1.0, shared_prefix=True
    )
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(entropy, torch.full((2, 1), expected))
    torch.testing.assert_close(token_logps, torch.tensor([[math.log(0.75)], [math.log(0.25)]]))


def test_temperature_zero_scores_unscaled_logits(monkeypatch) -> None:
    from types import SimpleNamespace

    import align.grpo.logps as logps

    raw = torch.tensor([[[1.0, 3.0]]])
    monkeypatch.setattr(logps, "_shared_prefix_logits", lambda *a: raw)
    batch = _completions(torch.tensor([[1], [0]]), torch.ones(2, 1))
    model = SimpleNamespace(device=torch.device("cpu"))
    assert torch.equal(logps._completion_logits(model, batch, 0.0, True), raw)
    assert torch.equal(logps._completion_logits(model, batch, 0.5, True), raw * 2)


def test_checkpointed_shared_prefix_names_the_model_types_it_knows() -> None:
    from types import SimpleNamespace

    from align.errors import AlignError
    from align.grpo.logps import LAYER_LOOP_MODEL_TYPES, _checkpointed_shared_prefix_logits

    model = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(model_type="gpt2")))
    with pytest.raises(AlignError) as err:
        _checkpointed_shared_prefix_logits(model, [[1]], None, [0], torch.zeros(1, 1), torch.ones(1, 1), 1)
    assert str(err.value) == (
        "shared_prefix=True with gradient checkpointing runs the decoder layers itself and knows "
        f"{', '.join(LAYER_LOOP_MODEL_TYPES)}, not language model type 'gpt2': "
        "use shared_prefix=False or turn gradient checkpointing off"
    )


# --- align/grpo/rollout.py --------------------------------------------------------------------------------


def test_skip_pooling_head_turns_off_siglips_head_only(siglip_qwen2, zoo, tmp_path) -> None:
    """SigLIP's attention-pooling head is switched off once (True), and again is a no-op (False); the hidden
    states Llava reads do not change and the pooled output is no longer computed; a CLIP tower has no head."""
    import contextlib
    import io

    from align.assemble import AssembleRecipe, assemble
    from align.checkpoint import load_llava
    from align.config import from_dict
    from align.grpo.rollout import skip_pooling_head

    model, _ = load_llava(siglip_qwen2)
    tower = model.model.vision_tower
    inner = getattr(
        tower, "vision_model", tower
    )  # transformers 5: the SigLIP tower is the vision model itself
    pixels = torch.randn(1, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
    with torch.no_grad():
        before = tower(pixel_values=pixels)
    assert inner.use_head is True and before.pooler_output is not None
    assert skip_pooling_head(model) is True and inner.use_head is False
    assert skip_pooling_head(model) is False and inner.use_head is False
    with torch.no_grad():
        after = tower(pixel_values=pixels)
    assert torch.equal(before.last_hidden_state, after.last_hidden_state) and after.pooler_output is None
    recipe = {
        "kind": "assemble",
        "vision": {"source": "hf", "name_or_path": str(zoo / "clip-hf")},
        "llm": {"name_or_path": str(zoo / "qwen2-r1")},
        "output_dir": str(tmp_path / "clip"),
    }
    with contextlib.redirect_stdout(io.StringIO()):
        clip, _ = load_llava(assemble(from_dict(AssembleRecipe, recipe)))
    assert skip_pooling_head(clip) is False


def _batch(widths_images: list[tuple[int, int]], g: int, width: int, first_id: int, logps: bool = True):
    """A scored RolloutBatch of questions with (images) each, ``g`` completions of ``width`` tokens; every
    value is distinct so that a misplaced row or pixel shows."""
    from align.data.sample import Sample
    from align.grpo.rollout import RolloutBatch
    from align.grpo.sampler import Rollout

    n_q = len(widths_images)
    n = n_q * g
    n_images = sum(k for _, k in widths_images)
    ids = torch.arange(first_id, first_id + n * width).reshape(n, width)
    rollout = Rollout(
        ids,
        torch.ones(n, width, dtype=torch.long),
        torch.full((n,), width),
        torch.zeros(n, dtype=torch.bool),
        -torch.rand(n, width) if logps else None,
    )
    pixels = (
        torch.arange(n_images * 3, dtype=torch.float).reshape(n_images, 3, 1, 1) + first_id
        if n_images
        else None
    )
    b = RolloutBatch(
        [Sample("s", f"q{first_id + q}", [{"role": "user", "content": "q"}]) for q in range(n_q)],
        [[first_id + q] for q in range(n_q)],
        pixels,
        [k for _, k in widths_images],
        [[(w, w)] * k for w, k in widths_images],
        rollout,
    )
    b.texts = [f"t{first_id + i}" for i in range(n)]
    b.scores = [[float(i)] for i in range(n)]
    b.per_func = torch.arange(n, dtype=torch.float).unsqueeze(1)
    b.rewards = torch.arange(n, dtype=torch.float)
    b.mask = torch.ones(n, width)
    b.ref_logps = -torch.rand(n, width) if logps else None
    return b


def test_split_groups_gives_each_question_its_own_images() -> None:
    from align.grpo.rollout import split_groups

    b = _batch([(8, 1), (9, 2), (10, 1)], g=2, width=3, first_id=0)
    pieces = split_groups(b, 2)
    assert [p.images_per_prompt for p in pieces] == [[1], [2], [1]]
    assert torch.equal(pieces[0].pixels, b.pixels[0:1])
    assert torch.equal(pieces[1].pixels, b.pixels[1:3])
    assert torch.equal(pieces[2].pixels, b.pixels[3:4])
    assert torch.equal(pieces[2].rollout.completion_ids, b.rollout.completion_ids[4:6])


def test_merge_groups_pads_to_the_widest_piece_and_keeps_everything_in_order() -> None:
    from align.grpo.rollout import merge_groups, split_groups

    narrow = split_groups(_batch([(8, 1), (9, 0)], g=2, width=3, first_id=0), 2)
    wide = split_groups(_batch([(10, 2)], g=2, width=5, first_id=100), 2)
    merged = merge_groups([narrow[1], wide[0], narrow[0]], pad_token_id=-7)
    assert merged.sizes == [[], [(10, 10), (10, 10)], [(8, 8)]]
    assert merged.images_per_prompt == [0, 2, 1]
    assert torch.equal(merged.pixels, torch.cat([wide[0].pixels, narrow[0].pixels]))
    ids = merged.rollout.completion_ids
    assert ids.shape == (6, 5) and torch.equal(ids[:2, 3:], torch.full((2, 2), -7))
    assert torch.equal(merged.rollout.completion_mask[:2, 3:], torch.zeros(2, 2, dtype=torch.long))
    assert torch.equal(merged.mask[:2, 3:], torch.zeros(2, 2))
    # log-probs pad with 0, as the sampler pads them
    assert torch.equal(merged.rollout.logps[:2, 3:], torch.zeros(2, 2))
    assert torch.equal(merged.ref_logps[:2, 3:], torch.zeros(2, 2))
    assert torch.equal(merged.ref_logps[2:4], wide[0].ref_logps)
    assert merged.texts == [*narrow[1].texts, *wide[0].texts, *narrow[0].texts]
    alone = merge_groups([narrow[1]], pad_token_id=-7)  # one piece, no images
    assert alone.pixels is None and torch.equal(alone.rollout.logps, narrow[1].rollout.logps)
    plain = split_groups(_batch([(8, 0)], g=2, width=3, first_id=0, logps=False), 2)
    assert merge_groups(plain, pad_token_id=0).ref_logps is None


def test_reward_columns_are_the_rows_columns_per_completion() -> None:
    """Question-major, each value repeated for the question's G completions; the gold of a conversation row is
    its last assistant turn; accu_reward_method only when some row has one."""
    from align.data.sample import Sample
    from align.grpo.rollout import reward_columns
    from align.grpo.sampler import Rollout

    rows = [
        Sample(
            "s",
            "a:1",
            [{"role": "user", "content": "<image>q"}],
            ["x.png"],
            answer="3",
            meta={"box": [1, 2, 3, 4]},
        ),
        Sample(
            "s",
            "a:2",
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<answer>B</answer>"}],
            meta={"family": "choice", "accu_reward_method": "mcq"},
        ),
    ]
    rollout = Rollout(
        torch.tensor([[5, 6, 0], [7, 0, 0], [8, 9, 1], [2, 0, 0]]),
        torch.ones(4, 3, dtype=torch.long),
        torch.tensor([2, 1, 3, 1]),
        torch.zeros(4, dtype=torch.bool),
    )
    columns = reward_columns(rows, [[(64, 48)], []], 2, rollout)
    assert columns == {
        "accu_reward_method": [None, None, "mcq", "mcq"],
        "solution": ["3", "3", "B", "B"],
        "box": [[1, 2, 3, 4], [1, 2, 3, 4], None, None],
        "image_size": [(64, 48), (64, 48), None, None],
        "family": [None, None, "choice", "choice"],
        "completion_ids": [[5, 6], [7], [8, 9, 1], [2]],
    }
    without = reward_columns(rows[:1], [[(64, 48)]], 2, rollout)
    assert "accu_reward_method" not in without


def test_lora_reference_is_the_policy_without_adapters_at_the_sampling_temperature(siglip_qwen2) -> None:
    """With LoRA the reference is the policy with its adapters off, scored at the recipe's temperature; a
    policy without adapters and no reference model is a setup error."""
    from align.checkpoint import load_llava
    from align.grpo.logps import completion_logps
    from align.grpo.rollout import RolloutBatch, reference_logps
    from align.grpo.sampler import Rollout
    from align.lora import ALL_LINEAR, apply_lora
    from align.model import llava_of

    base, _ = load_llava(siglip_qwen2)
    ids = torch.tensor([[11, 12, 13], [14, 15, 0]])
    b = RolloutBatch(
        [None], [[1, 5, 6, 7]], None, [0], [[]],
        Rollout(ids, torch.tensor([[1, 1, 1], [1, 1, 0]]), torch.tensor([3, 2]), torch.zeros(2, dtype=torch.bool)),
    )  # fmt: skip
    with torch.no_grad():
        expected = completion_logps(base, b.completions(), temperature=0.7, shared_prefix=True)
    with pytest.raises(
        ValueError, match=r"^reference_logps: without a reference model the policy must carry LoRA adapters$"
    ):
        reference_logps(None, base, b, 0.7, True)
    policy = apply_lora(base, 4, 8, 0.0, [ALL_LINEAR])
    with torch.no_grad():  # adapters that change the output: the reference must not see them
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    got = reference_logps(None, policy, b, 0.7, True)
    assert torch.allclose(got, expected, atol=1e-5)
    with torch.no_grad():
        adapted = completion_logps(llava_of(policy), b.completions(), temperature=0.7, shared_prefix=True)
    assert not torch.allclose(adapted, expected, atol=1e-3)


class _OneProcess:
    """The engine's Dist reductions for a single process: sums and means of one rank are the values."""

    def all_sum(self, value):
        return value

    def all_reduce_mean(self, value):
        return value


@pytest.mark.parametrize(
    ("rewards", "std"),
    [
        ([1.0, 3.0, float("nan"), 5.0], 2.0),  # mean 3, squares 4 + 0 + 4 over n - 1 = 2
        ([1.0, 3.0], 2.0**0.5),
        ([7.0, float("nan")], 0.0),  # one value: no spread
        ([float("nan")], 0.0),
    ],
)
def test_global_std_is_the_sample_std_of_the_scored_rewards(rewards: list, std: float) -> None:
    from align.grpo.rollout import global_std

    assert global_std(_OneProcess(), torch.tensor(rewards)) == pytest.approx(std)


def test_rollout_metrics_row() -> None:
    """Every logged number of a round, worked out by hand: per-function means (NaN left out; 0 when all are
    NaN) and batch stds, TRL's reward_std (the mean of the group stds), the zero-std share, lengths."""
    from align.grpo.rollout import rollout_metrics

    b = _batch([(8, 0), (8, 0)], g=2, width=3, first_id=0)
    nan = float("nan")
    b.per_func = torch.tensor([[1.0, nan], [3.0, nan], [2.0, nan], [2.0, nan]])
    b.rewards = torch.tensor([1.0, 3.0, 2.0, 2.0])
    b.rollout.lengths = torch.tensor([1, 2, 3, 2])
    b.rollout.is_truncated = torch.tensor([False, False, True, False])
    row = rollout_metrics(_OneProcess(), [b], ["a", "b"], {"a": 0, "b": 4}, [False, True], 2)
    assert row == pytest.approx(
        {
            "reward/a": 2.0,
            "reward_std/a": (2 / 3) ** 0.5,  # squares 1 + 1 + 0 + 0 over 3
            "reward_errors/a": 0,
            "reward/b": 0.0,
            "reward_std/b": 0.0,
            "reward_errors/b": 4,
            "reward": 2.0,
            "reward_std": (2**0.5 + 0.0) / 2,  # groups [1, 3] and [2, 2]
            "frac_reward_zero_std": 0.5,
            "completion_length": 2.0,
            "completion_length_max": 3.0,
            "truncated_share": 0.25,
            "completion_tokens": 8.0,
        }
    )


# --- align/export.py --------------------------------------------------------------------------------------


def test_source_dtype_reads_the_text_config_then_the_config() -> None:
    """The export keeps the source's dtype: the text model's, else the top-level one, else fp32; a config
    that lacks the attribute altogether is fp32, not an error."""
    from types import SimpleNamespace as NS

    from align.export import _source_dtype

    assert _source_dtype(NS(text_config=NS(dtype="bfloat16"), dtype=None)) == torch.bfloat16
    assert _source_dtype(NS(text_config=NS(dtype=None), dtype="bfloat16")) == torch.bfloat16
    assert _source_dtype(NS(text_config=NS(dtype="float32"), dtype="bfloat16")) == torch.float32
    assert _source_dtype(NS(text_config=NS(), dtype=torch.bfloat16)) == torch.bfloat16
    assert _source_dtype(NS(text_config=NS())) == torch.float32


def test_parse_size_accepts_one_byte_and_pickle_files_are_found_by_suffix(tmp_path) -> None:
    from align.export import parse_size, pickle_files

    assert parse_size("1") == 1
    assert parse_size("2kib") == 2048
    for name in ("model.safetensors", "a.bin", "sub/b.PT", "c.pkl", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert [p.relative_to(tmp_path).as_posix() for p in pickle_files(tmp_path)] == [
        "a.bin",
        "c.pkl",
        "sub/b.PT",
    ]


def test_model_card_origin_lines_name_each_component() -> None:
    from types import SimpleNamespace

    from align.export import _origin

    config = SimpleNamespace(
        vision_config=SimpleNamespace(model_type="siglip_vision_model", _name_or_path="/data/m/siglip"),
        text_config=SimpleNamespace(model_type="qwen2", _name_or_path=""),
    )
    assembled = {
        "vision": {"source": "open_clip", "name_or_path": "ViT-B-16", "pretrained": "laion2b"},
        "llm": {"name_or_path": "org/llm"},
    }
    assert (
        _origin(config, assembled, "vision")
        == "`siglip_vision_model` from open_clip `ViT-B-16`, pretrained `laion2b`"
    )
    assert _origin(config, {"vision": {"source": "hf", "name_or_path": "a/b"}}, "vision") == (
        "`siglip_vision_model` from hf `a/b`"
    )
    assert _origin(config, assembled, "llm") == "`qwen2` from `org/llm`"
    assert _origin(config, None, "vision") == "`siglip_vision_model` from `…/m/siglip`"
    assert _origin(config, None, "llm") == "`qwen2`"


def test_model_card_stage_lines_as_written() -> None:
    from align.export import StageRecord, _stage_lines

    assemble = StageRecord(
        model_dir=Path("runs/x/assembled"),
        recipe={
            "kind": "assemble",
            "vision": {"source": "hf", "name_or_path": "v", "feature_layer": -2},
            "llm": {"name_or_path": "l"},
            "seed": 3,
        },
        run_dir=None,
        summary=None,
        final_metrics=None,
    )
    assert _stage_lines(1, assemble)[:6] == [
        "### 1. assemble: `runs/x/assembled`",
        "",
        "- vision encoder: hf `v` (feature layer -2, select strategy auto)",
        "- language model: `l`",
        "- projector: mlp2x_gelu, seed 3",
        "",
    ]
    sft = StageRecord(
        model_dir=Path("runs/x/sft/model"),
        recipe={
            "kind": "sft",
            "model": "runs/x/assembled",
            "data": {
                "sources": [
                    {"name": "a", "format": "llava", "path": "a.json", "weight": 0.5},
                    "junk",
                    {"name": "b"},
                ]
            },
            "lora": {"r": 8, "alpha": 16},
        },
        run_dir=Path("runs/x/sft"),
        summary={"steps": 10, "wall_time_s": 12.345678, "other": 1, "precision": "bf16"},
        final_metrics={"step": 10, "loss": 0.123456, "lr": 2e-5},
        note="no recipe above",
    )
    assert _stage_lines(2, sft)[:9] == [
        "### 2. sft: `runs/x/sft`",
        "",
        "- input model: `runs/x/assembled`",
        "- data: `a`: llava `a.json`, sampling all, weight 0.5",
        "- data: `b`: None `None`, sampling all",
        "- LoRA r=8 alpha=16 (merged into the weights)",
        "- final metrics (step 10): loss 0.1235, lr 2e-05",
        "- run: steps 10, wall_time_s 12.35, precision bf16",
        "- lineage stops here: no recipe above",
    ]
    checkpoint = StageRecord(Path("/abs/dl/llava"), None, None, None, None)
    assert _stage_lines(1, checkpoint) == [
        "### 1. checkpoint: `…/dl/llava`",
        "",
        "- a model folder without a recipe (e.g. a published llava-hf checkpoint)",
        "",
    ]


def test_export_arguments_and_their_help() -> None:
    import argparse

    from align.export import DTYPES, add_arguments

    parser = argparse.ArgumentParser(prog="align export")
    add_arguments(parser)
    args = parser.parse_args(["src", "--out", "o"])
    assert (args.source, args.out, args.dtype, args.max_shard_size) == ("src", "o", None, "5GB")
    with pytest.raises(SystemExit):
        parser.parse_args(["src"])  # --out is required
    helps = {a.dest: (a.help, a.choices) for a in parser._actions}
    assert helps["source"] == ("a model folder or a stage output folder (its model/ is exported)", None)
    assert helps["out"] == ("the folder to write (replaced atomically if it exists)", None)
    assert helps["dtype"] == ("default: the source's dtype", sorted(DTYPES))
    assert helps["max_shard_size"] == ("largest safetensors file, e.g. 5GB, 500MB, 2GiB (default 5GB)", None)


# --- align/data/encode.py ---------------------------------------------------------------------------------


def test_strip_prefill_with_whitespace_around_the_tag() -> None:
    from align.data.encode import _strip_prefill

    assert _strip_prefill("\n<think>\n\nreasoning</think>a ", "<think>\n") == "reasoning</think>a "


def test_fit_all_returns_the_fitted_rows_and_counts_only_new_cuts() -> None:
    """Rows of 6 tokens (prompt 2) at max_length 4: cut by 2 each. A row already cut by 1 counts 2 more, not 3."""
    import dataclasses

    from align.data.encode import fit_all

    a = dataclasses.replace(_row(6), prompt_length=2)
    b = dataclasses.replace(_row(6), prompt_length=2, truncated=1)
    kept, report = fit_all([a, b], max_length=4, policy="drop")
    assert [k.input_ids for k in kept] == [[1, 2, 3, 4], [1, 2, 3, 4]]
    assert (report.kept, report.truncated, report.cut_tokens, report.dropped) == (2, 2, 4, 0)
    dropped = [dataclasses.replace(_row(5), prompt_length=5, origin=f"f:{i}") for i in range(5)]
    _, report = fit_all(dropped, max_length=4, policy="drop")
    assert report.dropped_origins == ["f:0", "f:1", "f:2"]  # examples=3 by default
    assert str(report) == (
        "max_length 4: kept 0 rows, truncated the target of 0 (0 tokens), dropped 5 (e.g. f:0, f:1, f:2)"
    )


# --- align/grpo/sampler.py --------------------------------------------------------------------------------


def _sampler_llava(image_token_id: int = 299):
    """A tiny SigLIP + Qwen2 Llava (16 tokens per 32 x 32 image) whose image token is ``image_token_id``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        text_config=Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=300,
        ),
        image_token_id=image_token_id,
        image_seq_length=16,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(config).eval()


SETTINGS = dict(num_generations=2, max_new_tokens=8, temperature=1.0, eos_token_ids=[3], pad_token_id=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_generations": 0}, "num_generations must be >= 1"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"num_generations": 0, "top_k": -1}, "num_generations must be >= 1; top_k must be >= 0"),
    ],
)
def test_sampling_settings_refuse_each_bad_value_with_the_whole_message(
    overrides: dict, message: str
) -> None:
    from align.grpo.sampler import SamplingSettings

    values = SETTINGS | {"top_p": None, "top_k": None} | overrides
    got = (
        f"(got num_generations={values['num_generations']}, max_new_tokens={values['max_new_tokens']}, "
        f"temperature={values['temperature']}, top_p={values['top_p']}, top_k={values['top_k']})"
    )
    with pytest.raises(ValueError) as raised:
        SamplingSettings(**values)
    assert str(raised.value) == f"{message} {got}"


def test_sampling_settings_accept_the_edges_and_keep_eos_as_a_tuple() -> None:
    from align.grpo.sampler import SamplingSettings

    for edge in ({"max_new_tokens": 1}, {"top_p": 1.0}, {"top_p": None}, {"top_k": 0}, {"temperature": 0.0}):
        settings = SamplingSettings(**(SETTINGS | {"eos_token_ids": [3, 4]} | edge))
        assert settings.eos_token_ids == (3, 4)
        hash(settings)  # frozen and made of tuples: usable as a key


def test_check_prompts_messages_name_the_prompt() -> None:
    from align.errors import AlignError
    from align.grpo.sampler import check_prompts

    with pytest.raises(ValueError, match=r"^prompt_ids is empty$"):
        check_prompts([], None, [])
    with pytest.raises(ValueError, match=r"^images_per_prompt has 1 entries for 2 prompts$"):
        check_prompts([[1], [2]], None, [0])
    with pytest.raises(AlignError, match=r"^prompt 1 has no tokens \(2 empty prompt\(s\) in the batch\)$"):
        check_prompts([[1], [], []], None, [0, 0, 0])


@pytest.mark.parametrize("image_token_id", [0, 1, 2, 7])
def test_the_filler_token_is_never_the_image_token(image_token_id: int) -> None:
    from align.grpo.sampler import filler_token

    assert filler_token(image_token_id) != image_token_id


def test_image_tokens_without_images_name_the_first_prompt_that_has_them() -> None:
    from align.errors import AlignError
    from align.grpo.sampler import encode_images

    model = _sampler_llava()
    ids = torch.tensor([[5, 6, 7], [299, 299, 8], [299, 9, 10]])
    with pytest.raises(
        AlignError, match=r"^prompt 1 has 2 image tokens \(id 299\) but no images were given$"
    ):
        encode_images(model, ids, None, [0, 0, 0])


def test_images_of_different_sizes_are_matched_to_their_own_prompts(monkeypatch) -> None:
    """A tower whose images give different feature counts (image i: i + 1 rows): each prompt's image tokens
    must match the sum over its own images, read from where the previous prompt's images end."""
    from align.errors import AlignError
    from align.grpo import sampler

    monkeypatch.setattr(
        sampler,
        "image_features",
        lambda model, pixels: [torch.zeros(i + 1, 4) for i in range(pixels.shape[0])],
    )
    model = _sampler_llava()
    images = [2, 1, 1]  # image rows 1 + 2, then 3, then 4
    ids = torch.zeros(3, 8, dtype=torch.long)
    for row, n in enumerate([3, 3, 4]):
        ids[row, :n] = 299
    out = sampler.encode_images(model, ids, torch.zeros(4, 3, 32, 32), images)
    assert [f.shape[0] for f in out["image"].pooler_output] == [1, 2, 3, 4]
    ids[2, 3] = 5
    with pytest.raises(
        AlignError, match=r"^prompt 2 has 3 image tokens \(id 299\) but its 1 image\(s\) give 4 "
    ):
        sampler.encode_images(model, ids, torch.zeros(4, 3, 32, 32), images)


def test_a_bf16_model_takes_fp32_pixels_in_the_sampler_and_the_blank_image() -> None:
    """On GPU the model is bf16 while the processor gives fp32 pixels: both image paths give bf16 features.
    (The transformers towers also cast inside their patch embedding, so this holds even without our casts.)"""
    from align.grpo.sampler import blank_image_term, encode_images, run_tower_on_text_only

    model = _sampler_llava().to(torch.bfloat16)
    ids = torch.tensor([[5, *[299] * 16, 6]])
    out = encode_images(model, ids, torch.randn(1, 3, 32, 32), [1])
    assert out["image"].pooler_output[0].dtype == torch.bfloat16
    run_tower_on_text_only(model)
    zero = blank_image_term(model)
    assert zero.dtype == torch.bfloat16 and zero.item() == 0.0


def test_left_padding_with_image_token_zero_is_not_read_as_image_tokens() -> None:
    """With image token id 0 the left padding must not be 0: Llava would count the padding as image tokens.
    The padded prefill of a short prompt equals its prefill alone."""
    from align.grpo.sampler import prefill

    model = _sampler_llava(image_token_id=0)
    image = [0] * 16
    prompts = [[5, *image, 6, 7, 8, 9, 10, 11], [12, *image, 13]]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        both = prefill(model, prompts, pixels, [1, 1])
        alone = prefill(model, prompts[1:], pixels[1:], [1])
    assert torch.allclose(both.last_logits[1], alone.last_logits[0], atol=1e-5)
    assert both.next_position.tolist() == [23, 18]


def test_an_image_prompt_runs_the_tower_once_when_text_only_prompts_run_it_too() -> None:
    """``run_tower_on_text_only`` adds a blank image's 0 x features to text-only batches only: a batch with
    images runs the tower once, on its own images."""
    from align.grpo.sampler import prefill, run_tower_on_text_only

    model = _sampler_llava()
    run_tower_on_text_only(model)
    calls: list[int] = []
    hook = model.model.vision_tower.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        with torch.no_grad():
            prefill(model, [[5, *[299] * 16, 6]], torch.randn(1, 3, 32, 32), [1])
            prefill(model, [[5, 6, 7]], None, [0])
    finally:
        hook.remove()
    assert calls == [1, 1]


def test_top_p_keeps_every_token_up_to_an_exact_tie_as_hf_does() -> None:
    """Four equal logits: probabilities 1/4 exactly; top_p 0.5 drops the two whose cumulative sum reaches
    1 - top_p (``<=``, HF's rule), keeping two; ``top_p=None`` keeps all."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from align.grpo.sampler import warp_logits

    logits = torch.zeros(2, 4)
    warped = warp_logits(logits, 1.0, None, 0.5)
    assert torch.isfinite(warped).sum(-1).tolist() == [2, 2]
    assert torch.equal(warped, TopPLogitsWarper(0.5)(None, logits.clone()))
    assert torch.equal(warp_logits(logits, 1.0, None, None), logits)
    assert torch.equal(warp_logits(logits, 1.0, 0, None), logits)


def test_draw_scales_the_uniform_by_an_unnormalised_rows_total() -> None:
    from align.grpo.sampler import draw

    probs = torch.tensor([[1.0, 3.0]]).repeat(4000, 1)  # total 4: token 1 three times in four
    share = draw(probs, torch.Generator().manual_seed(0)).float().mean().item()
    assert abs(share - 0.75) < 0.03  # 3 standard errors of 4000 draws: 0.021
