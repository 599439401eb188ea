"""Reward functions for the GRPO stage tests (``tests/test_grpo_stage.py``), loaded as ``path.py:function``.

* :func:`vowel_share`: a dense, learnable signal for a random tiny model (whose completions never score on the
  real rewards): the share of the completion's letters that are vowels, reasoning prefill excluded.
* :func:`vowel_rich`: 1 when a completion is at least 40% vowels, else 0 (groups with and without spread).
* :func:`never_right`: reads the gold, scores everything 0 (the reward self-check must refuse it).
* :func:`recorder`: scores 0 and appends every completion it receives, with its columns, as JSON lines to the
  file named by ``$GRPO_REWARD_RECORD`` (works in-process and under torchrun).
"""

from __future__ import annotations

import json
import os

PREFILL = "<think>\n"


def vowel_share(completions: list[str], **columns) -> list[float]:
    """Vowels / letters of each completion after the prefill (0 when it has no letters)."""
    scores = []
    for text in completions:
        letters = [c for c in text.removeprefix(PREFILL).lower() if c.isalpha()]
        scores.append(sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0)
    return scores


def recorder(completions: list[str], **columns) -> list[float]:
    """0 for every completion; records ``{"completion", "solution", "rank"}`` lines for the test to read."""
    path = os.environ["GRPO_REWARD_RECORD"]
    with open(path, "a") as f:
        for i, text in enumerate(completions):
            row = {"completion": text, "solution": columns.get("solution", [None] * len(completions))[i]}
            f.write(json.dumps({**row, "rank": int(os.environ.get("RANK", "0"))}) + "\n")
    return [0.0] * len(completions)


def vowel_rich(completions: list[str], **columns) -> list[float]:
    """1 when at least 40% of the completion's letters are vowels, else 0: a binary reward, so some groups of a
    random tiny model score all-equal (zero variance) and others do not (dynamic sampling has work to do)."""
    return [float(share >= 0.4) for share in vowel_share(completions, **columns)]


def never_right(completions: list[str], solution: list, **columns) -> list[float]:
    """Reads the gold and scores every completion 0, the gold itself included: what the reward self-check
    (align.rewards.gold_self_check) must refuse before a run trains on rewards that can only be 0."""
    return [0.0] * len(completions)
