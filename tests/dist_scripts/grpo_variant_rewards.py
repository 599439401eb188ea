"""A reward for the dynamic-sampling tests (``tests/test_grpo_variants.py``), loaded as ``path.py:function``.

:func:`gated_vowels` gives every completion of a ``count`` or ``colour`` question the same 0.5 (those groups have
zero variance, known in advance from the question alone) and every other completion its vowel share (a dense
reward whose G samples vary). With ``$GRPO_VARIANT_RECORD`` set it appends one JSON line per call: the rank,
the families and the scores, so a test can count the groups each rank sampled (in-process and under torchrun).
"""

from __future__ import annotations

import json
import os

FLAT_FAMILIES = ("count", "colour")
PREFILL = "<think>\n"


def gated_vowels(completions: list[str], family: list, **columns) -> list[float]:
    scores = []
    for text, fam in zip(completions, family, strict=True):
        letters = [c for c in text.removeprefix(PREFILL).lower() if c.isalpha()]
        vowels = sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0
        scores.append(0.5 if fam in FLAT_FAMILIES else vowels)
    path = os.environ.get("GRPO_VARIANT_RECORD")
    if path:
        with open(path, "a") as f:
            rank = int(os.environ.get("RANK", "0"))
            f.write(json.dumps({"rank": rank, "family": list(family), "scores": scores}) + "\n")
    return scores
