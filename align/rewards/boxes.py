"""Boxes for grounding: parsing, IoU rewards, and mapping between the original image and the model's input.

**The one box convention**: ``[x1, y1, x2, y2]`` in absolute pixels of the ORIGINAL image, x to the right,
y down, ``x2 > x1`` and ``y2 > y1``. Gold boxes in data and boxes the model is asked to answer use it.
``image_size`` is always ``(width, height)``, as in PIL.

The model does not see the original image: processors resize it. :func:`box_to_model_input` and its inverse
:func:`box_from_model_input` map boxes for the three resize policies (``target_size`` is the model input,
an int for a square or ``(width, height)``):

* ``"shortest_edge_center_crop"`` (CLIP processors): scale so the image covers the target (for a square
  target: shortest edge to the target side, the other edge truncated to an int, as transformers does), then
  crop the centre, offset ``(resized - target) // 2``.
* ``"squash"`` (SigLIP processors): each axis scaled to the target independently.
* ``"pad"`` (LLaVA ``expand2square``): paste onto a square of side ``max(w, h)`` at offset
  ``((side - w) // 2, (side - h) // 2)``, then scale to the target.

Mapped boxes are not clipped (a box can extend past a centre crop); :func:`clip_box` clips when needed.

Model output is parsed by :func:`parse_box`: the first ``[x1, y1, x2, y2]`` or ``(x1, y1, x2, y2)`` (spaces,
floats, signs, exponents; so JSON like ``{"bbox_2d": [1, 2, 3, 4]}`` works), else keys ``x1 y1 x2 y2``
(``{"x1": 1, ...}`` or ``x1=1``). Invalid boxes (wrong arity, NaN, inf, ``x2 <= x1``) score 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

from align.rewards.extract import extract_answer, fold_math

Box = tuple[float, float, float, float]
Resize = Literal["shortest_edge_center_crop", "squash", "pad"]
RESIZES: tuple[str, ...] = ("shortest_edge_center_crop", "squash", "pad")

# Bounded repetitions keep every match attempt short, whatever the model wrote.
_NUM = r"[-+]?(?:\d{1,9}(?:\.\d{0,9})?|\.\d{1,9})(?:[eE][-+]?\d{1,3})?"
_BRACKETED = re.compile(rf"[\[(]\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*[\])]")
_KEYED = {key: re.compile(rf"\b{key}\b[\"']?\s*[:=]\s*({_NUM})") for key in ("x1", "y1", "x2", "y2")}


def valid_box(box: object) -> Box | None:
    """``box`` as four floats if it is a valid box in the convention, else ``None``."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in box):
        return None
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


def parse_box(text: str) -> Box | None:
    """The first box written in ``text`` (formats in the module docstring), or ``None`` if none is valid."""
    if not isinstance(text, str):
        return None
    text = fold_math(text)
    m = _BRACKETED.search(text)
    if m is not None:
        return valid_box([float(v) for v in m.groups()])
    keyed = [pattern.search(text) for pattern in _KEYED.values()]
    if all(keyed):
        return valid_box([float(k.group(1)) for k in keyed])  # type: ignore[union-attr]
    return None


def as_box(value: object) -> Box | None:
    """A gold box from a dataset column: a list of 4 numbers or a string holding one."""
    return parse_box(value) if isinstance(value, str) else valid_box(value)


def clip_box(box: Box, size: Sequence[float]) -> Box | None:
    """``box`` clipped to ``[0, width] x [0, height]``; ``None`` if nothing of it is inside."""
    width, height = size
    return valid_box([max(box[0], 0.0), max(box[1], 0.0), min(box[2], width), min(box[3], height)])


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two valid boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _image_size(image_size: object) -> tuple[float, float] | None:
    if not isinstance(image_size, (list, tuple)) or len(image_size) != 2:
        return None
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in image_size):
        return None
    return float(image_size[0]), float(image_size[1])


def iou_soft(completion: object, box: object, image_size: object = None) -> float | None:
    """IoU of the answer's box with the gold ``box``: ``None`` if the gold (or a given ``image_size``) is
    invalid, 0.0 if the answer has no valid box. With ``image_size`` the predicted box is clipped to the
    image first, so area that does not exist is not counted against it."""
    gold = as_box(box)
    size = _image_size(image_size) if image_size is not None else None
    if gold is None or (image_size is not None and size is None):
        return None
    answer = extract_answer(completion)
    pred = parse_box(answer) if answer is not None else None
    if pred is not None and size is not None:
        pred = clip_box(pred, size)
    return 0.0 if pred is None else box_iou(pred, gold)


def iou(completion: object, box: object, image_size: object = None, threshold: float = 0.5) -> float | None:
    """1.0 if :func:`iou_soft` is above ``threshold`` (VLM-R1: 0.5), else 0.0; ``None`` as there."""
    soft = iou_soft(completion, box, image_size)
    return None if soft is None else float(soft > threshold)


def _target(target_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(target_size, int):
        return target_size, target_size
    width, height = target_size
    return int(width), int(height)


def _affine(image_size: Sequence[float], target_size: int | Sequence[int], resize: str) -> Box:
    """(sx, sy, dx, dy) with ``model = original * s + d`` on each axis."""
    size = _image_size(image_size)
    if size is None:
        raise ValueError(f"image_size must be (width, height) > 0, got {image_size!r}")
    w, h = size
    tw, th = _target(target_size)
    if tw <= 0 or th <= 0:
        raise ValueError(f"target_size must be > 0, got {target_size!r}")
    if resize == "squash":
        return tw / w, th / h, 0.0, 0.0
    if resize == "pad":
        side = max(w, h)
        sx, sy = tw / side, th / side
        return sx, sy, ((side - w) // 2) * sx, ((side - h) // 2) * sy
    if resize == "shortest_edge_center_crop":
        if tw / w >= th / h:
            rw, rh = tw, int(tw * h / w)
        else:
            rw, rh = int(th * w / h), th
        return rw / w, rh / h, -float((rw - tw) // 2), -float((rh - th) // 2)
    raise ValueError(f"resize must be one of {', '.join(RESIZES)}, got {resize!r}")


def box_to_model_input(
    box: Sequence[float], image_size: Sequence[float], target_size: int | Sequence[int], resize: Resize
) -> Box:
    """A box in original-image pixels → the same region in the model's input pixels (not clipped)."""
    sx, sy, dx, dy = _affine(image_size, target_size, resize)
    x1, y1, x2, y2 = box
    return x1 * sx + dx, y1 * sy + dy, x2 * sx + dx, y2 * sy + dy


def box_from_model_input(
    box: Sequence[float], image_size: Sequence[float], target_size: int | Sequence[int], resize: Resize
) -> Box:
    """Inverse of :func:`box_to_model_input`: model-input pixels → original-image pixels."""
    sx, sy, dx, dy = _affine(image_size, target_size, resize)
    x1, y1, x2, y2 = box
    return (x1 - dx) / sx, (y1 - dy) / sy, (x2 - dx) / sx, (y2 - dy) / sy
