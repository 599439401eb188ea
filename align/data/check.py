"""``align data check RECIPE``: validate every row of a recipe's data sources before any training.

Run: ``align data check recipes/tiny/sft.yaml [key=value ...] [--no-strict] [--model DIR] [--limit-errors N]``.

On top of the readers' structural checks (malformed JSON, non-UTF-8 lines, placeholder/image mismatch,
empty answers, malformed boxes, image paths escaping the root) this opens every image (missing, corrupt,
over the pixel limit), checks grounding boxes against the image size, and — when a model folder is known
(the recipe's ``model:`` key or ``--model``) — the encoded length of each row against ``max_length``.
Prints a table per source and the first offending rows as ``file:line: reason``; exits 1 if there are
problems in strict mode, else 0.

Stages call :func:`check_sources` with ``decode_images=False`` (fast mode): images are opened but only
their headers are read, which finds missing, non-image and oversized files and gives the size for box
checks, but not pixel data truncated after a valid header.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from align.config import RecipeError, apply_overrides, from_dict, read_yaml
from align.data.config import DataConfig, DataSource
from align.data.images import ImageNotFound, ImageTooLarge, image_size, load_image
from align.data.mixing import format_table
from align.data.readers import FilteredRow, RowProblem, read_source
from align.data.sample import Sample
from align.errors import AlignError

LengthFn = Callable[[Sample], int]


@dataclass
class SourceCheck:
    name: str
    rows: int = 0
    ok: int = 0
    filtered: int = 0  # valid rows the source itself marks unusable (R1-Onevision judge)
    overlong: int = 0  # rows over max_length that overlong: drop will skip (not problems)
    problems: Counter = field(default_factory=Counter)  # kind -> rows


@dataclass
class CheckReport:
    sources: list[SourceCheck]
    problems: list[RowProblem]
    length_checked: bool

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        rows = []
        for s in self.sources:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(s.problems.items())) or "-"
            rows.append((s.name, s.rows, s.ok, s.filtered, s.overlong, sum(s.problems.values()), kinds))
        return format_table(("source", "rows", "ok", "filtered", "overlong", "problems", "by kind"), rows)

    def listing(self, limit: int) -> str:
        lines = [f"{p.origin}: {p.reason}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more (--limit-errors N shows more)")
        return "\n".join(lines)


class _ImageCache:
    """Image size (or the error) per file: sources often share images across rows and files."""

    def __init__(self, max_pixels: int, decode: bool):
        self.max_pixels = max_pixels
        self.decode = decode
        self.seen: dict[str, tuple[int, int] | AlignError] = {}

    def size(self, image: Any) -> tuple[int, int]:
        if not isinstance(image, str):  # an image decoded by `datasets`
            return (
                load_image(image, self.max_pixels).size if self.decode else image_size(image, self.max_pixels)
            )
        if image not in self.seen:
            try:
                self.seen[image] = (
                    load_image(image, self.max_pixels).size
                    if self.decode
                    else image_size(image, self.max_pixels)
                )
            except AlignError as err:
                self.seen[image] = err
        result = self.seen[image]
        if isinstance(result, AlignError):
            raise result
        return result


def _image_kind(err: AlignError) -> str:
    if isinstance(err, ImageNotFound):
        return "image-missing"
    if isinstance(err, ImageTooLarge):
        return "image-too-large"
    return "image-corrupt"


def check_sample(
    sample: Sample,
    images: _ImageCache,
    length_fn: LengthFn | None,
    max_length: int,
    overlong: Literal["drop", "error"],
) -> RowProblem | Literal["overlong"] | None:
    """The first problem of a structurally valid sample, "overlong" for a row to drop, or None."""
    sizes = []
    for image in sample.images:
        try:
            sizes.append(images.size(image))
        except AlignError as err:
            return RowProblem(sample.origin, _image_kind(err), str(err))
    box = sample.meta.get("box")
    if box is not None and sizes:
        (w, h), (_, _, x2, y2) = sizes[0], box
        if x2 > w or y2 > h:
            return RowProblem(sample.origin, "box", f"box {box} lies outside the {w}x{h} image")
    if length_fn is not None:
        try:
            n = length_fn(sample)
        except AlignError as err:  # the tokenizer cannot encode the row (e.g. an image in an assistant turn)
            return RowProblem(sample.origin, "encode", str(err))
        if n > max_length:
            if overlong == "drop":
                return "overlong"
            return RowProblem(
                sample.origin, "too-long", f"{n} tokens > max_length {max_length} (overlong: error)"
            )
    return None


def check_sources(
    sources: Sequence[DataSource],
    max_image_pixels: int,
    length_fn: LengthFn | None = None,
    max_length: int = 2048,
    overlong: Literal["drop", "error"] = "drop",
    decode_images: bool = True,
) -> CheckReport:
    """Every row of every source checked; ``decode_images=False`` is the fast mode stages use."""
    images = _ImageCache(max_image_pixels, decode_images)
    checks, problems = [], []
    for source in sources:
        c = SourceCheck(source.name)
        for row in read_source(source):
            c.rows += 1
            if isinstance(row, FilteredRow):
                c.filtered += 1
                continue
            problem = (
                row
                if isinstance(row, RowProblem)
                else check_sample(row, images, length_fn, max_length, overlong)
            )
            if problem == "overlong":
                c.overlong += 1
            elif isinstance(problem, RowProblem):
                c.problems[problem.kind] += 1
                problems.append(problem)
            else:
                c.ok += 1
        checks.append(c)
    return CheckReport(checks, problems, length_checked=length_fn is not None)


def length_fn_for_model(model_dir: str) -> LengthFn:
    """Encoded length of a sample with the tokenizer and image-token count of a Llava model folder.

    ``model_dir`` may also be a stage's output folder (its ``model/`` is used), as stage recipes name them.
    """
    from transformers import AutoConfig, AutoProcessor

    from align.checkpoint import image_seq_len, resolve_model_folder
    from align.data.encode import encoded_length

    try:
        model_dir = resolve_model_folder(model_dir)
    except AlignError:
        raise AlignError(
            f"model folder {model_dir}: no config.json (pass a Llava folder with --model)"
        ) from None

    processor = AutoProcessor.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = config.image_token_index
    seq_len = image_seq_len(processor)
    tokenizer = processor.tokenizer
    return lambda sample: encoded_length(sample, tokenizer, image_token_id, seq_len)


def load_data_config(recipe: str, overrides: Sequence[str] = ()) -> tuple[DataConfig, dict]:
    """The ``data:`` section of any stage recipe (``extends:`` and overrides applied) and the raw recipe."""
    raw = read_yaml(recipe)
    try:
        raw = apply_overrides(raw, overrides)
    except RecipeError as err:
        err.file = recipe
        raise
    section = raw.get("data")
    if not isinstance(section, dict):
        raise RecipeError("missing 'data:' section (data sources to check)", key="data", file=recipe)
    try:
        return from_dict(DataConfig, section, file=recipe), raw
    except RecipeError as err:
        raise err.under("data") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="any stage recipe with a data: section")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. data.max_length=4096")
    parser.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="exit 1 on any problem (default: the recipe's data.strict)",
    )
    parser.add_argument("--model", help="model folder for the length check (default: the recipe's model:)")
    parser.add_argument("--limit-errors", type=int, default=20, metavar="N", help="offending rows to list")
    parser.add_argument("--fast", action="store_true", help="read image headers only, as stages do at start")


def run(args: argparse.Namespace) -> int:
    config, raw = load_data_config(args.recipe, args.overrides)
    model = args.model or (raw.get("model") if isinstance(raw.get("model"), str) else None)
    length_fn = length_fn_for_model(model) if model else None
    report = check_sources(
        config.sources,
        config.max_image_pixels,
        length_fn=length_fn,
        max_length=config.max_length,
        overlong=config.overlong,
        decode_images=not args.fast,
    )
    print(report.table())
    if not report.length_checked:
        print("length: not checked (no model folder: set model: in the recipe or pass --model)")
    if report.problems:
        print(f"\n{len(report.problems)} problem rows:")
        print(report.listing(max(args.limit_errors, 0)))
    strict = config.strict if args.strict is None else args.strict
    print(f"\n{'FAIL' if report.problems and strict else 'ok'}: {len(report.problems)} problems")
    return 1 if report.problems and strict else 0
