"""Deterministic rewards for the wiring tests (``tests/test_grpo_wiring.py``), loaded as ``path.py:function``.

Each is a pure function of the completion's text or token ids, so a test can recompute every score from what
:func:`record` wrote down, combine them with the recipe's weights by hand and derive the advantages the stage
must have used. They vary within a group of completions of a random tiny model (a dense signal):

* :func:`vowels`: vowels / letters of the text after the reasoning prefill (0 without letters);
* :func:`even_ids`: the share of even token ids;
* :func:`gate`: ``None`` (abstains) when the first token id is a multiple of 3, else ``(id % 7) / 7``;
* :func:`flaky`: ``(id % 4) / 4`` of the first token id, but raises on any batch holding a completion whose first
  id is a multiple of 5 (the stage then scores one by one: those get no score and count as reward errors);
* :func:`record`: 0 for every completion; appends one JSON line per call, ``{"completions", "completion_ids"}``,
  to the file named by ``$WIRING_RECORD``.
"""

from __future__ import annotations

import json
import os

PREFILL = "<think>\n"


def vowels(completions: list[str], **columns) -> list[float]:
    scores = []
    for text in completions:
        letters = [c for c in text.removeprefix(PREFILL).lower() if c.isalpha()]
        scores.append(sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0)
    return scores


def even_ids(completions: list[str], completion_ids: list[list[int]], **columns) -> list[float]:
    return [sum(i % 2 == 0 for i in ids) / max(1, len(ids)) for ids in completion_ids]


def gate(completions: list[str], completion_ids: list[list[int]], **columns) -> list[float | None]:
    return [None if not ids or ids[0] % 3 == 0 else (ids[0] % 7) / 7 for ids in completion_ids]


def flaky(completions: list[str], completion_ids: list[list[int]], **columns) -> list[float]:
    if any(not ids or ids[0] % 5 == 0 for ids in completion_ids):
        raise ValueError("flaky: a completion starts with a multiple of 5")
    return [(ids[0] % 4) / 4 for ids in completion_ids]


def record(completions: list[str], completion_ids: list[list[int]], **columns) -> list[float]:
    with open(os.environ["WIRING_RECORD"], "a") as f:
        f.write(json.dumps({"completions": list(completions), "completion_ids": completion_ids}) + "\n")
    return [0.0] * len(completions)
