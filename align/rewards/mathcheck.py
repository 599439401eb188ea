"""Math equivalence through ``math_verify``, in bounded time.

``math_verify`` (LaTeX → sympy) can spend seconds or, on big-integer arithmetic done in C, forever on
adversarial text: ``10^{10^{10^{10}}}``, ``(10^{9})!``, a 100k-digit number, 20 nested parentheses. Two
defences:

* **Guards** (:func:`unsafe_reason`) refuse text before sympy sees it: more than ``MAX_CHARS`` characters, a
  digit run longer than ``MAX_DIGITS``, a power tower (an exponent that holds another ``^``/``**``, or
  ``a^b^c``), an exponent with a number above ``MAX_EXPONENT``, a factorial or binomial next to a number of
  ``MAX_FACTORIAL`` or more or next to a power, and bracket nesting deeper than ``MAX_DEPTH``.
* **A deadline**: in the main thread a ``SIGALRM`` interval timer interrupts parsing and verification after
  ``timeout`` seconds (sub-second, unlike math_verify's own whole-second alarms, which are switched off so
  the two do not fight over the one timer). A caller's own pending alarm is re-armed afterwards. Outside the
  main thread signals cannot be used and only the guards apply.

:func:`math_equal` answers ``True``/``False``, or ``None`` when the gold itself is unparseable or unsafe.
"""

from __future__ import annotations

import functools
import logging
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

MAX_CHARS = 512
MAX_DIGITS = 100
MAX_EXPONENT = 10_000
MAX_FACTORIAL = 1_000
MAX_DEPTH = 6

_DIGIT_RUN = re.compile(rf"\d{{{MAX_DIGITS + 1}}}")
_NUMBER = re.compile(r"\d+")
_POWER = re.compile(r"\^|\*\*")
_EXPONENT_TOKEN = re.compile(r"\s*(?:\\[A-Za-z]+|\d+(?:\.\d+)?|.)")
_DELIMITED = ("$", "\\(", "\\[", "\\boxed")
_PROSE_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_LATEX_TEXT = re.compile(r"\\(?:text|mathrm|textbf|operatorname)\{[^{}]*\}|\\[A-Za-z]+")


class _Expired(BaseException):
    """Raised by the timer; a BaseException so that math_verify's ``except Exception`` cannot swallow it."""


def _brace_group(text: str, i: int, open_ch: str, close_ch: str) -> int:
    """Index just past the group opening at ``text[i]`` (or the end of text if it never closes)."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_ch:
            depth += 1
        elif text[j] == close_ch:
            depth -= 1
            if depth == 0:
                return j + 1
    return len(text)


def _exponents(text: str) -> Iterator[tuple[str, str]]:
    """(exponent, text right after it) for every ``^`` or ``**``."""
    for m in _POWER.finditer(text):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] in "{(":
            end = _brace_group(text, i, text[i], "}" if text[i] == "{" else ")")
        else:
            token = _EXPONENT_TOKEN.match(text, i)
            end = token.end() if token else i
        yield text[i:end], text[end:].lstrip(" ")


def unsafe_reason(text: str) -> str | None:
    """Why ``text`` must not reach sympy, or ``None`` if it may (rules in the module docstring)."""
    if len(text) > MAX_CHARS:
        return f"longer than {MAX_CHARS} characters"
    if _DIGIT_RUN.search(text):
        return f"a number with more than {MAX_DIGITS} digits"
    for exponent, rest in _exponents(text):
        if _POWER.search(exponent) or rest.startswith(("^", "**")):
            return "a power tower"
        if any(int(n) > MAX_EXPONENT for n in _NUMBER.findall(exponent)):
            return f"an exponent above {MAX_EXPONENT}"
    combinatorial = "!" in text or "binom" in text or "choose" in text
    if combinatorial and (_POWER.search(text) or any(int(n) >= MAX_FACTORIAL for n in _NUMBER.findall(text))):
        return f"a factorial or binomial of a power or of a number >= {MAX_FACTORIAL}"
    depth = deepest = 0
    for ch in text:
        if ch in "([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]":
            depth = max(depth - 1, 0)
    if deepest > MAX_DEPTH:
        return f"brackets nested deeper than {MAX_DEPTH}"
    return None


def _raise_expired(signum: int, frame: Any) -> None:
    raise _Expired


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`_Expired` in this block after ``seconds`` (main thread only; otherwise a no-op)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    old_handler = signal.signal(signal.SIGALRM, _raise_expired)
    if old_handler is None:  # a handler installed outside Python cannot be put back; the default is closest
        old_handler = signal.SIG_DFL
    # The short repeat interval keeps firing until the block is left, in case one raise is swallowed.
    # A delay of 0 would disarm the timer instead of firing at once, hence the floor.
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3), 0.05)
    started = time.monotonic()
    try:
        yield
    finally:
        while True:  # a signal already pending can land inside this cleanup: retry until it is done
            try:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old_handler)
                break
            except _Expired:
                continue
        if old_delay > 0:  # re-arm the caller's alarm (e.g. pytest-timeout) with what is left of it
            left = max(old_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, old_interval)


def _call_before(seconds: float, fn: Callable[[], Any]) -> tuple[bool, Any]:
    """(finished, result) of ``fn()`` under a deadline."""
    try:
        with _deadline(seconds):
            return True, fn()
    except _Expired:
        return False, None


class _DropTimeoutNotice(logging.Filter):
    """math_verify warns once that its own timeout is off; here the deadline above replaces it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


@functools.cache
def _math_verify() -> Any:
    """math_verify, imported and warmed up once per process."""
    import math_verify
    import math_verify.grader
    import math_verify.parser

    for module in (math_verify.parser, math_verify.grader):
        logging.getLogger(module.__name__).addFilter(_DropTimeoutNotice())
    # The first LaTeX parse of a process loads the grammar (~0.5 s): pay it here, outside any deadline.
    math_verify.parse("$\\frac{1}{2}+x^2$", parsing_timeout=None)
    return math_verify


def warm_up() -> None:
    """Import math_verify and load its LaTeX grammar now (~1-2 s once per process), e.g. before training."""
    _math_verify()


def _looks_like_prose(text: str) -> bool:
    return bool(_PROSE_WORD.search(_LATEX_TEXT.sub(" ", text)))


def _parse(text: str, gold: bool) -> list:
    """Parse an answer. Bare LaTeX (``\\sqrt{2}``, ``x^2``) only parses inside ``$…$``; prose ("the answer
    is 3") parses as is, math_verify then picks the expression out of it. A gold must parse to sympy (no
    fallback to its raw string, which would make ``\\frac{`` a valid gold); it takes its first expression."""
    mv = _math_verify()
    options = {
        "parsing_timeout": None,
        "extraction_mode": "first_match" if gold else "any_match",
        "fallback_mode": "no_fallback" if gold else "first_match",
    }
    if any(d in text for d in _DELIMITED) or _looks_like_prose(text):
        return mv.parse(text, **options)
    return mv.parse(f"${text}$", **options) or mv.parse(text, **options)


def parse_gold(gold: str, timeout: float = 1.0) -> list | None:
    """The parsed gold answer, or ``None`` if it is unsafe, unparseable or too slow to parse."""
    if unsafe_reason(gold) is not None:
        return None
    _math_verify()
    finished, parsed = _call_before(timeout, lambda: _parse(gold, gold=True))
    return parsed if finished and parsed else None


def math_equal(pred: str, gold: str, timeout: float = 1.0) -> bool | None:
    """Whether ``pred`` is mathematically equal to ``gold`` within ``timeout`` seconds (see module docstring).

    ``None``: the gold cannot be used. ``False``: the prediction is unsafe, unparseable, different, or
    took too long.
    """
    _math_verify()  # the one-off import and warm-up must not count against the deadline
    started = time.monotonic()
    gold_parsed = parse_gold(gold, timeout)
    if gold_parsed is None:
        return None
    if unsafe_reason(pred) is not None:
        return False
    left = timeout - (time.monotonic() - started)
    if left <= 0:
        return False

    def check() -> bool:
        pred_parsed = _parse(pred, gold=False)
        return bool(pred_parsed) and _math_verify().verify(gold_parsed, pred_parsed, timeout_seconds=None)

    finished, equal = _call_before(left, check)
    return bool(finished and equal)
