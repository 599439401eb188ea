"""Shaping rewards on the reasoning text: a length bonus and a repetition penalty.

* :func:`length` (VisualThinker-R1-Zero style): ``scale * min(len(think) / target, 1)`` where ``think`` is
  the stripped think block in **characters** (rewards see text, not tokens; English runs ~4 characters per
  token, so the default ``target=2000`` is ~500 tokens). Longer reasoning earns more up to the cap and
  nothing beyond it; a think block that never closes earns 0, so running out of tokens is not rewarded.
* :func:`repetition`: ``-max_penalty * (1 - distinct n-grams / n-grams)`` over the whole completion, in
  ``[-max_penalty, 0]``. N-grams are of whitespace-separated words; text with few spaces (CJK, or
  ``"aaaa…"``) uses character n-grams of ``4 * n`` characters instead, so it cannot dodge the penalty by
  never writing a space. Fewer words than ``n`` gives 0. One pass over the text: fast on 100k characters.
"""

from __future__ import annotations

from align.rewards.extract import as_text, extract_think

# Fewer than one space per this many characters counts as "few spaces".
_CHARS_PER_WORD_LIMIT = 20


def length(completion: object, target: int = 2000, scale: float = 1.0) -> float:
    """``scale * min(characters of reasoning / target, 1)``; 0.0 without a closed think block."""
    think = extract_think(completion)
    if think is None or target <= 0:
        return 0.0
    return scale * min(len(think.strip()) / target, 1.0)


def repetition(completion: object, n: int = 4, max_penalty: float = 1.0) -> float:
    """``-max_penalty * (1 - distinct n-grams / n-grams)`` (see module docstring)."""
    text = as_text(completion)
    words = text.split()
    if len(words) * _CHARS_PER_WORD_LIMIT >= len(text):
        # shifted copies are shorter; zip stops at the shortest, giving the len - n + 1 n-grams
        grams: list = list(zip(*(words[i:] for i in range(n)), strict=False))
    else:
        size = 4 * n
        grams = [text[i : i + size] for i in range(len(text) - size + 1)]
    if not grams:
        return 0.0
    return -max_penalty * (1.0 - len(set(grams)) / len(grams))
