"""Pure pieces of ``align data distill``: the teacher prompt, the verdict on a reply, the crash-safe logs.

Owns:

* the prompt template: :func:`load_prompt` (the packaged ``align/prompts/distill.txt`` or the user's file; it
  must hold ``{description}`` and ``{question}``) and :func:`render_prompt` (only those two names are
  substituted, so LaTeX braces in a prompt need no escaping);
* :func:`judge`: a teacher reply + the gold answer -> :class:`Verdict`, the SFT target
  ``<think>\\nreasoning\\n</think>\\n<answer>answer</answer>`` or the reason it is rejected;
* the output logs: :class:`JsonlLog` appends one JSON line per finished row and fsyncs it, :func:`read_log`
  reads a log back after repairing a line a crash cut short.

Rejection reasons (:data:`REASONS`), the first that applies names the row: ``no_gold`` (gold missing or
unusable), ``image_error``, ``no_description`` and ``teacher_error`` (after retries) are decided before or
instead of a reply; then for the reply: ``bad_format`` (more than one think block), ``truncated`` (no answer
and the teacher hit ``max_tokens``), ``no_answer`` (no ``<answer>`` block or ``\\boxed{}`` after the
reasoning), ``wrong_answer`` (the accuracy reward gives 0), ``empty_reasoning``, and ``bad_format`` again for
tags inside the reasoning or the answer.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from align.data.sample import IMAGE_PLACEHOLDER
from align.errors import AlignError
from align.rewards import accuracy, extract_answer, format_score
from align.rewards.extract import ANSWER_OPEN, THINK_CLOSE, THINK_OPEN, last_boxed

KEPT = "kept"
REASONS = (
    "no_gold",
    "image_error",
    "no_description",
    "teacher_error",
    "truncated",
    "no_answer",
    "wrong_answer",
    "empty_reasoning",
    "bad_format",
)
PROMPT_VARIABLES = ("description", "question")
_VARIABLE = re.compile(r"\{(description|question)\}")


def default_prompt_path() -> Path:
    """The packaged default teacher prompt (copy it to edit it, then name the copy in ``prompt:``)."""
    return Path(str(resources.files("align").joinpath("prompts", "distill.txt")))


def load_prompt(path: str | Path | None) -> str:
    """The template in ``path`` (default: :func:`default_prompt_path`); it must use both variables."""
    file = Path(path) if path is not None else default_prompt_path()
    if not file.is_file():
        raise AlignError(f"prompt file {file} not found (recipe key 'prompt')")
    text = file.read_text(encoding="utf-8")
    missing = [name for name in PROMPT_VARIABLES if "{" + name + "}" not in text]
    if missing:
        raise AlignError(
            f"prompt file {file}: must contain {' and '.join('{' + m + '}' for m in missing)} "
            f"(the template variables are {', '.join('{' + v + '}' for v in PROMPT_VARIABLES)})"
        )
    return text


def render_prompt(template: str, description: str, question: str) -> str:
    """``template`` with ``{description}`` and ``{question}`` filled in, in one pass (a description that
    contains the text ``{question}`` stays as it is); every other brace is left alone."""
    values = {"description": description.strip(), "question": question.strip()}
    return _VARIABLE.sub(lambda m: values[m.group(1)], template)


def question_text(messages: list[dict[str, str]]) -> str:
    """The question for the teacher: the last user turn without its ``<image>`` placeholders."""
    user = [m["content"] for m in messages if m["role"] == "user"]
    return user[-1].replace(IMAGE_PLACEHOLDER, "").strip() if user else ""


class Rejected(Exception):
    """A row rejected before the teacher is asked (``reason`` is one of :data:`REASONS`)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Verdict:
    reason: str  # KEPT or one of REASONS
    target: str | None = None  # the assistant turn to train on (kept rows)
    reasoning: str | None = None
    answer: str | None = None
    detail: str = ""


def split_reply(content: str, reasoning: str | None) -> tuple[str | None, str]:
    """``(reasoning, final text)`` of a reply; reasoning is ``None`` when a think block never closes.

    A separate reasoning channel wins; otherwise the text between ``<think>`` (or the start) and ``</think>``;
    a reply with no think tags at all (a non-reasoning teacher) reasons up to its last ``<answer>``.
    """
    close = content.find(THINK_CLOSE)
    if reasoning and reasoning.strip():
        return reasoning, content[content.rfind(THINK_CLOSE) + len(THINK_CLOSE) :] if close >= 0 else content
    if close >= 0:
        opened = content.find(THINK_OPEN, 0, close)
        start = opened + len(THINK_OPEN) if opened >= 0 else 0
        return content[start:close], content[close + len(THINK_CLOSE) :]
    if THINK_OPEN in content:
        return None, ""
    answer_at = content.rfind(ANSWER_OPEN)
    return (content[:answer_at], content[answer_at:]) if answer_at >= 0 else (content, content)


def judge(content: str, reasoning: str | None, finish_reason: str | None, gold: str) -> Verdict:
    """Keep or reject one reply; a kept target scores 1 on both the accuracy and the format reward."""
    if content.count(THINK_OPEN) > 1 or content.count(THINK_CLOSE) > 1:
        return Verdict("bad_format", detail="more than one think block")
    thought, final = split_reply(content, reasoning)
    has_answer = thought is not None and (ANSWER_OPEN in final or last_boxed(final) is not None)
    answer = extract_answer(final) if has_answer else None
    if answer is None:
        cut = finish_reason == "length"
        return Verdict(
            "truncated" if cut else "no_answer", reasoning=thought, detail=f"finish: {finish_reason}"
        )
    thought = (thought or "").strip()
    target = f"{THINK_OPEN}\n{thought}\n{THINK_CLOSE}\n<answer>{answer}</answer>"
    score = accuracy(target, gold)
    if score is None:
        return Verdict("no_gold", reasoning=thought, answer=answer, detail=f"gold {gold!r} cannot be scored")
    if score < 1:
        return Verdict(
            "wrong_answer", reasoning=thought, answer=answer, detail=f"{answer!r} vs gold {gold!r}"
        )
    if not thought:
        return Verdict("empty_reasoning", answer=answer)
    if format_score(target) < 1:
        return Verdict(
            "bad_format", reasoning=thought, answer=answer, detail="tags inside reasoning or answer"
        )
    return Verdict(KEPT, target, thought, answer)


class JsonlLog:
    """Append-only JSON lines, each flushed and fsynced before :meth:`write` returns: a crash loses at most
    the line being written, which :func:`read_log` drops (that row is simply done again)."""

    def __init__(self, path: Path):
        self.path = path
        self._file = path.open("a", encoding="utf-8", newline="\n")

    def write(self, record: dict[str, Any]) -> None:
        # default=str: extra row fields from a dataset (dates, numpy numbers) must not crash a finished row.
        self._file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def repair_log(path: Path) -> int:
    """Cut a last line that has no newline (a write a crash interrupted); returns the bytes removed."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with path.open("r+b") as f:
        f.truncate(keep)
    return len(data) - keep


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a log written by :class:`JsonlLog` (after :func:`repair_log`)."""
    repair_log(path)
    if not path.is_file():
        return []
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise AlignError(
                    f"{path}:{lineno}: not a JSON line ({err.msg}); this log was edited by hand — fix or "
                    "delete the line (its row is then done again)"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("key"), str):
                raise AlignError(f"{path}:{lineno}: expected an object with a 'key' string")
            records.append(record)
    return records
