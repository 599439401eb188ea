"""The one internal sample form every reader produces and every stage consumes.

A ``Sample`` is a conversation (``messages`` with ``<image>`` placeholders in the text), its images, and for
RL rows the gold ``answer``. ``origin`` is ``file:line`` (or ``dataset[index]``) so that any later error can
name the row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Sample:
    source: str  # name of the recipe data source it came from
    origin: str  # "path/to/file.jsonl:17" or "dataset_dir[17]": where to look when it is wrong
    messages: list[dict[str, str]]  # {"role": "system"|"user"|"assistant", "content": str}
    images: list[Any] = field(
        default_factory=list
    )  # resolved file paths (str) or PIL images, one per placeholder
    answer: str | None = None  # gold answer / solution for RL and evaluation rows
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. {"family": "count", "box": [x1, y1, x2, y2]}

    @property
    def gold(self) -> str | None:
        """The gold answer GRPO and evaluation score against: the row's ``answer`` (solution), else the final
        assistant turn of a conversation row (VLM-R1's ``grpo_jsonl``, VisualThinker's SAT rows), as its
        ``<answer>`` block when it has one; the prompt is then the turns before it."""
        if self.answer is not None:
            return self.answer
        if self.messages and self.messages[-1]["role"] == "assistant":
            from align.rewards.extract import extract_answer

            return extract_answer(self.messages[-1]["content"])
        return None

    @property
    def n_placeholders(self) -> int:
        return sum(m["content"].count(IMAGE_PLACEHOLDER) for m in self.messages)
