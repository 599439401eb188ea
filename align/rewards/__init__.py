"""Rule-based rewards for GRPO and evaluation: pure functions of the completion text and the row.

Every reward in :data:`REWARDS` has TRL's reward-function signature,
``fn(completions: list[str], **columns) -> list[float | None]``: ``columns`` are the dataset columns, one value
per completion (TRL also passes ``prompts``, ``trainer_state`` …; they are ignored). ``None`` means "not
applicable" (e.g. the gold answer cannot be parsed) and is skipped, unlike 0. Malformed model output scores
0 and never raises; a missing column is a setup error and raises :class:`AlignError`.

========== ================================ ============================================================
name       columns                          per-item function
========== ================================ ============================================================
accuracy   ``solution`` (or ``answer``)     :func:`~align.rewards.answers.accuracy`: 1/0, matcher chosen
                                            by the gold's shape
format     -                                :func:`~align.rewards.extract.format_score`: 1/0 for
                                            ``<think>…</think><answer>…</answer>``
iou        ``box``, optional ``image_size`` :func:`~align.rewards.boxes.iou`: 1 if IoU > 0.5
iou_soft   ``box``, optional ``image_size`` :func:`~align.rewards.boxes.iou_soft`: the IoU
length     -                                :func:`~align.rewards.reasoning.length`: longer reasoning, capped
repetition -                                :func:`~align.rewards.reasoning.repetition`: n-gram penalty
========== ================================ ============================================================

The published systems' rewards, under their own names (:mod:`align.rewards.detection`):

==================== ================================ =================================================
name                 columns                          per-item function
==================== ================================ =================================================
detection_iou        ``solution``: a detection list   Visual-RFT's matched-IoU reward
detection_confidence ``solution``: a detection list   Visual-RFT's confidence reward
classification       ``solution``                     Visual-RFT's classification reward (containment)
giou                 ``box``, optional ``image_size`` (1 + GIoU) / 2; ``coordinates`` states the answer's scale
rec_format           -                                VLM-R1's REC format (a JSON box in ``<answer>``)
boxed_format         -                                EasyR1's math format: ``<think>…</think>`` then a
                                                      ``\\boxed{…}``
==================== ================================ =================================================

``accuracy`` also reads an optional ``accu_reward_method`` column (VLM-R1's): a row's own matcher
(:data:`align.rewards.answers.METHODS`).

Completions must be the full text, including a ``<think>\\n`` the chat template prefilled: pass them through
:func:`with_prefill` first. :func:`load_reward` resolves a name or ``module:function`` (or
``path/file.py:function``); :func:`score_all` calls several rewards and contains their exceptions.

Run the tests with ``.venv/bin/pytest -q tests/test_rewards.py``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from align.errors import AlignError
from align.rewards.answers import (
    accuracy,
    gold_kind,
    gold_problem,
    gold_text,
    method_kind,
    normalize_text,
    parse_choice,
    parse_number,
    parse_yesno,
)
from align.rewards.boxes import (
    as_box,
    box_from_model_input,
    box_iou,
    box_to_model_input,
    clip_box,
    iou,
    iou_soft,
    parse_box,
)
from align.rewards.detection import (
    as_corner_box,
    classification,
    detection_confidence,
    detection_iou,
    giou,
    parse_corner_box,
    parse_detections,
    rec_format,
)
from align.rewards.extract import (
    R1_PREFILL,
    boxed_format_score,
    extract_answer,
    extract_think,
    format_score,
    with_prefill,
)
from align.rewards.mathcheck import warm_up
from align.rewards.overlong import soft_overlong, soft_overlong_problem, soft_overlong_reward
from align.rewards.reasoning import length, repetition

__all__ = [
    "DEFAULT_REWARD_FUNCS",
    "GOLD_REWARDS",
    "R1_PREFILL",
    "REWARDS",
    "RewardFn",
    "RewardSetupError",
    "accuracy",
    "accuracy_reward",
    "as_box",
    "box_from_model_input",
    "box_iou",
    "box_to_model_input",
    "boxed_format_score",
    "classification",
    "clip_box",
    "detection_confidence",
    "detection_iou",
    "extract_answer",
    "extract_think",
    "format_reward",
    "format_score",
    "giou",
    "gold_kind",
    "gold_problem",
    "gold_self_check",
    "gold_text",
    "iou",
    "iou_reward",
    "iou_soft",
    "iou_soft_reward",
    "length",
    "length_reward",
    "load_reward",
    "normalize_text",
    "parse_box",
    "parse_choice",
    "parse_corner_box",
    "parse_detections",
    "parse_number",
    "parse_yesno",
    "perfect_completion",
    "rec_format",
    "repetition",
    "repetition_reward",
    "score_all",
    "soft_overlong",
    "soft_overlong_reward",
    "unscorable_gold",
    "warm_up",
    "with_prefill",
]

RewardFn = Callable[..., list]
logger = logging.getLogger(__name__)


class RewardSetupError(AlignError):
    """The data lacks what a reward needs (a column): every completion would fail alike, so it stops the run."""


def _column(reward: str, name: str, values: object, n: int) -> list:
    if values is None:
        raise RewardSetupError(f"reward '{reward}' needs a '{name}' column in the data; it is missing")
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != n:
        size = len(values) if isinstance(values, Sequence) else type(values).__name__
        raise RewardSetupError(f"reward '{reward}': column '{name}' has {size} values for {n} completions")
    return list(values)


def accuracy_reward(
    completions: Sequence[Any],
    solution: Sequence[Any] | None = None,
    answer: Sequence[Any] | None = None,
    rel_tol: float = 1e-4,
    abs_tol: float = 1e-9,
    timeout: float = 1.0,
    accu_reward_method: Sequence[Any] | None = None,
    **columns: Any,
) -> list[float | None]:
    """:func:`accuracy` per completion against the ``solution`` column (``answer`` if there is none), with each
    row's ``accu_reward_method`` when the data has that column (``None`` in it: the gold's shape decides)."""
    name = "solution" if solution is not None or answer is None else "answer"
    golds = _column("accuracy", name, solution if solution is not None else answer, len(completions))
    methods = (
        [None] * len(golds)
        if accu_reward_method is None
        else _column("accuracy", "accu_reward_method", accu_reward_method, len(golds))
    )
    for method in dict.fromkeys(m for m in methods if m is not None):
        try:
            method_kind(method)
        except ValueError as err:
            raise RewardSetupError(f"reward 'accuracy': {err}") from None
    return [
        accuracy(c, g, rel_tol=rel_tol, abs_tol=abs_tol, timeout=timeout, method=m)
        for c, g, m in zip(completions, golds, methods, strict=True)
    ]


def format_reward(completions: Sequence[Any], **columns: Any) -> list[float | None]:
    """:func:`format_score` per completion."""
    return [format_score(c) for c in completions]


def boxed_format_reward(completions: Sequence[Any], **columns: Any) -> list[float | None]:
    """:func:`boxed_format_score` per completion."""
    return [boxed_format_score(c) for c in completions]


def _boxes(reward: str, completions: Sequence[Any], box: object, image_size: object) -> list[tuple]:
    golds = _column(reward, "box", box, len(completions))
    sizes = (
        [None] * len(completions)
        if image_size is None
        else _column(reward, "image_size", image_size, len(golds))
    )
    return list(zip(completions, golds, sizes, strict=True))


def iou_reward(
    completions: Sequence[Any],
    box: object = None,
    image_size: object = None,
    threshold: float = 0.5,
    **columns: Any,
) -> list[float | None]:
    """:func:`iou` per completion against the ``box`` column."""
    return [iou(c, b, s, threshold) for c, b, s in _boxes("iou", completions, box, image_size)]


def iou_soft_reward(
    completions: Sequence[Any], box: object = None, image_size: object = None, **columns: Any
) -> list[float | None]:
    """:func:`iou_soft` per completion against the ``box`` column."""
    return [iou_soft(c, b, s) for c, b, s in _boxes("iou_soft", completions, box, image_size)]


def _golds(reward: str, completions: Sequence[Any], solution: object) -> list:
    return list(zip(completions, _column(reward, "solution", solution, len(completions)), strict=True))


def detection_iou_reward(
    completions: Sequence[Any], solution: object = None, **columns: Any
) -> list[float | None]:
    """:func:`detection_iou` per completion against the ``solution`` column (a detection list)."""
    return [detection_iou(c, g) for c, g in _golds("detection_iou", completions, solution)]


def detection_confidence_reward(
    completions: Sequence[Any], solution: object = None, **columns: Any
) -> list[float | None]:
    """:func:`detection_confidence` per completion against the ``solution`` column (a detection list)."""
    return [detection_confidence(c, g) for c, g in _golds("detection_confidence", completions, solution)]


def classification_reward(
    completions: Sequence[Any], solution: object = None, **columns: Any
) -> list[float | None]:
    """:func:`classification` per completion against the ``solution`` column."""
    return [classification(c, g) for c, g in _golds("classification", completions, solution)]


def giou_reward(
    completions: Sequence[Any],
    box: object = None,
    image_size: object = None,
    coordinates: str = "pixels",
    **columns: Any,
) -> list[float | None]:
    """:func:`giou` per completion against the ``box`` column, the answers read in ``coordinates``."""
    return [giou(c, b, s, coordinates) for c, b, s in _boxes("giou", completions, box, image_size)]


def rec_format_reward(completions: Sequence[Any], **columns: Any) -> list[float | None]:
    """:func:`rec_format` per completion."""
    return [rec_format(c) for c in completions]


def length_reward(
    completions: Sequence[Any], target: int = 2000, scale: float = 1.0, **columns: Any
) -> list[float | None]:
    """:func:`length` per completion."""
    return [length(c, target, scale) for c in completions]


def repetition_reward(
    completions: Sequence[Any], n: int = 4, max_penalty: float = 1.0, **columns: Any
) -> list[float | None]:
    """:func:`repetition` per completion."""
    return [repetition(c, n, max_penalty) for c in completions]


REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "iou": iou_reward,
    "iou_soft": iou_soft_reward,
    "length": length_reward,
    "repetition": repetition_reward,
    "soft_overlong": soft_overlong_reward,
    "detection_iou": detection_iou_reward,
    "detection_confidence": detection_confidence_reward,
    "classification": classification_reward,
    "giou": giou_reward,
    "rec_format": rec_format_reward,
    "boxed_format": boxed_format_reward,
}


def _coordinates_problem(params: Mapping[str, Any]) -> str | None:
    from align.rewards.detection import COORDINATES

    value = params.get("coordinates", "pixels")
    if value in COORDINATES:
        return None
    return f"coordinates: the scale of the answer's box, one of {', '.join(COORDINATES)}; got {value!r}"


# Built-ins whose parameters need more than their names checked: name -> what is wrong with them, or None.
PARAMETER_PROBLEMS: dict[str, Callable[[Mapping[str, Any]], str | None]] = {
    "soft_overlong": soft_overlong_problem,
    "giou": _coordinates_problem,
}


DEFAULT_REWARD_FUNCS: tuple[str, ...] = ("accuracy", "format")  # GRPO's and `align eval`'s default
# the built-ins that read a row's gold
GOLD_REWARDS: tuple[str, ...] = (
    "accuracy",
    "iou",
    "iou_soft",
    "giou",
    "detection_iou",
    "detection_confidence",
    "classification",
)
BOX_REWARDS: tuple[str, ...] = ("iou", "iou_soft", "giou")  # the built-ins whose gold is the box column


# math_verify's deadline when a row is checked before training: once per row, so generous, and not the 1 s of
# a reward call (a loaded machine once missed that on a box gold, refusing a good row)
CHECK_TIMEOUT = 10.0


def unscorable_gold(
    reward_funcs: Sequence[str], solution: object, box: object = None, method: object = None
) -> str | None:
    """Why none of the configured built-in rewards that read a gold (:data:`GOLD_REWARDS`) can score a row
    with this ``solution`` and ``box``, or ``None`` if one of them can or none is configured.

    A pure function of the row: such a row would earn ``None`` ("not applicable") from each of those rewards
    on every completion, so the stages and ``align data check`` count it before training instead. Custom
    ``module:function`` rewards may read anything and are not judged. ``method``: the row's
    ``accu_reward_method``.
    """
    reasons = []
    for spec in reward_funcs:
        if spec not in GOLD_REWARDS:
            continue
        if spec in BOX_REWARDS:
            readable = as_corner_box(box) if spec == "giou" else as_box(box)
            reason = (
                None if readable is not None else f"no valid gold box [x1, y1, x2, y2] (box: {box!r:.60})"
            )
        elif solution is None:
            reason = "the row has no gold answer (solution)"
        elif spec == "accuracy":
            try:
                reason = gold_problem(solution, CHECK_TIMEOUT, method)
            except ValueError as err:
                reason = str(err)
        elif spec in ("detection_iou", "detection_confidence"):
            readable = parse_detections(gold_text(solution))
            reason = (
                None
                if readable is not None
                else (
                    f"the gold {solution!r:.60} is not a list of objects with a box under Position, bbox_2d or bbox"
                )
            )
        else:
            reason = None if classification("", solution) is not None else "the gold answer is blank"
        if reason is None:
            return None
        reasons.append(f"{spec} reward: {reason}")
    return "; ".join(reasons) or None


# What each built-in reward gives a perfect completion; those that read no gold (length, repetition,
# soft_overlong) are not judged by the self-check.
REWARD_MAXIMUM: dict[str, float] = {
    "accuracy": 1.0,
    "format": 1.0,
    **dict.fromkeys(BOX_REWARDS, 1.0),
    **dict.fromkeys(("detection_iou", "detection_confidence", "classification"), 1.0),
}
# an image size on which the answer's scale (giou's ``coordinates``) equals pixels: the gold, written as the
# perfect answer, then means itself
_IDENTITY_SIZE = {"pixels": None, "norm1000": [1000.0, 1000.0], "norm1": [1.0, 1.0]}


def perfect_completion(answer: str) -> str:
    """A completion every reward must score at its maximum when ``answer`` is the row's gold: the reasoning
    (after the template's prefill) closed, then the answer in ``<answer>`` tags."""
    return f"{R1_PREFILL}The answer follows from the question.\n</think>\n<answer>{answer}</answer>"


def gold_self_check(
    spec: str, reward: RewardFn, solution: object, box: object, family: object = None, method: object = None
) -> str | None:
    """Why ``reward`` cannot reward its own row's gold, or ``None``: the gold written as a
    :func:`perfect_completion` (the ``solution``; the ``box`` for the box rewards, and when there is no
    solution) must earn a built-in reward's maximum, and a custom reward (whose maximum is its own) more than 0
    when it names a gold column (``solution``, ``answer`` or ``box``) among its parameters.

    Closes the class "the row passes the check, then every completion scores 0": a gold in a layout the
    reward cannot parse. Not judged: built-ins that read no gold, rows without one, and a custom reward that
    raises here (it may need columns only a run has; inside a run its errors are counted per step).
    """
    if (spec in REWARDS and spec not in REWARD_MAXIMUM) or (spec not in REWARDS and not _reads_gold(reward)):
        return None
    gold = box if spec in BOX_REWARDS or solution is None else solution
    if gold is None or (spec in BOX_REWARDS and (as_corner_box if spec == "giou" else as_box)(box) is None):
        return None
    if isinstance(gold, (list, tuple)):
        answer = str([float(v) for v in gold])  # a box as a model writes it: [x1, y1, x2, y2]
    else:
        answer = gold_text(gold) or str(gold)  # <answer>3</answer> golds: their content
    size = (
        _IDENTITY_SIZE.get(getattr(reward, "params", {}).get("coordinates", "pixels"))
        if spec == "giou"
        else None
    )
    columns = {"solution": [solution], "box": [box], "family": [family], "image_size": [size]}
    if method is not None:
        columns["accu_reward_method"] = [method]
    if reward is REWARDS.get("accuracy"):
        columns["timeout"] = CHECK_TIMEOUT
    try:
        score = _checked(spec, reward([perfect_completion(answer)], **columns), 1)[0]
    except Exception:  # a custom reward may need columns only a run has; in a run its errors are counted
        return None
    best = REWARD_MAXIMUM.get(spec)
    if score is not None and (score >= best - 1e-9 if best is not None else score > 0):
        return None
    shown = "None (not applicable)" if score is None else f"{score:g}"
    return f"reward '{spec}' scores the gold itself {shown}" + (f" (its maximum is {best:g})" if best else "")


def _reads_gold(reward: RewardFn) -> bool:
    """Whether a custom reward names a gold column among its parameters (TRL's ``fn(completions, solution,
    **kwargs)``); one that takes only ``**kwargs`` may score anything (a length, a style) and is not judged."""
    try:
        names = inspect.signature(reward).parameters
    except (TypeError, ValueError):
        return False
    return any(name in names for name in ("solution", "answer", "box"))


def _import(spec: str) -> Any:
    module_name, _, attr = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise AlignError(f"reward '{spec}': file {path} not found")
            file_spec = importlib.util.spec_from_file_location(f"align_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(file_spec)  # type: ignore[arg-type]
            file_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except AlignError:
        raise
    except Exception as err:
        raise AlignError(
            f"reward '{spec}': cannot import '{module_name}': {type(err).__name__}: {err}"
        ) from err
    if not hasattr(module, attr):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise AlignError(
            f"reward '{spec}': '{module_name}' has no '{attr}' (callables: {', '.join(public) or 'none'})"
        )
    return getattr(module, attr)


def _bind(name: str, fn: RewardFn, params: Mapping[str, Any]) -> RewardFn:
    """``fn`` with ``params`` fixed; they win over same-named data columns."""
    signature = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
    named = [
        p for p, v in signature.items() if v.kind is not inspect.Parameter.VAR_KEYWORD and p != "completions"
    ]
    unknown = [p for p in params if p not in named]
    if unknown and (not takes_any or name in REWARDS):
        raise AlignError(
            f"reward '{name}' has no parameter {', '.join(map(repr, unknown))} (parameters: {', '.join(named)})"
        )
    problem = PARAMETER_PROBLEMS[name](params) if name in PARAMETER_PROBLEMS else None
    if problem is not None:
        raise AlignError(f"reward '{name}' {problem}")

    def bound(completions: Sequence[Any], **columns: Any) -> list:
        return fn(completions, **{**columns, **params})

    bound.__name__ = getattr(fn, "__name__", name)
    bound.params = dict(params)  # type: ignore[attr-defined]  # read by gold_self_check
    return bound


def load_reward(spec: str, params: Mapping[str, Any] | None = None) -> RewardFn:
    """A reward by name (:data:`REWARDS`) or ``module:function`` / ``path/to/file.py:function``, with
    ``params`` bound as keyword arguments. Raises :class:`AlignError` naming what is missing."""
    if spec in REWARDS:
        fn = REWARDS[spec]
    elif ":" in spec:
        fn = _import(spec)
        if not callable(fn):
            raise AlignError(f"reward '{spec}' is a {type(fn).__name__}, not a function")
    else:
        close = difflib.get_close_matches(spec, list(REWARDS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise AlignError(
            f"unknown reward '{spec}': {hint}built-in rewards are {', '.join(REWARDS)}; "
            "custom ones are written 'module:function' or 'path/to/file.py:function'"
        )
    return _bind(spec, fn, params) if params else fn


def _checked(name: str, scores: object, n: int) -> list[float | None]:
    """Scores as floats/None; NaN (TRL's "not applicable") becomes None; anything else is an error."""
    if not isinstance(scores, Sequence) or isinstance(scores, str) or len(scores) != n:
        got = len(scores) if isinstance(scores, Sequence) else type(scores).__name__
        raise AlignError(f"reward '{name}' returned {got} scores for {n} completions")
    out: list[float | None] = []
    for i, s in enumerate(scores):
        if s is None or (isinstance(s, numbers.Real) and math.isnan(s)):
            out.append(None)
        elif isinstance(s, numbers.Real) and math.isfinite(s):
            out.append(float(s))
        else:
            raise AlignError(
                f"reward '{name}' returned {s!r} for completion {i}: expected a finite number or None"
            )
    return out


def _one_by_one(
    name: str, fn: RewardFn, completions: Sequence[Any], columns: Mapping[str, Any]
) -> tuple[list, int]:
    """Score each completion alone so one bad row does not cost the whole batch: (scores, failures)."""
    n = len(completions)
    scores: list[float | None] = []
    failures = 0
    for i in range(n):
        row = {k: [v[i]] if isinstance(v, (list, tuple)) and len(v) == n else v for k, v in columns.items()}
        try:
            scores.extend(_checked(name, fn([completions[i]], **row), 1))
        except Exception:
            scores.append(None)
            failures += 1
    return scores, failures


def score_all(
    funcs: Mapping[str, RewardFn],
    completions: Sequence[Any],
    columns: Mapping[str, Any],
    on_error: Literal["skip", "raise"] = "skip",
) -> tuple[list[list[float | None]], dict[str, int]]:
    """Call every reward on the batch: ``(matrix, error_counts)``.

    ``matrix[i][j]`` is reward ``j`` (in ``funcs`` order) for completion ``i``. If a reward raises or returns
    something invalid, ``on_error="raise"`` re-raises; ``"skip"`` logs one warning, retries completion by
    completion, and leaves ``None`` where it still fails; ``error_counts[name]`` counts those completions.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    n = len(completions)
    errors = dict.fromkeys(funcs, 0)
    per_reward: list[list[float | None]] = []
    for name, fn in funcs.items():
        try:
            per_reward.append(_checked(name, fn(completions, **columns), n))
            continue
        except RewardSetupError:
            raise
        except Exception as err:
            if on_error == "raise":
                raise
            scores, errors[name] = _one_by_one(name, fn, completions, columns)
            logger.warning(
                "reward '%s' failed (%s: %s); %d of %d scores set to None",
                name,
                type(err).__name__,
                err,
                errors[name],
                n,
            )
        per_reward.append(scores)
    return [[column[i] for column in per_reward] for i in range(n)], errors
