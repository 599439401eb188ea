"""Answer accuracy: the matcher is chosen from the shape of the gold answer.

:func:`gold_kind` decides, first rule that applies (the gold is trimmed first: ``$…$``, ``\\(…\\)``,
``\\boxed{…}`` and ``\\text{…}`` around the whole gold are removed, full-width and non-ASCII digits folded):

========  ======================================================  =============================================
kind      gold looks like                                         the prediction is correct when
========  ======================================================  =============================================
choice    one capital letter: ``B``, ``(B)``, ``[B]``, ``B.``,     the letter it picks is the same: ``B``, ``(b)``,
          ``B)``, ``B:``; or a bracketed small one: ``(b)``         ``B. 42``, "the answer is b", "option (B)"
yesno     yes / no / true / false (any case, end punctuation)     its first word is a yes- or no-word, or it says
                                                                  exactly one of "yes"/"no"
number    3, -2.5, 1,000, 1e-3, 3/4, 50%                          the number it states (the whole answer, else the
                                                                  last number in prose) is equal: exactly for an
                                                                  integer gold, within ``max(abs_tol, rel_tol *
                                                                  |gold|)`` otherwise. If it states no plain
                                                                  number (``\\frac{1}{2}``), math_verify decides.
math      anything with a digit or math notation                  math_verify finds them equal (bounded time, see
          (``\\`` ``^`` ``_`` ``=`` ``+`` ``*`` ``/`` ``<`` π √ ∞)   :mod:`align.rewards.mathcheck`)
text      anything else                                           equal after normalising: NFKC, case, punctuation,
                                                                  articles (a/an/the), whitespace
========  ======================================================  =============================================

A row may choose its matcher instead (VLM-R1's ``accu_reward_method`` column, :data:`METHODS`): ``default``
(the table above), ``mcq`` / ``choice``, ``yes_no`` / ``yesno``, ``number``, ``math``, ``all_match`` / ``text``.
The gold must then be readable that way (an ``mcq`` gold must name one option letter).

A gold that is missing, blank, or (for math) unparseable or unsafe gives ``None``: the row is skipped, not
scored 0; :func:`gold_problem` says why, so that data checks can count such rows up front. A completion without an answer scores 0.0. The answer is read by
:func:`align.rewards.extract.extract_answer`.
"""

from __future__ import annotations

import math
import re
import unicodedata
from fractions import Fraction
from typing import Literal

from align.rewards.extract import extract_answer, fold_math, fold_text
from align.rewards.mathcheck import MAX_DIGITS, math_equal, parse_gold, unsafe_reason

GoldKind = Literal["choice", "yesno", "number", "math", "text"]
# a row's accu_reward_method (VLM-R1's names, and the kinds' own) -> the matcher it forces; None: by the gold
METHODS: dict[str, GoldKind | None] = {
    "default": None,
    "mcq": "choice",
    "choice": "choice",
    "yes_no": "yesno",
    "yesno": "yesno",
    "number": "number",
    "math": "math",
    "all_match": "text",
    "text": "text",
}
# VLM-R1's methods that are not answer matching: what to use instead
NOT_METHODS = {
    "llm": "an LLM judge is not a rule-based reward: write it as a custom reward 'module:function'",
    "map": "COCO mAP of detection lists: use the 'detection_iou' and 'detection_confidence' rewards",
    "od_ap": "COCO AP of detection lists: use the 'detection_iou' and 'detection_confidence' rewards",
    "od_ap50": "COCO AP50 of detection lists: use the 'detection_iou' and 'detection_confidence' rewards",
    "odLength": "detection AP with a length term: use the 'detection_iou' and 'detection_confidence' rewards",
    "weighted_sum": "VLM-R1's matched-box score: use the 'detection_iou' and 'detection_confidence' rewards",
}

_NUM = r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:e[-+]?\d{1,3})?"
_WHOLE_NUMBER = re.compile(rf"({_NUM})%?")
_WHOLE_FRACTION = re.compile(r"([-+]?\d+)\s*/\s*(\d+)")
_NUMBER_TOKEN = re.compile(r"(?:(?<![\w.])[-+])?\d[\d,]*(?:\.\d+)?")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_LATEX_SPACE = re.compile(r"\\[,;:! ]|\\quad|\\qquad")
_LATEX_WRAPPER = re.compile(r"\\(?:text|mathrm|textbf|mbox)\{([^{}]*)\}")
_VARIABLE_PREFIX = re.compile(r"^[a-z]\s*=\s*")
_MATH_HINT = re.compile(r"[\d\\^_=+*/<>|πσθ√∞≤≥≠]")
_WORDS = re.compile(r"[a-z]+")
_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        ]
    )
}
_CHOICE_GOLD = re.compile(r"[(\[]?([A-Z])[)\]]?[.:]?|[(\[]([a-z])[)\]]")
_LEADING_OPTION = re.compile(r"[(\[]?([A-Za-z])[)\].:]\s")
_CHOICE_PHRASE = re.compile(
    r"\b(?:answer|option|choice|choose|select)\b[^A-Za-z0-9]{0,12}?(?:is\s+)?(?:option\s+)?[(\[]?([A-Za-z])(?![A-Za-z])",
    re.IGNORECASE,
)
_YES = {"yes", "yeah", "yep", "true", "correct", "y"}
_NO = {"no", "nope", "false", "incorrect", "n"}
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCTUATION = re.compile(r"[^\w\s]|_")


def _trim(text: str) -> str:
    """Whole-answer wrappers off: ``$…$``, ``\\(…\\)``, ``\\boxed{…}``, ``\\text{…}``."""
    text = fold_math(text).strip()
    for _ in range(3):  # "$\boxed{\text{B}}$" has three layers
        if len(text) >= 2 and text[0] == "$" and text[-1] == "$":
            text = text.strip("$").strip()
        elif text.startswith("\\(") and text.endswith("\\)"):
            text = text[2:-2].strip()
        else:
            inner = re.fullmatch(r"\\(?:boxed|text|mathrm|textbf)\{(.*)\}", text, flags=re.DOTALL)
            if inner is None:
                break
            text = inner.group(1).strip()
    return text


def _digits(text: str) -> int:
    return sum(ch.isdigit() for ch in text)


def parse_number(text: str) -> tuple[Fraction, bool] | None:
    """``(value, is_integer_literal)`` if the whole text is one plain number, else ``None``.

    Accepts signs, thousands commas, decimals, ``e`` exponents (up to 3 digits), ``a/b``, a trailing ``%``
    (``50%`` is 50), a leading ``x =``, LaTeX thin spaces and ``$``. More than ``MAX_DIGITS`` digits is not
    a number (no 100k-digit arithmetic).
    """
    s = fold_text(_LATEX_SPACE.sub("", text)).replace("\\%", "%").replace("$", "")
    s = _VARIABLE_PREFIX.sub("", _LATEX_WRAPPER.sub(r"\1", s).strip()).rstrip(".").strip()
    if _digits(s) > MAX_DIGITS:
        return None
    fraction = _WHOLE_FRACTION.fullmatch(s)
    if fraction:
        denominator = int(fraction.group(2))
        return (Fraction(int(fraction.group(1)), denominator), False) if denominator else None
    number = _WHOLE_NUMBER.fullmatch(s)
    if number is None:
        return None
    literal = number.group(1).replace(",", "")
    integer = not any(c in literal for c in ".e")
    return Fraction(literal), integer


def last_number(text: str) -> Fraction | None:
    """The last number stated in prose ("there are 3 cats" → 3; number words up to twenty count).

    ``None`` for text with LaTeX or operators (``\\frac{1}{2}`` must not read as 2), or whose last number has
    more than ``MAX_DIGITS`` digits.
    """
    s = fold_text(text)
    if any(c in s for c in "\\^/{}"):
        return None
    last = None
    for last in _NUMBER_TOKEN.finditer(s):  # noqa: B007 - only the last match is wanted
        pass
    if last is None:
        words = [w for w in _WORDS.findall(s) if w in _NUMBER_WORDS]
        return Fraction(_NUMBER_WORDS[words[-1]]) if words else None
    token = last.group()
    if _digits(token) > MAX_DIGITS:
        return None
    if not _THOUSANDS.fullmatch(token):  # "1,2,3" is a list: its last item
        token = next(p for p in reversed(token.split(",")) if p)
    return Fraction(token.replace(",", ""))


def parse_choice(answer: str) -> str | None:
    """The option letter an answer picks (upper case), or ``None``."""
    s = unicodedata.normalize("NFKC", _LATEX_WRAPPER.sub(r"\1", answer))
    s = s.replace("*", "").replace("`", "").replace("$", "").strip()
    bare = s.strip(" .:;!'\"()[]")
    if len(bare) == 1 and bare.isascii() and bare.isalpha():
        return bare.upper()
    leading = _LEADING_OPTION.match(s)
    if leading:
        return leading.group(1).upper()
    picked = None
    for m in _CHOICE_PHRASE.finditer(s):
        letter, after = m.group(1), s[m.end() : m.end() + 2]
        ends = after.strip() == "" or after[0] in ".,;:!)]\n"
        pronoun = letter == "I" and after[:1] == " " and after[1:2].islower()  # "answer: I think…"
        if ends or (letter.isupper() and not pronoun):
            picked = letter.upper()
    return picked


def parse_yesno(answer: str) -> str | None:
    """``"yes"``/``"no"`` if the answer starts with a yes- or no-word or says exactly one of them."""
    words = _WORDS.findall(fold_text(answer))
    if not words:
        return None
    if words[0] in _YES:
        return "yes"
    if words[0] in _NO:
        return "no"
    said = {w for w in words if w in ("yes", "no")}
    return said.pop() if len(said) == 1 else None


def normalize_text(text: str) -> str:
    """SQuAD-style normalisation: NFKC, case-folded, no punctuation, no articles, single spaces."""
    s = fold_text(_LATEX_WRAPPER.sub(r"\1", text))
    return " ".join(_ARTICLES.sub(" ", _PUNCTUATION.sub("", s)).split())


_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", flags=re.DOTALL)


def gold_text(gold: object) -> str | None:
    """The gold as text; a gold written the way completions are (``<answer>3</answer>``, as R1-V, VLM-R1 and
    Visual-RFT publish theirs) is its last answer block's content."""
    if isinstance(gold, bool):
        return None
    if isinstance(gold, (int, float)):
        return str(gold) if math.isfinite(gold) else None
    if not isinstance(gold, str):
        return None
    blocks = _ANSWER_BLOCK.findall(gold)
    return blocks[-1].strip() if blocks else gold


def gold_kind(gold: object) -> GoldKind | None:
    """Which matcher a gold answer selects (table in the module docstring); ``None`` if it is unusable."""
    text = gold_text(gold)
    if text is None:
        return None
    g = _trim(text)
    if not g:
        return None
    if _CHOICE_GOLD.fullmatch(unicodedata.normalize("NFKC", g)):
        return "choice"
    if fold_text(g).rstrip(".!").strip() in ("yes", "no", "true", "false"):
        return "yesno"
    if parse_number(g) is not None:
        return "number"
    if _MATH_HINT.search(g):
        return "math"
    return "text" if normalize_text(g) else None


def method_kind(method: object) -> GoldKind | None:
    """The matcher a row's ``accu_reward_method`` forces (``None``: chosen by the gold); ``ValueError`` names
    the methods there are, or what to use for VLM-R1's methods that are not answer matching."""
    if method is None or method in METHODS:
        return METHODS.get(method)  # type: ignore[arg-type]
    if method in NOT_METHODS:
        raise ValueError(f"accu_reward_method {method!r}: {NOT_METHODS[method]}")
    raise ValueError(f"accu_reward_method {method!r}: expected one of {', '.join(METHODS)}")


def _forced_gold(g: str, kind: GoldKind) -> str | None:
    """Why a gold cannot be read by the matcher its row forces, or ``None``."""
    if kind == "choice" and _gold_choice(g) is None:
        return f"the gold answer {g!r:.60} names no option letter (accu_reward_method mcq)"
    if kind == "yesno" and parse_yesno(g) is None:
        return f"the gold answer {g!r:.60} is not yes or no (accu_reward_method yes_no)"
    if kind == "number" and parse_number(g) is None:
        return f"the gold answer {g!r:.60} is not a number (accu_reward_method number)"
    if kind == "text" and not normalize_text(g):
        return f"the gold answer {g!r:.60} has no letters or digits to compare with"
    return None


def _gold_choice(g: str) -> str | None:
    letter = _CHOICE_GOLD.fullmatch(unicodedata.normalize("NFKC", g))
    return (letter.group(1) or letter.group(2)).upper() if letter else parse_choice(g)


def gold_problem(gold: object, timeout: float = 1.0, method: object = None) -> str | None:
    """Why :func:`accuracy` cannot score against ``gold`` (it would return ``None`` for every completion), or
    ``None`` if it can. Pure; ``align data check`` and the stages use it to count such rows before training.
    ``method``: the row's ``accu_reward_method`` (``ValueError`` if there is no such method)."""
    forced = method_kind(method)
    text = gold_text(gold)
    if text is None:
        return f"the gold answer is a {type(gold).__name__} ({gold!r:.60}), not text or a finite number"
    g = _trim(text)
    kind = forced or gold_kind(gold)
    if not g:
        kind = None
    elif forced is not None and forced != "math":
        return _forced_gold(g, forced)
    if kind is None:
        if not g:
            return f"the gold answer {text!r:.60} is blank once $…$ / \\boxed{{…}} wrappers are removed"
        return f"the gold answer {text!r:.60} has no letters or digits to compare with"
    if kind == "math" and parse_gold(g, timeout) is None:
        unsafe = unsafe_reason(g)
        if unsafe is not None:
            return f"the gold answer {g!r:.60} is refused by the math guard ({unsafe})"
        return f"math_verify cannot parse the gold answer {g!r:.60}"
    return None


def accuracy(
    completion: object,
    gold: object,
    *,
    rel_tol: float = 1e-4,
    abs_tol: float = 1e-9,
    timeout: float = 1.0,
    method: object = None,
) -> float | None:
    """1.0 if the completion's answer matches ``gold``, 0.0 if not or if there is no answer, ``None`` if the
    gold is unusable (:func:`gold_problem` says why). ``rel_tol``/``abs_tol`` apply to non-integer numeric
    golds; ``timeout`` (seconds) bounds math_verify; ``method``: the row's ``accu_reward_method``, if any."""
    if gold_problem(gold, timeout, method) is not None:
        return None
    kind = method_kind(method) or gold_kind(gold)
    g = _trim(gold_text(gold) or "")
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    if kind == "choice":
        return float(parse_choice(answer) == _gold_choice(g))
    if kind == "yesno":
        return float(parse_yesno(answer) == parse_yesno(g))
    if kind == "number":
        return _number_score(answer, g, rel_tol, abs_tol, timeout)
    if kind == "math":
        return float(bool(math_equal(answer, g, timeout)))
    return float(normalize_text(answer) == normalize_text(g))


def _number_score(answer: str, gold: str, rel_tol: float, abs_tol: float, timeout: float) -> float:
    gold_value, integer = parse_number(gold)  # type: ignore[misc]  # gold_kind said "number"
    whole = parse_number(_trim(answer))
    pred = whole[0] if whole is not None else last_number(answer)
    if pred is None:
        return float(bool(math_equal(answer, gold, timeout)))
    if integer:
        return float(pred == gold_value)
    tolerance = max(Fraction(abs_tol), Fraction(rel_tol) * abs(gold_value))
    return float(abs(pred - gold_value) <= tolerance)
