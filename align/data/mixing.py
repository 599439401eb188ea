"""The training mix: every source read, sampled, repeated or weighted, in a deterministic order.

:func:`build_mix` is what a stage calls; :class:`MixReport` is the per-source table it prints (rows read,
problems, filtered, kept, sampled, mixed). Semantics of ``sampling``, ``repeat`` and ``weight`` are documented
in :mod:`align.data.config`. The order is the recipe's source order, each source's rows in file order, whole
repeats appended; shuffling and length grouping are the batcher's job. Every random choice is seeded by
``(seed, source name)``, so adding a source does not change what another source contributes.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from align.data.config import DataSource, Sampling, parse_sampling
from align.data.readers import FilteredRow, RowProblem, read_source
from align.data.sample import Sample
from align.errors import AlignError

T = TypeVar("T")


def _rng(seed: int, name: str, purpose: str) -> random.Random:
    return random.Random(f"{seed}:{name}:{purpose}")  # str seeds are stable across processes and runs


def apply_sampling(items: list[T], sampling: Sampling, seed: int, name: str) -> list[T]:
    """The rows that ``sampling`` keeps, in file order; N larger than the rows keeps all of them."""
    if sampling.mode == "all" or sampling.n is None or sampling.n >= len(items):
        return list(items)
    if sampling.mode == "first":
        return items[: sampling.n]
    if sampling.mode == "end":
        return items[-sampling.n :]
    chosen = sorted(_rng(seed, name, "sampling").sample(range(len(items)), sampling.n))
    return [items[i] for i in chosen]


def mix_sizes(sampled: Sequence[int], repeats: Sequence[int], weights: Sequence[float | None]) -> list[int]:
    """Rows each source contributes to the mix (see :mod:`align.data.config` for the weight rule)."""
    fixed = sum(n * r for n, r, w in zip(sampled, repeats, weights, strict=True) if w is None)
    weight_sum = sum(w for w in weights if w is not None)
    if weight_sum == 0:
        return [n * r for n, r in zip(sampled, repeats, strict=True)]
    total = sum(sampled) if all(w is not None for w in weights) else fixed / (1 - weight_sum)
    return [
        n * r if w is None else round(w * total) for n, r, w in zip(sampled, repeats, weights, strict=True)
    ]


def take(items: list[T], n: int, seed: int, name: str) -> list[T]:
    """``n`` rows from ``items``: whole passes, then a seeded subset (in file order) for the remainder."""
    if n == 0:
        return []
    passes, rest = divmod(n, len(items))
    extra = sorted(_rng(seed, name, "weight").sample(range(len(items)), rest))
    return list(items) * passes + [items[i] for i in extra]


@dataclass
class SourceCounts:
    name: str
    read: int = 0  # rows in the data file(s)
    problems: int = 0  # rows that cannot be used (see `align data check`)
    filtered: int = 0  # valid rows the source itself marks unusable
    kept: int = 0  # read - problems - filtered
    sampled: int = 0  # after `sampling`
    mixed: int = 0  # after `repeat` / `weight`


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table (logs keep it readable); numeric columns right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        all(isinstance(row[i], (int, float)) or row[i] == "" for row in rows) for i in range(len(headers))
    ]

    def line(row: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _n(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def empty_source(name: str, path: str, read: int, usable: int, why: str) -> str | None:
    """The error for a source left with no rows to train on, or ``None``; ``why`` says where its rows went."""
    if read == 0:
        return f"data source '{name}' ({path}): the file has no rows"
    if usable == 0:
        return f"data source '{name}' ({path}): none of its {_n(read, 'row')} is usable ({why})"
    return None


def zero_weight_source(name: str, path: str, weight: float | None, total: int) -> str:
    """The error for a weighted source that rounds to no rows of a mix of ``total``."""
    return (
        f"data source '{name}' ({path}): weight {weight} gives it 0 of the {total} mixed rows; "
        "raise the weight or remove the source"
    )


@dataclass
class MixReport:
    sources: list[SourceCounts]
    problems: list[RowProblem] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(s.mixed for s in self.sources)

    def table(self) -> str:
        headers = ("source", "read", "problems", "filtered", "kept", "sampled", "mixed")
        rows = [(s.name, s.read, s.problems, s.filtered, s.kept, s.sampled, s.mixed) for s in self.sources]
        return format_table(headers, [*rows, ("total", "", "", "", "", "", self.total)])


def build_mix(
    sources: Sequence[DataSource], seed: int, strict: bool = True, exclude: Collection[str] = ()
) -> tuple[list[Sample], MixReport]:
    """Read every source and build the mix; ``strict`` refuses any row problem, else skips and counts it.

    ``exclude``: origins of rows a check found bad (:func:`align.data.check.checked_mix`), counted as
    problems before sampling. A source left with no rows (an empty file, nothing usable, a weight that
    rounds to 0 rows) is an :class:`AlignError` naming it, whatever ``strict`` says.
    """
    counts, kept_rows, problems = [], [], []
    for source in sources:
        c = SourceCounts(source.name)
        kept: list[Sample] = []
        first: RowProblem | None = None
        for row in read_source(source):
            c.read += 1
            if isinstance(row, Sample) and row.origin in exclude:
                c.problems += 1
            elif isinstance(row, RowProblem):
                c.problems += 1
                problems.append(row)
                first = first or row
            elif isinstance(row, FilteredRow):
                c.filtered += 1
            else:
                kept.append(row)
        if not kept and not (strict and problems):
            why = f"{c.problems} bad, {c.filtered} filtered"
            if first is not None:
                why += f"; first: {first.origin}: {first.reason}"
            raise AlignError(empty_source(source.name, source.path, c.read, 0, why) or "")
        c.kept = len(kept)
        kept = apply_sampling(kept, parse_sampling(source.sampling), seed, source.name)
        c.sampled = len(kept)
        counts.append(c)
        kept_rows.append(kept)
    if problems and strict:
        first = problems[0]
        raise AlignError(
            f"{len(problems)} bad data rows (first: {first.origin}: {first.reason}); "
            "list them all with `align data check RECIPE`, or set data.strict: false to skip them"
        )
    sizes = mix_sizes([c.sampled for c in counts], [s.repeat for s in sources], [s.weight for s in sources])
    mix: list[Sample] = []
    for source, c, rows, size in zip(sources, counts, kept_rows, sizes, strict=True):
        if size == 0:
            raise AlignError(zero_weight_source(source.name, source.path, source.weight, sum(sizes)))
        c.mixed = size
        mix.extend(take(rows, size, seed, source.name))
    return mix, MixReport(counts, problems)
