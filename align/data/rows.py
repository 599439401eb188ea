"""Row dicts -> :class:`~align.data.sample.Sample`: the conversion pieces every reader shares.

Owns the reader result types (:class:`RowProblem`, :class:`FilteredRow`), the exception converters raise for a
bad row (:class:`RowError`, turned into a RowProblem at the row's origin by the reader), and the checks every
Sample passes before it leaves a reader: known roles, a user turn, non-empty assistant turns, as many
``<image>`` placeholders as images, image paths inside the image root, well-formed boxes.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from align.data.images import open_image_bytes, resolve_image
from align.data.sample import IMAGE_PLACEHOLDER, Sample
from align.errors import AlignError


@dataclass(frozen=True)
class RowProblem:
    origin: str  # "file:line", "file:[index]", "dir[index]" or the file itself for file-level problems
    kind: str  # short category for summary tables, e.g. "json", "placeholders", "image-missing"
    reason: str


@dataclass(frozen=True)
class FilteredRow:
    origin: str
    reason: str


Row = Sample | RowProblem | FilteredRow


class RowError(Exception):
    """A row problem raised inside a converter; the reader turns it into a RowProblem at the row's origin."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class RowContext:
    """What a converter needs from the source: values, so converters stay pure functions of the row."""

    source: str
    image_root: Path
    allow_outside_root: bool
    system_prompt: str | None
    question_template: str
    insert_image_placeholders: bool = False  # conversations without <image>: one per image, first user turn


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def row_images(value: Any, ctx: RowContext) -> list[Any]:
    """Image field -> resolved path strings or PIL images (one per image)."""
    if value is None or value == "" or value == []:
        return []
    items = value if isinstance(value, list) else [value]
    out: list[Any] = []
    for item in items:
        if isinstance(item, Image.Image):
            out.append(item)
        elif isinstance(item, dict) and isinstance(item.get("bytes"), bytes):  # datasets.Image(decode=False)
            try:
                out.append(open_image_bytes(item["bytes"]))
            except AlignError as err:
                raise RowError("image-corrupt", str(err)) from None
        elif isinstance(item, dict) and isinstance(item.get("path"), str):
            out.append(_resolve(item["path"], ctx))
        elif isinstance(item, str) and _is_base64_image(item):
            out.append(_decode_base64_image(item))
        elif isinstance(item, str):
            out.append(_resolve(item, ctx))
        else:
            raise RowError(
                "row", f"an image must be a path or a list of paths, got {type(item).__name__} {item!r:.60}"
            )
    return out


# How base64 text of each format PIL reads in datasets starts (R1-Onevision's rows hold the image itself in
# the `image` column): PNG, JPEG, GIF, WebP. No image path starts like this.
_BASE64_MAGIC = ("iVBORw0KGgo", "/9j/", "R0lGOD", "UklGR")
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,")


def _is_base64_image(text: str) -> bool:
    """A ``data:image/...;base64,`` URL, or base64 text long enough to be an image that starts like one."""
    return bool(_DATA_URL.match(text)) or (len(text) >= 64 and text.startswith(_BASE64_MAGIC))


def _decode_base64_image(text: str) -> Image.Image:
    payload = _DATA_URL.sub("", text, count=1)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RowError(
            "image-corrupt", f"base64 image ({len(text)} characters): not valid base64: {err}"
        ) from None
    try:
        return open_image_bytes(data)
    except AlignError as err:
        raise RowError("image-corrupt", f"base64 image: {err}") from None


def _resolve(ref: str, ctx: RowContext) -> str:
    try:
        return str(resolve_image(ref, ctx.image_root, ctx.allow_outside_root))
    except AlignError as err:
        raise RowError("image-path", str(err)) from None


def _text(part: Any, where: str) -> str:
    if not isinstance(part, str):
        raise RowError("row", f"{where} must be text, got {type(part).__name__}")
    return part


def _content(content: Any, where: str, images: list[Any], ctx: RowContext) -> str:
    """Message content (a string, or a list of text/image parts) -> text with <image> placeholders."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RowError("row", f"{where} must be a string or a list of parts, got {type(content).__name__}")
    pieces: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(_text(part.get("text"), f"{where}[{j}].text"))
        elif kind == "image":
            pieces.append(IMAGE_PLACEHOLDER)
            inline = part.get("image", part.get("path"))
            if inline is not None:  # Qwen-VL style: the path sits in the part itself
                images.extend(row_images(inline, ctx))
        else:
            raise RowError("row", f"{where}[{j}] must be {{'type': 'text'|'image'}}, got {part!r:.60}")
    # "<image>" followed by text reads as in LLaVA data: the placeholder on its own line
    text = ""
    for j, piece in enumerate(pieces):
        text += piece
        if piece == IMAGE_PLACEHOLDER and j + 1 < len(pieces) and not pieces[j + 1].startswith("\n"):
            text += "\n"
    return text


def row_turns(turns: Any, field: str, images: list[Any], ctx: RowContext) -> list[dict[str, str]]:
    """LLaVA ``{from, value}`` or chat ``{role, content}`` turns -> messages; empty turns are problems."""
    if not isinstance(turns, list) or not turns:
        raise RowError("row", f"'{field}' must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise RowError("row", f"{where} must be an object, got {type(turn).__name__}")
        raw_role = turn.get("from", turn.get("role"))
        role = _ROLES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise RowError("row", f"{where} has role {raw_role!r}; expected one of {', '.join(_ROLES)}")
        content = _content(turn.get("value", turn.get("content")), where, images, ctx)
        if role == "assistant" and not content.strip():
            raise RowError("answer", f"empty assistant turn ({where})")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in messages):
        raise RowError("row", f"'{field}' has no user turn")
    return messages


def _n(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def template_first_user_turn(messages: list[dict[str, str]], ctx: RowContext) -> list[dict[str, str]]:
    """Conversation rows: the source's ``question_template`` around the first user turn, as VLM-R1 and
    R1-Onevision's RL code put their instruction after the row's question."""
    if ctx.question_template == "{question}":
        return messages
    first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first is None:
        return messages
    messages = [dict(m) for m in messages]
    messages[first]["content"] = ctx.question_template.format(question=messages[first]["content"])
    return messages


def finish_messages(
    messages: list[dict[str, str]], images: list[Any], ctx: RowContext, needs_assistant: bool
) -> list[dict]:
    if needs_assistant and not any(m["role"] == "assistant" for m in messages):
        raise RowError("answer", "no assistant turn to learn from")
    n = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if n == 0 and images and ctx.insert_image_placeholders:
        # ms-swift, R1-Onevision's RL rows: the images go before the first user turn's text
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages = [dict(m) for m in messages]
        messages[first]["content"] = f"{IMAGE_PLACEHOLDER}\n" * len(images) + messages[first]["content"]
        n = len(images)
    if n != len(images):
        hint = (
            " (rows written without placeholders: set insert_image_placeholders: true on the source to put "
            "them at the start of the first user turn)"
            if n == 0
            else ""
        )
        raise RowError(
            "placeholders",
            f"{_n(n, IMAGE_PLACEHOLDER + ' placeholder')} but {_n(len(images), 'image')}{hint}",
        )
    if ctx.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": ctx.system_prompt}, *messages]
    return messages


def row_meta(record: dict, used: set[str]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in used and not isinstance(v, Image.Image)}


def parse_box(value: Any) -> list[float] | None:
    """``[x1, y1, x2, y2]`` from a list or a string (``<answer>`` tags allowed); None if not 4 numbers."""
    if isinstance(value, str):
        match = _ANSWER_TAG.search(value)
        text = (match.group(1) if match else value).strip()
        if not (text.startswith("[") and text.endswith("]")):
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
    if not isinstance(value, list) or len(value) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    return list(value)


def _listed(value: Any) -> Any:
    """A string holding a JSON list (optionally in ``<answer>`` tags) as that list; anything else as it is."""
    if isinstance(value, str):
        match = _ANSWER_TAG.search(value)
        text = (match.group(1) if match else value).strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                return value
    return value


def _number_list(value: Any) -> bool:
    """Whether ``value`` is, or is a string of, a non-empty list of numbers (NaN included): a box answer."""
    value = _listed(value)
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def _why_not(value: Any) -> str:
    """What is wrong with a box-like value that :func:`parse_box` refused, as a suffix for the message."""
    value = _listed(value)
    if not isinstance(value, list):
        return ""
    if len(value) != 4:
        return f" ({len(value)} coordinates)"
    return " (coordinates must be finite numbers)"


def _box(value: Any, declared: bool) -> list[float] | None:
    """The row's box, or None; a declared box (grounding row, ``box`` field) must parse and be ordered."""
    box = parse_box(value)
    if box is None:
        if declared:
            raise RowError(
                "box", f"malformed box: expected [x1, y1, x2, y2], got {value!r:.80}{_why_not(value)}"
            )
        return None
    x1, y1, x2, y2 = box
    if x1 < 0 or y1 < 0 or x2 <= x1 or y2 <= y1:
        if not declared:  # four numbers that are not a box (e.g. a list answer) on a non-grounding row
            return None
        raise RowError("box", f"malformed box {box}: need 0 <= x1 < x2 and 0 <= y1 < y2")
    return box


def gold_text(value: Any, field: str) -> str:
    """A gold answer as the rewards read it: text as written, a finite number or a box as JSON.

    Anything else (an object, a list that is not a box, NaN) would reach the accuracy reward as JSON text it
    can only score 0 against, so it is a row problem here.
    """
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value)):
        return json.dumps(value)
    if isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        _box(value, declared=True)  # a list of numbers must be a box; raises saying what is wrong with it
        return json.dumps(value)
    kind = "a non-finite number" if isinstance(value, float) else f"a {type(value).__name__}"
    raise RowError(
        "answer", f"'{field}' is {kind} ({value!r:.60}); expected text, a number or a box [x1, y1, x2, y2]"
    )


def conversation_row(record: dict, field: str, image_field: str, ctx: RowContext) -> Sample:
    images = row_images(record.get(image_field), ctx)
    if field not in record:
        raise RowError("row", f"missing '{field}'")
    messages = template_first_user_turn(row_turns(record[field], field, images, ctx), ctx)
    if "solution" not in record:
        messages = finish_messages(messages, images, ctx, needs_assistant=True)
        meta = row_meta(record, {field, image_field})
        # VLM-R1's REC rows: the gpt turn's answer is the box the grounding rewards read
        answer = _ANSWER_TAG.search(messages[-1]["content"]) if messages[-1]["role"] == "assistant" else None
        last = answer.group(1) if answer else messages[-1]["content"]
        declared = meta.get("family") == "grounding" or "box" in meta
        if messages[-1]["role"] == "assistant" and (declared or _number_list(last.strip())):
            # undeclared, four ordered numbers are a box; another number list is an answer like any other
            box = _box(meta.pop("box", last.strip()), declared)
            if box is not None:
                meta["box"] = box
        return Sample(ctx.source, "", messages, images, meta=meta)
    # a GRPO conversation with its gold beside it (ms-swift, open-r1-multimodal): the prompt is the whole
    # conversation, the solution the gold
    answer, meta = _gold_and_meta(record, record["solution"], {field, image_field, "solution"})
    messages = finish_messages(messages, images, ctx, needs_assistant=False)
    return Sample(ctx.source, "", messages, images, answer=answer, meta=meta)


def _gold_and_meta(record: dict, solution: Any, used: set[str]) -> tuple[str, dict[str, Any]]:
    """The gold text of ``solution`` and the row's metadata, a box gold validated and kept as ``meta["box"]``."""
    if solution is None or (isinstance(solution, str) and not solution.strip()):
        raise RowError("answer", "missing or empty solution")
    meta = row_meta(record, used)
    # a solution written as a list of numbers is a box whatever the family says: it must be a valid one
    declared = meta.get("family") == "grounding" or "box" in meta or _number_list(solution)
    box = _box(meta.pop("box", solution), declared)
    if box is not None:
        meta["box"] = box
    return gold_text(solution, "solution"), meta


def question_row(
    record: dict, question: Any, solution: Any, images: list[Any], used: set[str], ctx: RowContext
) -> Sample:
    """R1-V / VLM-R1 question + verifiable solution (also HF question/answer rows)."""
    question = _text(question, "question") if question is not None else None
    if not question or not question.strip():
        raise RowError("row", "missing or empty question ('problem' or 'question')")
    answer, meta = _gold_and_meta(record, solution, used)
    user = ctx.question_template.format(question=question)
    if images and IMAGE_PLACEHOLDER not in user:
        user = f"{IMAGE_PLACEHOLDER}\n" * len(images) + user
    messages = finish_messages([{"role": "user", "content": user}], images, ctx, needs_assistant=False)
    return Sample(ctx.source, "", messages, images, answer=answer, meta=meta)
