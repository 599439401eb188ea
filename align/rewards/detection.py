"""Rewards of the published perception RL systems: Visual-RFT's detection and classification rewards, VLM-R1's
REC format reward, and a GIoU grounding reward for answers written as two corner points.

**Detections** (Visual-RFT's layout): the gold and the answer are lists of objects, each with a box
``[x1, y1, x2, y2]`` under ``Position`` (Visual-RFT), ``bbox_2d`` (Qwen2.5-VL, VLM-R1) or ``bbox``, and an
optional confidence under ``Confidence`` or ``score`` (a prediction without one counts as sure, 1.0). JSON or a
Python literal (Visual-RFT writes single quotes) inside ``<answer>``; an unterminated list is read up to its last
complete object, as Visual-RFT reads it. Predictions with the same box count once.

:func:`detection_iou` (Visual-RFT's ``accuracy_iou``): predictions in order of confidence, each matched to the
unused gold box it overlaps most when that IoU is above 0.5; ``sum of matched IoUs / max(#gold, #predicted)``.
:func:`detection_confidence` (Visual-RFT's ``accuracy_confidence``): the mean over predictions of ``c`` for a
matched one and ``1 - c`` for one that matched nothing. Both are in ``[0, 1]``. Where Visual-RFT scores 0 by
an exception, these say what they mean: an empty gold list answered by an empty list scores 1 (nothing to
find, nothing claimed); a gold that is not such a list is ``None`` (not applicable), so the data check names
the row. Visual-RFT also gives 1 to any completion math_verify finds equal to the gold; that shortcut is left
out (it compares the whole completion text, so it adds nothing a correct list does not already earn).

:func:`classification` (Visual-RFT's classification reward): the answer and gold with spaces and underscores
removed, case folded; 1 if one contains the other and the answer is not empty (Visual-RFT's test also
rewards an empty answer, which is in every gold).

:func:`rec_format` (VLM-R1's REC format): ``<think>…</think>`` then an ``<answer>`` holding a JSON object with
four whole numbers in brackets (``{"bbox_2d": [10, 20, 30, 40]}``).

:func:`giou` (generalised IoU, Rezatofighi et al. 2019) of the answer's box with the gold box, mapped to
``[0, 1]`` as ``(1 + GIoU) / 2``: unlike IoU it still ranks boxes that miss the gold by their distance, and a
malformed answer scores 0, never more than a box that exists. The answer may be ``[x1, y1, x2, y2]`` or two
points ``(x1,y1),(x2,y2)`` (Qwen2-VL's grounding syntax). ``coordinates`` states the answer's scale: ``pixels``
(the gold's), ``norm1000`` (Qwen2-VL: 0-1000 of the image's width and height) or ``norm1`` (0-1); the normalised
scales need the row's ``image_size``.
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

from align.rewards.answers import gold_text
from align.rewards.boxes import Box, box_iou, parse_box, valid_box
from align.rewards.extract import as_text, extract_answer, format_score

COORDINATES: tuple[str, ...] = ("pixels", "norm1000", "norm1")
_BOX_KEYS = ("Position", "bbox_2d", "bbox")
_CONFIDENCE_KEYS = ("Confidence", "score")
_MATCH_IOU = 0.5
_REC_ANSWER = re.compile(r"\{.*\[\s*\d+\s*,\s*\d+\s*,\s*\d+\s*,\s*\d+\s*\].*\}", re.DOTALL)
_NUM = r"[-+]?(?:\d{1,9}(?:\.\d{0,9})?|\.\d{1,9})"
_TWO_POINTS = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_MAX_OBJECTS = 1000


def _literal(text: str) -> Any:
    """``text`` as JSON, else as a Python literal (Visual-RFT's single quotes); ``None`` if neither."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def parse_detections(text: object) -> list[tuple[Box, float]] | None:
    """The ``(box, confidence)`` objects of a detection list (module docstring), ``None`` if ``text`` is not one.

    An object without a valid box makes the whole list invalid (a model must not earn a match by writing
    garbage beside a good box); duplicates (the same box) are kept once.
    """
    if not isinstance(text, str):
        return None
    text = text.strip()
    if len(text) > 100_000 or not text.startswith("["):
        return None
    if not text.endswith("]") and "}," in text:
        text = text[: text.rindex("},") + 1] + "]"  # cut off mid-object: keep the complete ones
    value = _literal(text)
    if not isinstance(value, list) or len(value) > _MAX_OBJECTS:
        return None
    found: dict[Box, float] = {}
    for item in value:
        if not isinstance(item, dict):
            return None
        box = next((valid_box(item[k]) for k in _BOX_KEYS if k in item), None)
        confidence = next((item[k] for k in _CONFIDENCE_KEYS if k in item), 1.0)
        if box is None or isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
            return None
        if not math.isfinite(confidence):
            return None
        found.setdefault(box, min(max(float(confidence), 0.0), 1.0))
    return list(found.items())


def _gold_detections(solution: object) -> list[tuple[Box, float]] | None:
    return parse_detections(gold_text(solution))


def _matches(predicted: list[tuple[Box, float]], gold: list[tuple[Box, float]]) -> list[float]:
    """Per prediction, most confident first: the IoU of the gold box it took (0.0 if none above 0.5)."""
    unused = [box for box, _ in gold]
    out = []
    for box, _ in sorted(predicted, key=lambda p: -p[1]):
        best = max(unused, key=lambda g: box_iou(box, g), default=None)
        overlap = box_iou(box, best) if best is not None else 0.0
        if overlap > _MATCH_IOU:
            unused.remove(best)
            out.append(overlap)
        else:
            out.append(0.0)
    return out


def _scored(completion: object, solution: object) -> tuple[list, list, list[float]] | None:
    gold = _gold_detections(solution)
    if gold is None:
        return None
    predicted = parse_detections(extract_answer(completion)) or []
    return gold, predicted, _matches(predicted, gold)


def detection_iou(completion: object, solution: object) -> float | None:
    """Visual-RFT's IoU reward (module docstring); ``None`` if the gold is not a detection list."""
    scored = _scored(completion, solution)
    if scored is None:
        return None
    gold, predicted, matched = scored
    if not gold and not predicted:
        return 1.0
    return min(sum(matched) / max(len(gold), len(predicted)), 1.0)


def detection_confidence(completion: object, solution: object) -> float | None:
    """Visual-RFT's confidence reward (module docstring); ``None`` if the gold is not a detection list."""
    scored = _scored(completion, solution)
    if scored is None:
        return None
    gold, predicted, matched = scored
    if not predicted:
        return 0.0 if gold else 1.0
    by_confidence = sorted((c for _, c in predicted), reverse=True)
    terms = [c if m > 0 else 1.0 - c for c, m in zip(by_confidence, matched, strict=True)]
    return sum(terms) / len(terms)


def _squashed(text: str) -> str:
    return re.sub(r"[\s_]+", "", text).casefold()


def classification(completion: object, solution: object) -> float | None:
    """Visual-RFT's classification reward (module docstring); ``None`` for a blank gold."""
    gold = gold_text(solution)
    if gold is None or not _squashed(gold):
        return None
    answer = extract_answer(completion)
    if answer is None or not _squashed(answer):
        return 0.0
    a, g = _squashed(answer), _squashed(gold)
    return float(g in a or a in g)


def rec_format(completion: object) -> float:
    """VLM-R1's REC format reward (module docstring): 1.0 or 0.0."""
    if format_score(completion) != 1.0:
        return 0.0
    answer = extract_answer(as_text(completion))
    return float(answer is not None and _REC_ANSWER.search(answer) is not None)


def parse_corner_box(text: object) -> Box | None:
    """The first box written as two corners ``(x1,y1),(x2,y2)``, else as :func:`parse_box` reads one."""
    if not isinstance(text, str):
        return None
    m = _TWO_POINTS.search(text)
    if m is not None:
        return valid_box([float(v) for v in m.groups()])
    return parse_box(text)


def as_corner_box(value: object) -> Box | None:
    """A gold box from a dataset column: 4 numbers, or a string holding a box in either syntax."""
    return parse_corner_box(value) if isinstance(value, str) else valid_box(value)


def _in_pixels(box: Box, coordinates: str, image_size: object) -> Box | None:
    if coordinates == "pixels":
        return box
    if not (isinstance(image_size, (list, tuple)) and len(image_size) == 2):
        return None
    width, height = (float(v) for v in image_size)
    scale = 1000.0 if coordinates == "norm1000" else 1.0
    return box[0] * width / scale, box[1] * height / scale, box[2] * width / scale, box[3] * height / scale


def generalized_iou(a: Box, b: Box) -> float:
    """GIoU of two valid boxes: IoU minus the share of their enclosing box that neither covers; in (-1, 1]."""
    enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return box_iou(a, b) - (enclosing - union) / enclosing


def giou(
    completion: object, box: object, image_size: object = None, coordinates: str = "pixels"
) -> float | None:
    """``(1 + GIoU) / 2`` of the answer's box with the gold ``box`` (pixels of the original image); ``None`` if
    the gold is invalid or a normalised scale has no ``image_size``; 0.0 without a valid answer box."""
    if coordinates not in COORDINATES:
        raise ValueError(f"coordinates must be one of {', '.join(COORDINATES)}, got {coordinates!r}")
    gold = as_corner_box(box)
    if gold is None or (coordinates != "pixels" and _in_pixels(gold, coordinates, image_size) is None):
        return None
    answer = extract_answer(completion)
    pred = parse_corner_box(answer) if answer is not None else None
    pred = _in_pixels(pred, coordinates, image_size) if pred is not None else None
    pred = valid_box(list(pred)) if pred is not None else None
    return 0.0 if pred is None else (1.0 + generalized_iou(pred, gold)) / 2.0
