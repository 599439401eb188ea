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
    """test_sampler.py's tiny SigLIP + Qwen2 Llava (16 tokens per 32 x 32 image, image token 299), its image
    token set to ``image_token_id`` (Llava reads it from the config at each forward)."""
    from test_sampler import (
        _tiny_llava,
    )  # tests/ is on sys.path: pytest's rootdir-relative import of test files

    model = _tiny_llava("siglip")
    model.config.image_token_id = image_token_id
    return model


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


# --- align/checkpoint.py ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "canonical"),
    [
        ("model.vision_tower.encoder.w", "vision_tower.vision_model.encoder.w"),
        ("model.vision_tower.vision_model.encoder.w", "vision_tower.vision_model.encoder.w"),
        ("model.language_model.vision_model.w", "language_model.model.vision_model.w"),
        ("model.multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.weight"),
        ("lm_head.weight", "language_model.lm_head.weight"),
        ("model.image_newline", "image_newline"),
    ],
)
def test_canonical_key_table(key: str, canonical: str) -> None:
    from align.checkpoint import canonical_key

    assert canonical_key(key) == canonical


def test_canonical_key_refuses_a_foreign_parameter() -> None:
    from align.checkpoint import canonical_key
    from align.errors import AlignError

    with pytest.raises(AlignError) as raised:
        canonical_key("encoder.w")
    assert str(raised.value) == (
        "parameter 'encoder.w' belongs to no Llava component (vision tower, projector, language model)"
    )


def test_canonical_state_dict_casts_floating_tensors_only_and_copies() -> None:
    from align.checkpoint import canonical_state_dict

    weight = torch.ones(2, 2)
    state = {"lm_head.weight": weight, "model.language_model.ids": torch.arange(3)}
    cast = canonical_state_dict(state, torch.bfloat16)
    assert cast["language_model.lm_head.weight"].dtype == torch.bfloat16
    assert cast["language_model.model.ids"].dtype == torch.int64
    kept = canonical_state_dict(state)
    assert kept["language_model.lm_head.weight"].dtype == torch.float32
    weight.add_(1.0)
    assert kept["language_model.lm_head.weight"].eq(1.0).all()  # a copy, not a view of the model's tensor


def _tensors(*numels: int) -> dict:
    return {name: torch.zeros(n) for name, n in zip("dcba", numels, strict=False)}  # 4 bytes per element


@pytest.mark.parametrize(
    ("numels", "max_bytes", "shards"),
    [
        ((4, 4, 4, 4), 32, [["a", "b"], ["c", "d"]]),  # full shards: 16 + 16 == 32 fits exactly
        ((4, 4, 2), 32, [["b", "c"], ["d"]]),
        ((4, 12, 2, 2), 32, [["a", "b"], ["c"], ["d"]]),  # c alone is larger than the limit
        ((1, 1), 4, [["c"], ["d"]]),
    ],
)
def test_shards_fill_each_file_up_to_the_limit_in_name_order(numels, max_bytes: int, shards) -> None:
    from align.checkpoint import _shards

    assert [sorted(shard) for shard in _shards(_tensors(*numels), max_bytes)] == shards


def test_write_weights_one_file_and_a_sharded_index(tmp_path) -> None:
    import json

    from safetensors import safe_open

    from align.checkpoint import weight_names, write_weights

    tensors = {name: torch.full((4,), float(i)) for i, name in enumerate("abcd")}
    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir()
    many.mkdir()
    write_weights(tensors, one)
    assert sorted(p.name for p in one.iterdir()) == ["model.safetensors"]
    with safe_open(str(one / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert weight_names(one) == ["a", "b", "c", "d"]

    write_weights(tensors, many, max_shard_bytes=32)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert sorted(p.name for p in many.iterdir()) == [*names, "model.safetensors.index.json"]
    index = {
        "metadata": {"total_size": 64},
        "weight_map": {"a": names[0], "b": names[0], "c": names[1], "d": names[1]},
    }
    assert (many / "model.safetensors.index.json").read_text() == json.dumps(index, indent=2, sort_keys=True)
    for name, keys in zip(names, (["a", "b"], ["c", "d"]), strict=True):
        with safe_open(str(many / name), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert sorted(f.keys()) == keys
            assert all(torch.equal(f.get_tensor(k), tensors[k]) for k in keys)
    assert weight_names(many) == ["a", "b", "c", "d"]


def test_weight_names_of_a_folder_without_weights(tmp_path) -> None:
    from align.checkpoint import weight_names
    from align.errors import AlignError

    with pytest.raises(AlignError) as raised:
        weight_names(tmp_path)
    assert str(raised.value) == f"{tmp_path}: no model.safetensors or model.safetensors.index.json"


def test_current_umask_reads_proc_without_setting_one(monkeypatch) -> None:
    import os

    from align import checkpoint

    mask = os.umask(0o027)
    try:
        calls: list = []
        monkeypatch.setattr(checkpoint.os, "umask", lambda m: calls.append(m) or 0o027)
        assert checkpoint.current_umask() == 0o027
        assert calls == []  # /proc/self/status answered
    finally:
        monkeypatch.undo()
        os.umask(mask)


def test_current_umask_without_proc_sets_it_back(monkeypatch) -> None:
    import os
    from pathlib import Path

    from align import checkpoint

    real_read = Path.read_text

    def no_proc(self, *args, **kwargs):
        if str(self) == "/proc/self/status":
            raise OSError("no /proc")
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", no_proc)
    mask = os.umask(0o027)
    try:
        assert checkpoint.current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # left as it was
    finally:
        os.umask(mask)


def test_follow_umask_gives_every_nested_path_the_umasks_modes(tmp_path) -> None:
    import os

    from align.checkpoint import follow_umask

    root = tmp_path / "folder"
    (root / "sub" / "deeper").mkdir(parents=True)
    files = [root / f"f{i}" for i in range(12)] + [root / "sub" / "g", root / "sub" / "deeper" / "h"]
    for path in files:
        path.write_text("x")
        path.chmod(0o600)
    for path in (root / "sub" / "deeper", root / "sub", root):
        path.chmod(0o700)
    (root / "link").symlink_to(root / "f0")
    mask = os.umask(0o002)  # leaves the other-execute bit: a file given 0o667 would show it
    try:
        follow_umask(root)
    finally:
        os.umask(mask)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o664)}
    folders = (root, root / "sub", root / "sub" / "deeper")
    assert {oct(p.stat().st_mode & 0o777) for p in folders} == {oct(0o775)}


def test_content_parts_template_text_and_reapplying_it() -> None:
    from importlib import resources

    from align.checkpoint import content_parts_template

    preamble = (resources.files("align") / "templates" / "content_parts.jinja").read_text(encoding="utf-8")
    original = "{{ messages[0]['content'] }}"
    once = content_parts_template(original, "<图像>")
    assert once == '{%- set align_image_token = "<图像>" -%}\n' + preamble.rstrip() + original
    assert content_parts_template(once, "<image>") == content_parts_template(original, "<image>")


class _Processor:
    """What save_processor touches: chat templates, the image token, and a save that records them."""

    def __init__(self, own: str | None, tokenizers: str | None):
        from types import SimpleNamespace

        self.chat_template, self.image_token = own, "<image>"
        self.tokenizer = SimpleNamespace(chat_template=tokenizers)
        self.saved: list = []

    def save_pretrained(self, folder) -> None:
        self.saved.append((folder, self.chat_template, self.tokenizer.chat_template))


@pytest.mark.parametrize(("own", "tokenizers"), [("P{{ x }}", "T{{ x }}"), (None, "T{{ x }}"), (None, None)])
def test_save_processor_writes_the_content_parts_template_and_restores_it(tmp_path, own, tokenizers) -> None:
    from align.checkpoint import content_parts_template, save_processor

    processor = _Processor(own, tokenizers)
    save_processor(processor, tmp_path)
    template = own or tokenizers
    written = content_parts_template(template, "<image>") if template else None
    assert processor.saved == [(tmp_path, written, written if template else tokenizers)]
    assert (processor.chat_template, processor.tokenizer.chat_template) == (own, tokenizers)


def test_save_processor_of_a_processor_without_a_chat_template_attribute(tmp_path) -> None:
    from types import SimpleNamespace

    from align.checkpoint import save_processor

    saved: list = []
    processor = SimpleNamespace(tokenizer=SimpleNamespace(chat_template=None), save_pretrained=saved.append)
    save_processor(processor, tmp_path)
    assert saved == [tmp_path]


def test_save_llava_names_the_architecture_casts_shards_and_writes_the_generation_config(tmp_path) -> None:
    import json

    from safetensors import safe_open
    from transformers import GenerationConfig, LlavaConfig

    from align.checkpoint import save_llava

    state = {"lm_head.weight": torch.ones(4, 4), "model.multi_modal_projector.b": torch.ones(4)}
    plain = save_llava(tmp_path / "plain", config=LlavaConfig(), state_dict=state)
    assert json.loads((plain / "config.json").read_text())["architectures"] == [
        "LlavaForConditionalGeneration"
    ]
    assert not (plain / "generation_config.json").exists()
    with safe_open(str(plain / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("language_model.lm_head.weight").dtype == torch.float32
    cast = save_llava(
        tmp_path / "cast",
        config=LlavaConfig(),
        state_dict=state,
        dtype=torch.bfloat16,
        max_shard_bytes=32,  # the bf16 head is 32 bytes: the projector's bias goes to a second file
        generation_config=GenerationConfig(eos_token_id=7),
    )
    assert json.loads((cast / "generation_config.json").read_text())["eos_token_id"] == 7
    assert (cast / "model.safetensors.index.json").exists()
    with safe_open(str(cast / "model-00001-of-00002.safetensors"), framework="pt") as f:
        names = f.keys()
        assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}


def _config_folder(path, config, weights: bool = False):
    import json

    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights:
        save_file({"w": torch.zeros(1)}, str(path / "model.safetensors"))
    return path


def test_read_model_config_messages(tmp_path) -> None:
    from align.checkpoint import read_model_config
    from align.errors import AlignError

    cases = {
        "broken": ("{", r"^{p}: not valid JSON \(Expecting property name"),
        "keys": (
            {f"k{i}": i for i in range(10)},
            r"^{p}: no model_type \(found \['k0', 'k1', 'k2', 'k3', 'k4', "
            r"'k5', 'k6', 'k7'\]\); not a Hugging Face model folder$",
        ),
        "list": ("[1, 2]", r"^{p}: no model_type \(found list\); not a Hugging Face model folder$"),
    }
    for name, (config, pattern) in cases.items():
        folder = _config_folder(tmp_path / name, config)
        with pytest.raises(AlignError, match=pattern.replace("{p}", str(folder / "config.json"))):
            read_model_config(folder)


def test_check_weight_files_messages(tmp_path) -> None:
    from align.checkpoint import check_weight_files
    from align.errors import AlignError

    (tmp_path / "a.BIN").write_text("x")
    (tmp_path / "b.pt").write_text("x")
    with pytest.raises(AlignError) as raised:
        check_weight_files(tmp_path)
    assert str(raised.value) == (
        f"{tmp_path}: holds only pickle weights (a.BIN, b.pt); pickle weights are not loaded; convert to "
        "safetensors (load it where you trust it and save_pretrained(..., safe_serialization=True))"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AlignError) as raised:
        check_weight_files(empty)
    assert str(raised.value) == f"{empty}: no weights (no *.safetensors file)"


def test_resolve_model_folder_reads_a_stage_outputs_model_and_says_why_a_type_is_wrong(tmp_path) -> None:
    from align.checkpoint import resolve_model_folder
    from align.errors import AlignError

    run = tmp_path / "run"
    model = _config_folder(run / "model", {"model_type": "llava"}, weights=True)
    assert resolve_model_folder(run) == model
    expected = {
        "qwen2": "; this is a language model: build a Llava folder from it with `align assemble` first",
        "siglip_vision_model": "",
        "idefics3": "; idefics3 folders (projector.type pixel_shuffle) load in transformers and vLLM as they are, "
        "but align's stages train and run Llava folders only (`align chat` runs them): "
        "assemble with an mlp2x_<act> projector to train",
    }
    for model_type, hint in expected.items():
        folder = _config_folder(tmp_path / model_type, {"model_type": model_type}, weights=True)
        with pytest.raises(AlignError) as raised:
            resolve_model_folder(folder)
        assert str(raised.value) == f"{folder}: model_type is {model_type!r}, expected 'llava'{hint}"
    folder = tmp_path / "idefics3"
    with pytest.raises(AlignError) as raised:
        resolve_model_folder(folder, expect="llava_next")
    assert str(raised.value) == f"{folder}: model_type is 'idefics3', expected 'llava_next'"


@pytest.mark.parametrize(
    ("files", "kind"),
    [
        ({"metrics.jsonl": ""}, "STAGE"),
        ({"recipe.resolved.yaml": "lr: 1"}, "STAGE"),
        ({"recipe.resolved.yaml": "kind: [sft"}, "STAGE"),
        ({"recipe.resolved.yaml": "kind: grpo"}, "grpo"),
    ],
)
def test_an_unfinished_run_names_the_command_that_resumes_it(tmp_path, files: dict, kind: str) -> None:
    from align.checkpoint import missing_model_reason

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert missing_model_reason(tmp_path) == (
        f"{tmp_path}: this run is unfinished (no model/ yet, its stage has not written its final model): "
        f"`align {kind} RECIPE --resume` continues it"
    )


def test_supported_attention_falls_back_and_says_so_once(capsys) -> None:
    from types import SimpleNamespace

    from align.checkpoint import supported_attention

    class WithSdpa:
        _supports_sdpa = True
        config_class = SimpleNamespace(model_type="gap_with_sdpa")

    class Bare:
        config_class = SimpleNamespace(model_type="gap_bare")

    assert supported_attention(WithSdpa, "eager") == "eager"
    assert supported_attention(Bare, "eager") == "eager"
    assert supported_attention(WithSdpa, "sdpa") == "sdpa"
    assert capsys.readouterr().out == ""
    assert supported_attention(WithSdpa, "flash_attention_2") == "sdpa"
    assert supported_attention(WithSdpa, "flash_attention_2") == "sdpa"
    assert supported_attention(Bare, "sdpa") == "eager"
    assert capsys.readouterr().out == (
        "gap_with_sdpa: flash_attention_2 not supported, using sdpa\ngap_bare: sdpa not supported, using eager\n"
    )


def test_load_llava_passes_dtype_and_attention_to_every_part(siglip_qwen2) -> None:
    from align.checkpoint import load_for_chat, load_llava

    model, processor = load_llava(siglip_qwen2, dtype=torch.bfloat16, attn_implementation="eager")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    attention = [model.config._attn_implementation]
    attention += [
        model.config.text_config._attn_implementation,
        model.config.vision_config._attn_implementation,
    ]
    assert attention == ["eager"] * 3
    assert processor.image_token == "<image>"
    model, _ = load_for_chat(siglip_qwen2, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.text_config._attn_implementation == "sdpa"


def test_image_seq_len_measures_with_a_blank_image_by_default(siglip_qwen2) -> None:
    from PIL import Image
    from transformers import AutoProcessor

    from align.checkpoint import image_seq_len

    processor = AutoProcessor.from_pretrained(siglip_qwen2)
    assert image_seq_len(processor) == image_seq_len(processor, Image.new("RGB", (300, 200))) > 0


@pytest.mark.parametrize(
    ("tokenizer_eos", "config_eos", "ids"),
    [
        (2, 5, [2, 5]),
        (2, [7, 2, 5], [2, 5, 7]),
        (2, None, [2]),
        (None, [3], [3]),
        (None, None, []),
        (2, [], [2]),
    ],
)
def test_eos_token_ids_table(tokenizer_eos, config_eos, ids: list) -> None:
    from types import SimpleNamespace

    from align.checkpoint import eos_token_ids

    tokenizer = SimpleNamespace(eos_token_id=tokenizer_eos)
    assert eos_token_ids(tokenizer, SimpleNamespace(eos_token_id=config_eos)) == ids
    assert eos_token_ids(tokenizer, None) == ([] if tokenizer_eos is None else [tokenizer_eos])


# --- align/data/encode.py: errors that name the row, raw prompts, the long-row warning ---------------------

ROLE_CHECKED = (  # a template that refuses roles it does not know, as Mistral's and Llama's do
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _encode_tokenizer(zoo, template: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zoo / "qwen2-r1")
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer, tokenizer.convert_tokens_to_ids("<image>")


def _turns(*contents: str, images: int = 0, origin: str = "rows.jsonl:7"):
    from align.data.sample import Sample

    roles = ["user", "assistant"] * len(contents)
    messages = [{"role": r, "content": c} for r, c in zip(roles, contents, strict=False)]
    return Sample(source="t", origin=origin, messages=messages, images=[f"{i}.png" for i in range(images)])


def _template_error(zoo, template: str, sample, prompt: bool = False) -> str:
    from align.data.encode import encode_prompt, encode_sft
    from align.errors import AlignError

    tokenizer, image_id = _encode_tokenizer(zoo, template)
    with pytest.raises(AlignError) as raised:
        (encode_prompt if prompt else encode_sft)(sample, tokenizer, image_id, 4)
    return str(raised.value)


CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_template_failures_name_the_row_at_every_render(zoo) -> None:
    fails = "{{ raise_exception('roles must alternate') }}"
    failed = "rows.jsonl:7: the tokenizer's chat template failed on this row: "
    sample = _turns("Q", "A")
    assert _template_error(zoo, fails, sample) == failed + "roles must alternate"
    assert _template_error(zoo, fails, _turns("Q"), prompt=True) == failed + "roles must alternate"
    on_prompt = "{% if add_generation_prompt %}{{ raise_exception('no prompt') }}{% endif %}" + CHAT
    assert _template_error(zoo, on_prompt, sample) == failed + "no prompt"
    # the earlier assistant turn of a 4-turn row: its frame, then its own rendering, fail
    on_frame = (
        "{% if messages|length == 2 and messages[-1]['content'] != 'A1' %}{{ raise_exception('frame') }}"
    )
    on_turn = "{% if messages|length == 2 and messages[-1]['content'] == 'A1' %}{{ raise_exception('turn') }}"
    long_row = _turns("Q1", "A1", "Q2", "A2")
    assert _template_error(zoo, on_frame + "{% endif %}" + CHAT, long_row) == failed + "frame"
    assert _template_error(zoo, on_turn + "{% endif %}" + CHAT, long_row) == failed + "turn"


def test_a_template_that_repeats_the_content_or_renders_history_differently_is_refused(zoo) -> None:
    twice = "{% for m in messages %}{{ m['content'] }}{{ m['content'] }}{% endfor %}"
    assert _template_error(zoo, twice, _turns("Q", "A")) == (
        "rows.jsonl:7: the chat template does not render an assistant message's content verbatim (marker found "
        "2 times); cannot locate the assistant turn"
    )
    last_differs = (  # the final assistant turn ends with <|end|>, an earlier one with <|sep|>
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
        "{% if loop.last and m['role'] == 'assistant' %}<|end|>{% else %}<|sep|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert _template_error(zoo, last_differs, _turns("Q1", "A1", "Q2", "A2")) == (
        "rows.jsonl:7: the chat template renders assistant turn 1 inconsistently with the rest of the conversation "
        "(history is not a prefix of the next prompt); cannot label it"
    )


def test_a_generation_prompt_unlike_the_assistant_turn_shows_both_ends(zoo) -> None:
    model_turn = CHAT.replace(
        "{% if add_generation_prompt %}<|im_start|>assistant",
        "{% if add_generation_prompt %}<|im_start|>model",
    )
    tokenizer, _ = _encode_tokenizer(zoo, model_turn)
    question = "How many red circles are there in this picture, counting every one?"
    history = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    opening = prompt.removesuffix("<|im_start|>model\n") + "<|im_start|>assistant\n"
    assert _template_error(zoo, model_turn, _turns(question, "3")) == (
        f"rows.jsonl:7: the chat template's generation prompt ({prompt[-40:]!r}) does not start the way it renders "
        f"an assistant turn ({opening[-40:]!r}); training would not match inference"
    )


def test_generation_prefill_probes_with_a_real_user_turn_and_names_itself(zoo) -> None:
    from align.data.encode import generation_prefill
    from align.errors import AlignError

    tokenizer, _ = _encode_tokenizer(zoo, ROLE_CHECKED)
    assert generation_prefill(tokenizer) == ""
    tokenizer.chat_template = "{{ raise_exception('nope') }}"
    with pytest.raises(AlignError) as raised:
        generation_prefill(tokenizer)
    assert str(raised.value) == "chat template probe: the tokenizer's chat template failed on this row: nope"


def test_sft_row_errors_as_written(zoo) -> None:
    from align.data.encode import encode_sft
    from align.data.sample import Sample
    from align.errors import AlignError

    tokenizer, image_id = _encode_tokenizer(zoo)
    with pytest.raises(AlignError) as raised:
        encode_sft(Sample(source="t", origin="f:1", messages=[]), tokenizer, image_id, 4)
    assert str(raised.value) == "f:1: an SFT row must end with an assistant message (last role: none)"
    with pytest.raises(AlignError) as raised:
        encode_sft(_turns("Q", "see <image>", images=1), tokenizer, image_id, 4)
    assert str(raised.value) == (
        "rows.jsonl:7: message 1 (assistant) contains <image>; images belong in user or system turns"
    )


def test_encoding_a_long_row_does_not_warn_about_the_tokenizers_maximum(zoo) -> None:
    """align measures rows against data.max_length itself; transformers' own warning would only confuse.
    (Read from the transformers logger: its stderr handler may hold a stream pytest replaced before this test.)"""
    import logging

    from align.data.encode import encode_prompt, encode_sft

    tokenizer, image_id = _encode_tokenizer(zoo)
    tokenizer.model_max_length = 4
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        encode_sft(
            _turns("a question of more than four tokens", "a reply of more than four tokens"),
            tokenizer,
            image_id,
            4,
        )
        encode_prompt(_turns("a question of more than four tokens"), tokenizer, image_id, 4)
        control, _ = _encode_tokenizer(zoo)  # transformers warns once per tokenizer: a fresh one shows it
        control.model_max_length = 4
        control("a question of more than four tokens", add_special_tokens=False)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert ["longer than the specified maximum" in m for m in messages] == [True]


def test_encoded_rows_keep_their_origin_and_a_prompt_drops_only_the_last_reply(zoo) -> None:
    from align.data.encode import encode_prompt, encode_sft

    tokenizer, image_id = _encode_tokenizer(zoo)
    assert encode_sft(_turns("Q", "A", origin="g.jsonl:3"), tokenizer, image_id, 4).origin == "g.jsonl:3"
    full, asked = _turns("Q1", "A1", "Q2", "A2"), _turns("Q1", "A1", "Q2")
    assert (
        encode_prompt(full, tokenizer, image_id, 4).input_ids
        == encode_prompt(asked, tokenizer, image_id, 4).input_ids
    )


def test_raw_prompts_replace_the_question_after_the_bos(zoo) -> None:
    from types import SimpleNamespace

    from align.data.encode import _raw_prompt, encode_prompt
    from align.errors import AlignError

    template = "Question: {question}\nAssistant: <think>"
    assert _raw_prompt(
        SimpleNamespace(bos_token="<s>"), [{"role": "user", "content": "Q?"}], template, "o"
    ) == ("<s>Question: Q?\nAssistant: <think>")
    assert _raw_prompt(
        SimpleNamespace(bos_token=None), [{"role": "user", "content": "Q?"}], template, "o"
    ) == ("Question: Q?\nAssistant: <think>")
    with pytest.raises(AlignError) as raised:
        _raw_prompt(SimpleNamespace(bos_token=None), _turns("Q", "A", "Q2").messages, template, "f:2")
    assert str(raised.value) == (
        "f:2: grpo.prompt_template takes rows of one user turn (the question), got turns ['user', 'assistant', 'user']"
    )
    tokenizer, image_id = _encode_tokenizer(zoo)
    with pytest.raises(AlignError, match=r"^rows.jsonl:7: grpo.prompt_template takes rows of one user turn"):
        encode_prompt(_turns("Q1", "A1", "Q2"), tokenizer, image_id, 4, prompt_template=template)
    encoded = encode_prompt(_turns("How many?", "3"), tokenizer, image_id, 4, prompt_template=template)
    expected = (tokenizer.bos_token or "") + "Question: How many?\nAssistant: <think>"
    assert encoded.input_ids == tokenizer(expected, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    ("template", "prefill"),
    [
        ("Q: {question}\nA: <think>", "<think>"),
        ("Q: {question}\nA: <think>\n ", "<think>\n "),
        ("Q: {question}\nA: <think> go", ""),
        ("Q: {question}\nA:", ""),
        ("<think>a</think> {question} <think>", "<think>"),
    ],
)
def test_raw_prefill_table(template: str, prefill: str) -> None:
    from align.data.encode import prompt_prefill, raw_prefill

    assert raw_prefill(template) == prefill
    assert prompt_prefill(None, template) == prefill


def test_prompt_prefill_without_a_template_is_the_chat_templates(zoo) -> None:
    from align.data.encode import prompt_prefill

    tokenizer, _ = _encode_tokenizer(zoo)
    assert prompt_prefill(tokenizer, None) == "<think>\n"


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("Q: {question}", None),
        ("Q: {QUESTION}", "must hold {question} exactly once, got 'Q: {QUESTION}'"),
        ("{question} and {question}", "must hold {question} exactly once, got '{question} and {question}'"),
        ("x" * 100, "must hold {question} exactly once, got '" + "x" * 79),
    ],
)
def test_prompt_template_problem_table(template: str, problem) -> None:
    from align.data.encode import prompt_template_problem

    assert prompt_template_problem(template) == problem


def test_overlong_error_counts_the_target_tokens_and_spans_start_supervised() -> None:
    import dataclasses

    from align.data.encode import fit_length, labelled_spans
    from align.errors import AlignError

    row = dataclasses.replace(_row(10), prompt_length=4)
    with pytest.raises(AlignError) as raised:
        fit_length(row, 8, "error")
    assert str(raised.value).endswith(" + 6 target tokens; raise max_length or set overlong: drop")
    assert labelled_spans(dataclasses.replace(_row(4), labels=[5, 6, -100, 7])) == [[5, 6], [7]]


@pytest.fixture(scope="module")
def inference_only(zoo, tmp_path_factory) -> dict:
    """align's own LLaVA-NeXT (anyres) and Idefics3 (pixel shuffle) folders, which only `align chat` loads."""
    import contextlib
    import io

    from align.assemble import AssembleRecipe, assemble
    from align.config import from_dict

    options = {
        "llava_next": ("clip-hf", {"feature_layer": [-2, -1], "anyres_grids": ["1x2", "2x1", "2x2"]}, {}),
        "idefics3": ("siglip-hf", {}, {"projector": {"type": "pixel_shuffle", "scale_factor": 2}}),
    }
    folders = {}
    for family, (tower, vision, extra) in options.items():
        spec = {
            "kind": "assemble",
            "vision": {"source": "hf", "name_or_path": str(zoo / tower), **vision},
            "llm": {"name_or_path": str(zoo / "llama-r1")},
            "output_dir": str(tmp_path_factory.mktemp(family) / "model"),
            **extra,
        }
        with contextlib.redirect_stdout(io.StringIO()):
            folders[family] = assemble(from_dict(AssembleRecipe, spec, file="test.yaml"))
    return folders


@pytest.mark.parametrize("family", ["llava_next", "idefics3"])
def test_load_for_chat_loads_an_inference_only_folder_in_its_own_class(inference_only, family: str) -> None:
    from align.checkpoint import load_for_chat

    model, processor = load_for_chat(inference_only[family], torch.bfloat16)
    assert model.config.model_type == family
    assert type(model).__name__.endswith("ForConditionalGeneration")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.text_config._attn_implementation == "sdpa"
    assert type(processor).__name__.lower().startswith(family.replace("_", ""))


def test_image_seq_len_of_an_anyres_processor_follows_the_image_given(inference_only) -> None:
    from PIL import Image
    from transformers import AutoProcessor

    from align.checkpoint import image_seq_len

    processor = AutoProcessor.from_pretrained(inference_only["llava_next"])
    wide, square = (
        image_seq_len(processor, Image.new("RGB", (128, 64))),
        image_seq_len(processor, Image.new("RGB", (128, 128))),
    )
    assert wide != square
    assert image_seq_len(processor) == image_seq_len(processor, Image.new("RGB", (48, 40)))


# --- align/export.py: the model card as written, the lineage walk, the export's own choices --------------

GOLDEN_CARDS = Path(__file__).parent / "golden" / "cards"


def _card_stages(root: Path) -> list:
    from align.export import StageRecord

    assemble = {
        "kind": "assemble",
        "vision": {
            "source": "open_clip",
            "name_or_path": "ViT-B-16",
            "pretrained": "laion2b",
            "feature_layer": -2,
            "select_strategy": "full",
        },
        "llm": {"name_or_path": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"},
        "projector": {"type": "mlp2x_silu"},
        "seed": 7,
    }
    sft = {
        "kind": "sft",
        "model": str(root / "assembled"),
        "data": {
            "sources": [{"name": "cot", "format": "llava", "path": str(root / "cot.json"), "sampling": 0.5}]
        },
        "lora": {"r": 16, "alpha": 32},
    }
    return [
        StageRecord(root / "assembled", assemble, None, None, None),
        StageRecord(
            root / "sft" / "model",
            sft,
            root / "sft",
            {
                "steps": 40,
                "wall_time_s": 93.21,
                "tokens_per_s": 1234.5678,
                "peak_memory_mb": 2048.5,
                "world_size": 2,
                "strategy": "zero3",
                "unlisted": 1,
            },
            {"step": 40, "loss": 0.98765, "grad_norm": 1.5},
            note="its input model …/x/assembled is not a model folder (from where the export ran)",
        ),
    ]


def _card(variant: str) -> str:
    from transformers import CLIPVisionConfig, LlavaConfig, Qwen2Config

    from align.export import model_card

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(),
        text_config=Qwen2Config(),
        projector_hidden_act="silu" if variant == "r1" else "gelu",
        vision_feature_layer=-2 if variant == "r1" else [-2, -1],
        vision_feature_select_strategy="full",
        image_seq_length=576,
    )
    r1 = variant == "r1"
    return model_card(
        name=f"card-{variant}",
        config=config,
        parameters={"vision": 303_507_456, "projector": 4_200_000, "llm": 1_543_714_304} if r1 else {},
        dtype="bf16" if r1 else "fp32",
        generation={"do_sample": True, "temperature": 0.6, "top_p": 0.95, "eos_token_id": 2} if r1 else {},
        r1=r1,
        stages=_card_stages(Path("/nowhere/x")) if r1 else [],
    )


@pytest.mark.parametrize("variant", ["r1", "plain"])
def test_model_card_as_written(variant: str) -> None:
    """The whole README.md of an export, against tests/golden/cards/: an R1 model with a two-stage lineage, and a
    non-R1 one with a multi-layer projector, no parameter counts and no lineage. Regenerate a card that changes on
    purpose with ``ALIGN_WRITE_GOLDEN_CARDS=1`` and read the diff."""
    import os

    path = GOLDEN_CARDS / f"{variant}.md"
    if os.environ.get("ALIGN_WRITE_GOLDEN_CARDS"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_card(variant), encoding="utf-8")
    assert _card(variant) == path.read_text(encoding="utf-8")


def _stage_folder(folder: Path, recipe, summary=None, metrics=None, in_model: bool = False) -> Path:
    """A stage output: model/ (with config.json and weights), the resolved recipe beside it or inside it."""
    import json

    import yaml
    from safetensors.torch import save_file

    model = folder / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llava"}))
    save_file({"w": torch.zeros(1)}, str(model / "model.safetensors"))
    if recipe is not None:
        text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe)
        ((model if in_model else folder) / "recipe.resolved.yaml").write_text(text)
    if summary is not None:
        (folder / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    if metrics is not None:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))
    return model


def test_lineage_walks_back_to_the_assemble_recipe(tmp_path) -> None:
    from align.export import lineage

    assembled = _stage_folder(tmp_path / "assemble", {"kind": "assemble", "seed": 1}, in_model=True)
    sft = _stage_folder(
        tmp_path / "sft",
        {"kind": "sft", "model": str(assembled)},
        {"steps": 4},
        [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 4, "loss": 1.0}],
    )
    grpo = _stage_folder(tmp_path / "grpo", {"kind": "grpo", "model": str(tmp_path / "sft")}, "[1, 2]", [])
    records = lineage(grpo)
    assert [r.kind for r in records] == ["assemble", "sft", "grpo"]
    assert [r.model_dir for r in records] == [assembled.resolve(), sft.resolve(), grpo.resolve()]
    # the assemble recipe lies inside its model folder, beside no summary or metrics: no run folder
    assert [r.run_dir for r in records] == [None, sft.parent.resolve(), grpo.parent.resolve()]
    assert [r.summary for r in records] == [None, {"steps": 4}, None]  # a summary that is not a mapping: none
    assert [r.final_metrics for r in records] == [None, {"step": 4, "loss": 1.0}, None]
    assert [r.note for r in records] == ["", "", ""]
    assert [r.kind for r in lineage(grpo, max_stages=2)] == ["sft", "grpo"]


def test_lineage_stops_where_the_recipe_cannot_be_followed(tmp_path) -> None:
    from align.export import lineage

    nameless = _stage_folder(tmp_path / "a", {"kind": "sft"})
    gone = _stage_folder(tmp_path / "b", {"kind": "sft", "model": "/nowhere/at/all"})
    (tmp_path / "c").mkdir()
    loop_a = _stage_folder(tmp_path / "c" / "x", {"kind": "sft", "model": str(tmp_path / "c" / "y")})
    _stage_folder(tmp_path / "c" / "y", {"kind": "sft", "model": str(tmp_path / "c" / "x")})
    assert [r.note for r in lineage(nameless)] == ["its recipe names no input model"]
    assert [r.note for r in lineage(gone)] == [
        "its input model …/at/all is not a model folder (from where the export ran)"
    ]
    cycle = lineage(loop_a)
    assert [r.model_dir.parent.name for r in cycle] == ["y", "x"]
    assert cycle[0].note == "its input model …/x/model is already in this lineage (cycle)"
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text('{"model_type": "llava"}')
    record = lineage(plain)[0]
    assert (record.kind, record.run_dir, record.recipe) == ("checkpoint", None, None)
    summarised = _stage_folder(tmp_path / "e", None, {"steps": 2})  # a summary alone makes a stage output
    assert lineage(summarised)[0].summary == {"steps": 2}
    chain = [_stage_folder(tmp_path / "chain" / "0", {"kind": "sft"})]
    for i in range(1, 34):
        chain.append(_stage_folder(tmp_path / "chain" / str(i), {"kind": "sft", "model": str(chain[-1])}))
    assert len(lineage(chain[-1])) == 32  # the default bound of the walk
    named_model = (
        tmp_path / "d" / "model"
    )  # called model/ but beside nothing a stage writes: not a stage output
    named_model.mkdir(parents=True)
    assert lineage(named_model)[0].run_dir is None


@pytest.mark.parametrize(
    ("text", "read"), [("a: 1", {"a": 1}), ("[1, 2]", None), ("a: [", None), (None, None)]
)
def test_read_mapping_table(tmp_path, text, read) -> None:
    import yaml

    from align.export import _read_mapping

    path = tmp_path / "r.yaml"
    if text is not None:
        path.write_text(text)
    assert _read_mapping(path, yaml.safe_load) == read


def test_export_writes_the_dtype_sampling_and_card_it_chose(siglip_qwen2, tmp_path, capsys) -> None:
    import argparse
    import json
    import shutil

    from safetensors import safe_open

    from align.checkpoint import weight_names
    from align.errors import AlignError
    from align.export import export, run

    out = export(siglip_qwen2, tmp_path / "named-out", "bf16")
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.splitlines()[6] == "# named-out"
    assert "(canonical llava-hf weight names, safetensors, bf16)." in card
    assert (
        "samples with do_sample True, temperature 0.6, top_p 0.95 (the DeepSeek-R1-Distill recommendation)"
        in card
    )
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = f.keys()
        assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.6

    bare = tmp_path / "bare"
    shutil.copytree(siglip_qwen2, bare)
    (bare / "generation_config.json").unlink()
    text_config = json.loads((bare / "config.json").read_text())["text_config"]
    out = export(bare, tmp_path / "from-bare")
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["temperature"], generation["eos_token_id"]) == (0.6, text_config["eos_token_id"])
    assert "safetensors, fp32)." in (out / "README.md").read_text(encoding="utf-8")

    custom = tmp_path / "custom"  # the source's own generation_config.json is the one carried over
    shutil.copytree(siglip_qwen2, custom)
    own = json.loads((custom / "generation_config.json").read_text())
    (custom / "generation_config.json").write_text(json.dumps({**own, "repetition_penalty": 1.25}))
    out = export(custom, tmp_path / "from-custom")
    assert json.loads((out / "generation_config.json").read_text())["repetition_penalty"] == 1.25

    with pytest.raises(AlignError) as raised:
        export(siglip_qwen2, tmp_path / "x", "fp16")
    assert str(raised.value) == "--dtype: expected one of fp32, bf16, got 'fp16'"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(AlignError, match=r"^--out .*a-file: exists and is a file, not a folder$"):
        export(siglip_qwen2, tmp_path / "a-file")

    capsys.readouterr()
    args = argparse.Namespace(
        source=str(siglip_qwen2), out=str(tmp_path / "ran"), dtype=None, max_shard_size="5GB"
    )
    assert run(args) == 0
    files = ", ".join(sorted(p.name for p in (tmp_path / "ran").iterdir()))
    tensors = len(weight_names(tmp_path / "ran"))
    assert (
        capsys.readouterr().out
        == f"exported {(tmp_path / 'ran').resolve()}: {tensors} tensors; files: {files}\n"
    )


# --- align/rewards/extract.py (pass 2) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "score"),
    [
        ("<think>a</think>b</think> \\boxed{1}", 0.0),  # two </think>, though it opens with <think>
        ("<think>a<think>b</think> \\boxed{1}", 0.0),  # two <think>
        ("x<think>a</think> \\boxed{1}", 0.0),  # does not open with <think>
        ("<think>x \\boxed 7</think> no box after the reasoning", 0.0),  # a box inside the reasoning only
        ("<think>x</think> so \\boxed 7", 1.0),
    ],
)
def test_boxed_format_score_reads_the_box_after_the_one_think_block(completion: str, score: float) -> None:
    from align.rewards.extract import boxed_format_score

    assert boxed_format_score(completion) == score


def test_an_unbraced_box_reads_at_most_200_characters() -> None:
    from align.rewards.extract import last_boxed

    assert last_boxed("\\boxed " + "7" * 250) == "7" * 200
