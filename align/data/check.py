"""``align data check RECIPE``: validate every row of a recipe's data sources before any training.

Run: ``align data check recipes/tiny/sft.yaml [key=value ...] [--no-strict] [--model DIR] [--limit-errors N]``.

On top of the readers' structural checks (malformed JSON, non-UTF-8 lines, placeholder/image mismatch,
empty answers, malformed boxes and gold answers, image paths escaping the root) this opens and decodes every
image (missing, corrupt, truncated, over the pixel limit), checks grounding boxes against the image size, what
the recipe's stage needs from a row (:func:`stage_row_check`: SFT rows end with an assistant turn; GRPO rows
carry a gold answer one of the configured rewards can score) and — when a model folder is known (the recipe's
``model:`` key or ``--model``) — the encoded length of each row against ``max_length`` (for GRPO the prompt
plus ``grpo.max_completion_length``). Prints a table per source and the first offending rows as
``file:line: reason``; exits 1 if there are problems in strict mode, else 0, and 2 (an error naming the file)
when a source is left with no usable rows: an empty file, only bad rows, or a weight that rounds to 0 rows.

Stages call :func:`checked_mix`: the same checks (images decoded unless ``data.image_check: header``), then
``data.strict`` applied (stop, listing the rows; or skip them, counted per file) before anything trains.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from align.config import RecipeError, apply_overrides, blame, from_dict, read_yaml, schema_for
from align.data.config import DataConfig, DataSource, parse_sampling
from align.data.images import ImageNotFound, ImageTooLarge, image_size, load_image, warn_pixel_limit
from align.data.mixing import (
    MixReport,
    apply_sampling,
    build_mix,
    empty_source,
    format_table,
    mix_sizes,
    zero_weight_source,
)
from align.data.readers import FilteredRow, RowProblem, read_source
from align.data.sample import Sample
from align.errors import AlignError
from align.rewards import DEFAULT_REWARD_FUNCS, gold_self_check, load_reward, unscorable_gold

LengthFn = Callable[[Sample], int]
RowCheck = Callable[[Sample], RowProblem | None]  # what one stage needs from a structurally valid row


@dataclass
class SourceCheck:
    name: str
    path: str = ""
    rows: int = 0
    ok: int = 0
    filtered: int = 0  # valid rows the source itself marks unusable (R1-Onevision judge)
    overlong: int = 0  # rows over max_length that overlong: drop skips or cuts (not problems)
    problems: Counter = field(default_factory=Counter)  # kind -> rows
    first: RowProblem | None = None  # the first problem row, to show

    @property
    def usable(self) -> int:
        return self.ok + self.overlong

    def kinds(self) -> str:
        return ", ".join(f"{k} {n}" for k, n in sorted(self.problems.items()))


@dataclass
class CheckReport:
    sources: list[SourceCheck]
    problems: list[RowProblem]
    length_checked: bool
    mixed: list[int] = field(default_factory=list)  # rows each source would give the mix

    @property
    def ok(self) -> bool:
        return not self.problems

    def source_errors(self, sources: Sequence[DataSource]) -> list[str]:
        """One line per source that would give the mix no rows (see :func:`empty_source`)."""
        errors = []
        for source, c, mixed in zip(sources, self.sources, self.mixed, strict=True):
            why = ", ".join(
                part
                for part in (
                    f"{sum(c.problems.values())} bad: {c.kinds()}" if c.problems else "",
                    f"{c.filtered} filtered" if c.filtered else "",
                )
                if part
            )
            if c.first is not None:
                why += f"; first: {c.first.origin}: {c.first.reason}"
            error = empty_source(c.name, c.path, c.rows, c.usable, why)
            if error is None and mixed == 0:
                error = zero_weight_source(c.name, c.path, source.weight, sum(self.mixed))
            if error is not None:
                errors.append(error)
        return errors

    def skipped(self) -> list[str]:
        """Per file: how many bad rows ``data.strict: false`` skips, of what kinds, with the first one."""
        return [
            f"data.strict is false: skipping {sum(c.problems.values())} of {c.rows} rows of {c.path} "
            f"({c.kinds()}), first {c.first.origin}: {c.first.reason}"
            for c in self.sources
            if c.problems and c.first is not None
        ]

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
    row_check: RowCheck | None = None,
    reserve: int = 0,
) -> RowProblem | Literal["overlong"] | None:
    """The first problem of a structurally valid sample, "overlong" for a row over max_length that
    ``overlong: drop`` handles, or None. ``reserve``: tokens the stage adds to the row (GRPO's completion)."""
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
    if row_check is not None:
        problem = row_check(sample)
        if problem is not None:
            return problem
    if length_fn is not None:
        try:
            n = length_fn(sample)
        except AlignError as err:  # the tokenizer cannot encode the row (e.g. an image in an assistant turn)
            return RowProblem(sample.origin, "encode", str(err))
        if n + reserve > max_length:
            if overlong == "drop":
                return "overlong"
            plus = f" + {reserve} completion tokens" if reserve else ""
            return RowProblem(
                sample.origin, "too-long", f"{n} tokens{plus} > max_length {max_length} (overlong: error)"
            )
    return None


def check_sources(
    sources: Sequence[DataSource],
    max_image_pixels: int,
    length_fn: LengthFn | None = None,
    max_length: int = 2048,
    overlong: Literal["drop", "error"] = "drop",
    decode_images: bool = True,
    row_check: RowCheck | None = None,
    reserve: int = 0,
) -> CheckReport:
    """Every row of every source checked; ``decode_images=False`` reads image headers only.

    ``row_check`` adds what one stage needs (:func:`stage_row_check`); ``CheckReport.mixed`` says how many
    rows each source would give the mix.
    """
    warn_pixel_limit(max_image_pixels)
    images = _ImageCache(max_image_pixels, decode_images)
    checks, problems = [], []
    for source in sources:
        c = SourceCheck(source.name, source.path)
        for row in read_source(source):
            c.rows += 1
            if isinstance(row, FilteredRow):
                c.filtered += 1
                continue
            problem = (
                row
                if isinstance(row, RowProblem)
                else check_sample(row, images, length_fn, max_length, overlong, row_check, reserve)
            )
            if problem == "overlong":
                c.overlong += 1
            elif isinstance(problem, RowProblem):
                c.problems[problem.kind] += 1
                c.first = c.first or problem
                problems.append(problem)
            else:
                c.ok += 1
        checks.append(c)
    sampled = [  # how many rows sampling keeps does not depend on the seed
        len(apply_sampling(list(range(c.usable)), parse_sampling(s.sampling), 0, s.name))
        for s, c in zip(sources, checks, strict=True)
    ]
    mixed = mix_sizes(sampled, [s.repeat for s in sources], [s.weight for s in sources])
    return CheckReport(checks, problems, length_checked=length_fn is not None, mixed=mixed)


def stage_row_check(kind: str | None, reward_funcs: Sequence[str] = DEFAULT_REWARD_FUNCS) -> RowCheck | None:
    """What a ``kind`` stage needs from a row beyond being well formed, as a row check (None: nothing more).

    * ``sft`` / ``projector``: the row ends with an assistant turn, the target it learns.
    * ``grpo``: the row has a gold answer, one of ``reward_funcs`` that reads a gold can score it
      (:func:`align.rewards.unscorable_gold`): otherwise every completion would earn ``None`` from it; and
      every reward gives the gold itself, written as a perfect completion, its maximum
      (:func:`align.rewards.gold_self_check`): otherwise the row could only ever score below it.
    """
    if kind in ("sft", "projector"):

        def needs_target(sample: Sample) -> RowProblem | None:
            last = sample.messages[-1]["role"]
            if last == "assistant":
                return None
            if sample.answer is not None:
                why = "a question + solution row has no assistant turn to learn from (GRPO data; for SFT write it as a conversation)"
            else:
                why = (
                    f"an {kind} row must end with an assistant turn, the target it learns (last turn: {last})"
                )
            return RowProblem(sample.origin, "stage", why)

        return needs_target
    if kind == "grpo":
        funcs = list(reward_funcs)
        rewards = {spec: load_reward(spec) for spec in funcs}
        judged: dict[tuple, str | None] = {}  # golds repeat (counting answers): each is scored once

        def needs_gold(sample: Sample) -> RowProblem | None:
            gold = sample.gold
            if gold is None:
                return RowProblem(
                    sample.origin,
                    "gold",
                    "GRPO rows need a gold answer for the rewards: a solution, or a conversation that ends with "
                    f"the assistant's answer (last turn: {sample.messages[-1]['role'] if sample.messages else 'none'})",
                )
            box, family = sample.meta.get("box"), sample.meta.get("family")
            method = sample.meta.get("accu_reward_method")
            reason = unscorable_gold(funcs, gold, box, method)
            if reason is not None:
                return RowProblem(sample.origin, "gold", f"cannot be scored: {reason}")
            key = (repr(gold), repr(box), repr(family), repr(method))
            if key not in judged:
                failures = (gold_self_check(s, fn, gold, box, family, method) for s, fn in rewards.items())
                judged[key] = next((f for f in failures if f is not None), None)
            return None if judged[key] is None else RowProblem(sample.origin, "gold", judged[key])

        return needs_gold
    return None


def checked_mix(
    data: DataConfig, seed: int, row_check: RowCheck | None = None, log: Callable[[str], None] | None = print
) -> tuple[list[Sample], MixReport]:
    """The rows a stage trains on, checked as ``align data check`` checks them, before anything trains.

    Images are decoded (``data.image_check: header``: headers only), ``row_check`` applied, then
    ``data.strict``: true stops with an :class:`AlignError` listing the bad rows (file:line: reason); false
    skips them and ``log`` prints how many per file. A source left with no rows is always an error.
    """
    report = check_sources(
        data.sources,
        data.max_image_pixels,
        decode_images=data.image_check == "decode",
        row_check=row_check,
    )
    errors = report.source_errors(data.sources)
    if report.problems and data.strict:
        first = report.problems[0]
        by_kind = Counter(p.kind for p in report.problems)
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items()))
        count = f"{len(report.problems)} bad data row" + ("s" if len(report.problems) > 1 else "")
        raise AlignError(
            f"{first.origin}: {first.reason} ({count}: {kinds}; data.strict is true, so nothing was trained; "
            "`align data check RECIPE` lists them all, data.strict: false skips them)"
            + "".join(f"; {e}" for e in errors)
        )
    if errors:
        raise AlignError("; ".join(errors))
    if log is not None:
        for line in report.skipped():
            log(line)
    return build_mix(data.sources, seed, strict=False, exclude={p.origin for p in report.problems})


def length_fn_for_model(model_dir: str) -> LengthFn:
    """Encoded length of a sample with the tokenizer and image-token count of a Llava model folder.

    ``model_dir`` may also be a stage's output folder (its ``model/`` is used), as stage recipes name them.
    """
    from transformers import AutoConfig, AutoProcessor

    from align.checkpoint import image_seq_len, resolve_model_folder
    from align.data.encode import encoded_length

    try:
        model_dir = resolve_model_folder(model_dir)
    except AlignError as err:  # keep what was wrong: no config.json, another model type, pickle weights
        raise AlignError(f"model folder {err} (pass a Llava folder with --model)") from None

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
    raw = apply_overrides(read_yaml(recipe), overrides)
    section = raw.get("data")
    if not isinstance(section, dict):
        raise RecipeError("missing 'data:' section (data sources to check)", key="data", file=recipe)
    try:
        return from_dict(DataConfig, section, file=recipe), raw
    except RecipeError as err:
        raise blame(err.under("data"), overrides, recipe) from None


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
    parser.add_argument(
        "--fast",
        action="store_true",
        help="read image headers only (what stages do with data.image_check: header)",
    )


def _grpo_section(raw: dict, recipe: str) -> tuple[list[str], int]:
    """``(reward_funcs, max_completion_length)`` of a GRPO recipe, defaults filled in by its own schema."""
    import typing

    spec_type = typing.get_type_hints(schema_for("grpo"))["grpo"]
    section = raw.get("grpo") if isinstance(raw.get("grpo"), dict) else {}
    try:
        spec = from_dict(spec_type, section, file=recipe)
    except RecipeError as err:
        raise err.under("grpo") from None
    return list(spec.reward_funcs), spec.max_completion_length


def run(args: argparse.Namespace) -> int:
    config, raw = load_data_config(args.recipe, args.overrides)
    model = args.model or (raw.get("model") if isinstance(raw.get("model"), str) else None)
    length_fn = length_fn_for_model(model) if model else None
    kind = raw.get("kind")
    rewards, reserve = _grpo_section(raw, args.recipe) if kind == "grpo" else (DEFAULT_REWARD_FUNCS, 0)
    report = check_sources(
        config.sources,
        config.max_image_pixels,
        length_fn=length_fn,
        max_length=config.max_length,
        overlong=config.overlong,
        decode_images=not args.fast,
        row_check=stage_row_check(kind if isinstance(kind, str) else None, rewards),
        reserve=reserve,
    )
    print(report.table())
    if not report.length_checked:
        print("length: not checked (no model folder: set model: in the recipe or pass --model)")
    if report.problems:
        print(f"\n{len(report.problems)} problem rows:")
        print(report.listing(max(args.limit_errors, 0)))
    errors = report.source_errors(config.sources)
    if errors:
        raise AlignError("; ".join(errors))
    strict = config.strict if args.strict is None else args.strict
    print(f"\n{'FAIL' if report.problems and strict else 'ok'}: {len(report.problems)} problems")
    return 1 if report.problems and strict else 0
