"""Reading a completion: the think block, the final answer, the ``<think>…</think><answer>…</answer>`` format.

Everything here is plain string scanning (``find``/``rfind`` and anchored or bounded regexes): linear in the
length of the completion, so a 100k-character generation costs milliseconds, and nothing raises on model
output. A completion that is not a ``str`` is treated as empty.

Answer extraction (:func:`extract_answer`), in order:

1. If the completion has a ``</think>``, only the text after the last one is searched; if it opens a
   ``<think>`` that never closes, the reasoning was cut off and there is no answer (``None``).
2. The last ``<answer>`` opening: its content runs to the next ``</answer>`` or, when the tag is never
   closed, to the end (the format reward is what punishes the missing tag). ``<answer><answer>3</answer>
   </answer>`` gives ``3``. If the content holds a ``\\boxed{…}``, the last boxed content is the answer.
3. Otherwise the last ``\\boxed{…}`` (nested braces are matched; ``\\boxed 3`` is accepted too).
4. Otherwise the text after ``</think>``.
5. A completion with no tags at all and no think block is answered by its whole text: evaluation of base
   models and exact-match style families (letters, yes/no, numbers, short text) work without tags.

R1-distill chat templates end the generation prompt with ``<think>\\n``, so the generated text starts inside
the think block. :func:`with_prefill` puts the prefill back so the format reward sees the full text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
R1_PREFILL = "<think>\n"

_TAG = re.compile(r"</?(?:think|answer)>")
_BOXED = ("\\boxed", "\\fbox")
_NON_ASCII_DIGIT = re.compile(r"(?![0-9])\d")
# Full-width ASCII (U+FF01..U+FF5E) maps to ASCII by a fixed offset; U+3000 is the ideographic space.
_FULL_WIDTH = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}
_MATH_SIGNS = {ord("−"): "-", ord("–"): "-", ord("×"): "\\times ", ord("÷"): "/", ord("⁄"): "/"}


def as_text(completion: object) -> str:
    """A completion as text: strings pass through; TRL conversational completions (a list of
    ``{"role", "content"}`` messages) are joined; anything else is empty."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)):
        parts = [m.get("content") for m in completion if isinstance(m, dict)]
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def ascii_digits(text: str) -> str:
    """Unicode decimal digits (Arabic-Indic, Devanagari, full-width, …) replaced by ASCII digits."""
    return _NON_ASCII_DIGIT.sub(lambda m: str(unicodedata.decimal(m.group(), 0)), text)


def fold_math(text: str) -> str:
    """Width and digit folding that keeps math symbols (NFKC would turn ``x²`` into ``x2``)."""
    return ascii_digits(text.translate(_FULL_WIDTH).translate(_MATH_SIGNS))


def fold_text(text: str) -> str:
    """NFKC, case-folded, ASCII digits: for comparing letters, words and plain numbers."""
    return ascii_digits(unicodedata.normalize("NFKC", text).casefold().translate(_MATH_SIGNS))


def with_prefill(completions: Sequence[str], prefill: str, prompts: Sequence[str] | None = None) -> list[str]:
    """Completions with the prompt's prefill (e.g. ``"<think>\\n"``) put back in front.

    Without ``prompts`` every completion gets the prefill (the caller knows its template prefills). With
    ``prompts``, only completions whose prompt ends with ``prefill`` get it, so one call serves a batch that
    mixes templates. The prefill is added even when the completion starts with it: a model that writes a
    second ``<think>`` really produced two, and the format reward must see that.
    """
    if prompts is not None and len(prompts) != len(completions):
        raise ValueError(f"with_prefill: {len(prompts)} prompts for {len(completions)} completions")
    out = []
    for i, completion in enumerate(completions):
        text = as_text(completion)
        prompt = as_text(prompts[i]) if prompts is not None else None
        out.append(prefill + text if prompt is None or prompt.endswith(prefill) else text)
    return out


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (or ``\\fbox{…}``, or ``\\boxed 3``); ``None`` if absent or unclosed.

    Only the last occurrence is tried: retrying earlier ones after an unclosed brace would make
    ``"\\boxed{" * 50000`` quadratic.
    """
    start, name = max((text.rfind(name), name) for name in _BOXED)
    if start < 0:
        return None
    i = start + len(name)
    if text[i : i + 1] not in ("{", " "):  # "\boxedfoo" is some other command
        return None
    while text[i : i + 1] == " ":
        i += 1
    if text[i : i + 1] != "{":
        word = re.match(r"[^\s$]+", text[i : i + 200])
        return word.group() if word else None
    depth = 0
    for j in range(i, len(text)):
        ch = text[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def _answer_block(text: str) -> str | None:
    start = text.rfind(ANSWER_OPEN)
    if start < 0:
        return None
    start += len(ANSWER_OPEN)
    end = text.find(ANSWER_CLOSE, start)
    return text[start:] if end < 0 else text[start:end]


def extract_answer(completion: object) -> str | None:
    """The final answer of a completion (rules in the module docstring), stripped; ``None`` if there is none."""
    text = as_text(completion)
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        tail = text[close + len(THINK_CLOSE) :]
    elif THINK_OPEN in text:
        return None
    else:
        tail = text
    answer = _answer_block(tail)
    if answer is not None:
        boxed = last_boxed(answer)
        answer = boxed if boxed is not None else answer
    else:
        answer = last_boxed(tail)
        if answer is None:
            answer = tail
    answer = _TAG.sub("", answer).strip()
    return answer or None


def extract_think(completion: object) -> str | None:
    """The reasoning: text between the first ``<think>`` (or the start, if the prefill was not put back) and
    the first ``</think>`` after it; ``None`` if the think block never closes."""
    text = as_text(completion)
    open_at = text.find(THINK_OPEN)
    start = 0 if open_at < 0 else open_at + len(THINK_OPEN)
    end = text.find(THINK_CLOSE, start)
    return None if end < 0 else text[start:end]


def format_score(completion: object) -> float:
    """1.0 for exactly ``<think>…</think>`` then ``<answer>…</answer>`` and nothing else, else 0.0.

    Leading/trailing whitespace and whitespace between the blocks is allowed; each tag must appear exactly
    once; the answer must not be blank (an empty think block is allowed: the length reward deals with it).
    The completion must include the prefilled ``<think>`` (see :func:`with_prefill`).
    """
    text = as_text(completion).strip()
    if any(text.count(tag) != 1 for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)):
        return 0.0
    think_close, answer_open = text.find(THINK_CLOSE), text.find(ANSWER_OPEN)
    answer_close = text.find(ANSWER_CLOSE)
    ordered = text.startswith(THINK_OPEN) and think_close < answer_open < answer_close
    if not ordered or not text.endswith(ANSWER_CLOSE):
        return 0.0
    between = text[think_close + len(THINK_CLOSE) : answer_open]
    answer = text[answer_open + len(ANSWER_OPEN) : answer_close]
    return 1.0 if not between.strip() and answer.strip() else 0.0


_AROUND_TAG_MARKS = re.compile(r"\s*(<|>|/)\s*")


def boxed_format_score(completion: object) -> float:
    """EasyR1's math format: 1.0 when one ``<think>…</think>`` opens the completion and a ``\\boxed{…}`` with
    non-blank content follows it, else 0.0.

    As EasyR1 does, spaces around ``<``, ``>`` and ``/`` are dropped first (``< think >`` counts). Unlike its
    regex, each think tag must occur exactly once, and the box must close (its braces matched): a box cut off
    by the length limit is no answer.
    """
    text = _AROUND_TAG_MARKS.sub(r"\1", as_text(completion)).strip()
    if text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1 or not text.startswith(THINK_OPEN):
        return 0.0
    boxed = last_boxed(text[text.find(THINK_CLOSE) + len(THINK_CLOSE) :])
    return 1.0 if boxed is not None and boxed.strip() else 0.0
