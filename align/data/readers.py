"""Data files -> :class:`~align.data.sample.Sample`, one row at a time, never crashing on a bad row.

:func:`read_source` yields, for every row of a source, exactly one of

* a ``Sample`` (structurally valid: roles, placeholders = images, non-empty answers, well-formed boxes),
* a :class:`RowProblem` (``origin``, ``kind``, ``reason``) that ``align data check`` lists and stages refuse,
* a :class:`FilteredRow`, a valid row the source itself marks as unusable (R1-Onevision's judge).

Formats (``DataSource.format``):

* ``llava``: ``{"id", "image": "a.jpg" | [...], "conversations": [{"from": "human"|"gpt"|"system", "value"}]}``
* ``messages``: ``{"messages": [{"role", "content"}], "images": [...]}``; content may be a list of
  ``{"type": "image"}`` / ``{"type": "text", "text"}`` parts, which become ``<image>`` placeholders.
* ``rl`` (R1-V / VLM-R1): ``{"image", "problem" | "question", "solution"}``; the user turn is
  ``question_template.format(question=...)`` with one ``<image>\\n`` per image prepended when the question has
  no placeholder. ``Sample.answer`` is the raw solution; a box ``[x1, y1, x2, y2]`` (list, or string, optionally
  in ``<answer>`` tags) also goes to ``meta["box"]``. Other fields (``id``, ``family``...) go to ``meta``.
* ``r1_onevision``: LLaVA conversations plus ``gt`` (-> ``answer``) and optional ``filter`` /
  ``judge_response`` verdicts; rows not judged valid are filtered.
* ``hf``: a ``load_from_disk`` folder or parquet/JSON files; rows with a messages column are conversations,
  others are question/answer rows handled like ``rl``. Image columns may be decoded images or paths.

JSON files are read as one array when they start with ``[`` (origin ``file:[index]``), else as JSON lines
(origin ``file:line``). Image paths are resolved against ``image_root`` (default: the data file's folder) but
not opened here: :mod:`align.data.check` does that.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from align.data.config import DataSource
from align.data.readers_hf import read_hf
from align.data.rows import (
    FilteredRow,
    Row,
    RowContext,
    RowError,
    RowProblem,
    conversation_row,
    gold_text,
    question_row,
    row_images,
)
from align.data.sample import Sample

__all__ = ["FilteredRow", "Row", "RowProblem", "judge_verdict", "read_source"]

_BOM = b"\xef\xbb\xbf"  # some editors start UTF-8 files with it; json.loads refuses it


def read_source(source: DataSource) -> Iterator[Row]:
    """Every row of ``source`` as a Sample, RowProblem or FilteredRow, in file order."""
    path = Path(source.path)
    root = Path(source.image_root) if source.image_root else (path if path.is_dir() else path.parent)
    ctx = RowContext(
        source.name,
        root,
        source.allow_outside_root,
        source.system_prompt,
        source.question_template,
        source.insert_image_placeholders,
    )
    if source.format == "hf":
        yield from read_hf(source, ctx)
        return
    convert = {"llava": _llava, "messages": _messages, "rl": _rl, "r1_onevision": _onevision}[source.format]
    for origin, record in _json_records(path):
        if isinstance(record, RowProblem):
            yield record
        else:
            yield _convert(convert, record, origin, ctx)


def _convert(
    convert: Callable[[dict, RowContext], Sample | str], record: dict, origin: str, ctx: RowContext
) -> Row:
    try:
        row = convert(record, ctx)
    except RowError as bad:
        return RowProblem(origin, bad.kind, bad.reason)
    if isinstance(row, str):  # a converter returns a string to say "valid but filtered out"
        return FilteredRow(origin, row)
    row.origin = origin
    return row


# ---------------------------------------------------------------- JSON / JSONL


def _json_records(path: Path) -> Iterator[tuple[str, dict | RowProblem]]:
    if not path.is_file():
        yield str(path), RowProblem(str(path), "file", "data file not found")
        return
    with path.open("rb") as f:
        head = f.read(4096).removeprefix(_BOM).lstrip()
    if head.startswith(b"["):
        yield from _json_array(path)
    else:
        yield from _json_lines(path)


def _json_lines(path: Path) -> Iterator[tuple[str, dict | RowProblem]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            origin = f"{path}:{lineno}"
            if lineno == 1:
                raw = raw.removeprefix(_BOM)
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad = raw[err.start : err.start + 1].hex()
                yield origin, RowProblem(origin, "utf8", f"not UTF-8: byte 0x{bad} at column {err.start + 1}")
                continue
            try:
                record = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as err:  # one line: the character offset is the column
                yield origin, RowProblem(origin, "json", f"malformed JSON: {err.msg} at column {err.pos + 1}")
                continue
            if not isinstance(record, dict):
                yield (
                    origin,
                    RowProblem(origin, "row", f"expected a JSON object, got {type(record).__name__}"),
                )
                continue
            yield origin, record


def _json_array(path: Path) -> Iterator[tuple[str, dict | RowProblem]]:
    data = path.read_bytes().removeprefix(_BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        bad = data[err.start : err.start + 1].hex()
        origin = f"{path}:{line}"
        yield (
            origin,
            RowProblem(origin, "utf8", f"not UTF-8: byte 0x{bad}; the whole JSON array is unreadable"),
        )
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        origin = f"{path}:{err.lineno}"
        yield (
            origin,
            RowProblem(
                origin,
                "json",
                f"malformed JSON: {err.msg} at column {err.colno}; the whole array is unreadable",
            ),
        )
        return
    for i, record in enumerate(records):
        origin = f"{path}:[{i}]"
        if isinstance(record, dict):
            yield origin, record
        else:
            yield origin, RowProblem(origin, "row", f"expected a JSON object, got {type(record).__name__}")


# ---------------------------------------------------------------- formats


def _llava(record: dict, ctx: RowContext) -> Sample:
    return conversation_row(record, "conversations", "image", ctx)


def _messages(record: dict, ctx: RowContext) -> Sample:
    return conversation_row(record, "messages", "images" if "images" in record else "image", ctx)


def _rl(record: dict, ctx: RowContext) -> Sample:
    image_field = "images" if "images" in record else "image"
    images = row_images(record.get(image_field), ctx)
    question = record.get("problem", record.get("question"))
    solution = record.get("solution", record.get("answer"))
    used = {image_field, "problem", "question", "solution", "answer"}
    return question_row(record, question, solution, images, used, ctx)


_VALID = {"yes", "valid", "correct", "true", "pass", "passed", "right", "1"}
_INVALID = {"no", "not", "invalid", "incorrect", "false", "fail", "failed", "wrong", "0"}


def judge_verdict(value: Any) -> bool | None:
    """A filter / judge field as valid (True), invalid (False) or unrecognised (None).

    Booleans and numbers are taken as they are; text is valid when it contains a word like "yes", "valid" or
    "correct" and none like "no", "not", "invalid" or "incorrect" (negations win).
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value > 0
    if not isinstance(value, str):
        return None
    words = set(re.findall(r"[a-z0-9]+", value.lower()))
    if words & _INVALID:
        return False
    if words & _VALID:
        return True
    return None


def _onevision(record: dict, ctx: RowContext) -> Sample | str:
    for key in ("filter", "judge_response"):
        if key in record:
            verdict = judge_verdict(record[key])
            if verdict is not True:
                said = "not valid" if verdict is False else "not recognised as a verdict"
                return f"{key} {record[key]!r:.40} is {said}"
    sample = conversation_row(record, "conversations", "image", ctx)
    sample.meta.pop("filter", None)
    sample.meta.pop("judge_response", None)
    gt = sample.meta.pop("gt", None)
    if gt is not None:
        sample.answer = gold_text(gt, "gt")
        if not sample.answer:
            raise RowError("answer", "empty 'gt'")
    return sample
