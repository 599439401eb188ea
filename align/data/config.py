"""The ``data:`` section of stage recipes: which sources to read and how to mix, check and cut them.

Owns the schemas :class:`DataSource` and :class:`DataConfig` and the parser of the ``sampling`` strings.
Stage recipes embed ``data: DataConfig``; ``align data check RECIPE`` reads the same section.

Mixing semantics (implemented in :mod:`align.data.mixing`):

* ``sampling`` picks rows from a source's valid rows: ``all``, ``first:N``, ``end:N`` (the last N) or
  ``random:N`` (N rows drawn with the data seed, kept in file order) — VLM-R1's convention.
* ``repeat: K`` puts the sampled rows K times into the mix.
* ``weight: w`` (0 < w <= 1) instead makes the source a fraction ``w`` of the final mix. Sources without a
  weight contribute ``rows x repeat`` (the fixed part F). When some sources are weighted, their weights
  must sum to less than 1 and the mix has ``T = F / (1 - sum(w))`` rows; when every source is weighted,
  the weights must sum to 1 and ``T`` is the total of the sampled rows. A weighted source gets
  ``round(w * T)`` rows: whole passes over its sampled rows, then a seeded subset for the remainder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from align.config import MAX_SEED, MAX_TOKENS, RecipeError, ranged

SourceFormat = Literal["llava", "messages", "rl", "r1_onevision", "hf"]
# Our names for the columns of a Hugging Face dataset; `columns:` maps them to the dataset's own names.
HF_COLUMNS = ("image", "question", "answer", "messages", "response")
# PIL's own default for Image.MAX_IMAGE_PIXELS (a warning there, an error here).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

_SAMPLING = re.compile(r"^(first|end|random):([0-9]+)$")


@dataclass(frozen=True)
class Sampling:
    mode: Literal["all", "first", "end", "random"]
    n: int | None = None  # None for "all"


def parse_sampling(text: str) -> Sampling:
    """``all | first:N | end:N | random:N`` (N >= 1) or ValueError saying what is accepted."""
    if text == "all":
        return Sampling("all")
    match = _SAMPLING.match(text.strip())
    if not match or int(match.group(2)) < 1:
        raise ValueError(f"expected 'all', 'first:N', 'end:N' or 'random:N' with N >= 1, got {text!r}")
    return Sampling(match.group(1), int(match.group(2)))  # type: ignore[arg-type]


@dataclass
class DataSource:
    name: str  # unique within the recipe; names the source in reports and in Sample.source
    path: str  # data file (JSON / JSONL), or for "hf" a load_from_disk folder or parquet/JSON file(s)
    format: SourceFormat
    image_root: str | None = None  # image paths are relative to this; default: the data file's folder
    sampling: str = "all"  # all | first:N | end:N | random:N
    repeat: int = ranged(1, ge=1)  # every row this many times
    weight: float | None = ranged(None, gt=0, le=1, note="a fraction of the mix")  # excludes `repeat`
    system_prompt: str | None = None  # added as a system turn to rows that have none
    question_template: str = "{question}"  # how a question row's question, or a conversation's first user turn, becomes the user turn
    columns: dict[str, str] = field(default_factory=dict)  # hf only: our name (image/question/...) -> column
    split: str | None = None  # hf only: split to read (default "train")
    allow_outside_root: bool = False  # allow absolute image paths and paths escaping image_root
    # conversation rows with images but no <image> in any turn (ms-swift, R1-Onevision RL rows): one
    # placeholder per image at the start of the first user turn; false: such rows are refused, naming this key
    insert_image_placeholders: bool = False

    def check(self) -> None:
        if not self.name.strip():
            raise RecipeError.at("name", "must not be empty")
        try:
            parse_sampling(self.sampling)
        except ValueError as err:
            raise RecipeError.at("sampling", str(err)) from None
        if self.weight is not None and self.repeat != 1:
            raise RecipeError.at("weight", f"set either weight or repeat, not both (repeat={self.repeat})")
        if self.question_template != "{question}":
            if "{question}" not in self.question_template:
                raise RecipeError.at("question_template", "must contain '{question}'")
            try:
                self.question_template.format(question="")
            except (KeyError, IndexError, ValueError) as err:
                raise RecipeError.at(
                    "question_template",
                    f"only '{{question}}' may appear in braces (write '{{{{' for a brace): {err}",
                ) from None
        if self.format != "hf":
            if self.columns:
                raise RecipeError.at("columns", f"applies to 'hf' sources only, not '{self.format}'")
            if self.split is not None:
                raise RecipeError.at("split", f"applies to 'hf' sources only, not '{self.format}'")
        for ours in self.columns:
            if ours not in HF_COLUMNS:
                raise RecipeError.at(f"columns.{ours}", f"unknown name; map any of {', '.join(HF_COLUMNS)}")


@dataclass
class DataConfig:
    sources: list[DataSource]
    max_length: int = ranged(2048, ge=1, le=MAX_TOKENS)  # tokens per row, image tokens included
    overlong: Literal["drop", "error"] = (
        "drop"  # rows over max_length. drop: one whose prompt + images do not fit is skipped and counted, a longer target is cut to fit (its start kept, counted); error: any row over max_length stops the run, naming it
    )
    packing: bool = False
    group_by_length: bool = True
    strict: bool = True  # a bad row (malformed, a broken image or box, a gold answer no configured reward can score) stops the stage before training, listed as file:line; false: bad rows are skipped and counted per file. A source left with no rows is always an error
    max_image_pixels: int = ranged(
        DEFAULT_MAX_IMAGE_PIXELS, ge=1
    )  # decompression-bomb limit, width x height; above PIL's 89,478,485 a warning is printed
    seed: int | None = ranged(None, ge=0, le=MAX_SEED)  # random:N sampling, weights; None: the stage's seed
    image_check: Literal["decode", "header"] = (
        "decode"  # how stages check images before training. decode: each one decoded in full, as training will (finds truncated files); header: headers only (fast on huge sets; a corrupt image then stops training, naming its row)
    )

    def check(self) -> None:
        if not self.sources:
            raise RecipeError.at("sources", "needs at least one data source")
        seen: dict[str, int] = {}
        for i, source in enumerate(self.sources):
            if source.name in seen:
                raise RecipeError.at(
                    f"sources[{i}].name",
                    f"'{source.name}' is already the name of sources[{seen[source.name]}]",
                )
            seen[source.name] = i
        weights = [s.weight for s in self.sources if s.weight is not None]
        if weights:
            total = sum(weights)
            if len(weights) == len(self.sources) and abs(total - 1) > 1e-6:
                raise RecipeError.at(
                    "sources", f"every source has a weight, so the weights must sum to 1; got {total:g}"
                )
            if len(weights) < len(self.sources) and total >= 1:
                raise RecipeError.at(
                    "sources",
                    f"weights sum to {total:g} but sources without a weight need a share too: keep the sum below 1",
                )
