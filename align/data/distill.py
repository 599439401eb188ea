"""``align data distill RECIPE``: long chain-of-thought SFT rows written by a teacher, kept only when verified.

Run: ``align data distill recipes/tiny/distill.yaml [key=value ...] [--retry-errors]``.

For every input row (image(s), question, gold answer; formats ``rl``, ``r1_onevision`` or ``hf``):

1. a description of the image: a row field (``description.column``) or a local image-text model folder
   (``description.captioner``, e.g. a Llava folder of this project);
2. the teacher prompt: a template file (default ``align/prompts/distill.txt``, override with ``prompt:``)
   with ``{description}`` and ``{question}`` filled in;
3. the teacher (``teacher.backend``): an OpenAI-compatible server (vLLM, DeepSeek ...; the key comes from the
   environment variable ``teacher.api_key_env``) or a local Hugging Face causal LM folder; timeouts and server
   errors are retried with exponential back-off and jitter, at most ``teacher.max_concurrency`` rows at once;
4. the verdict (:func:`align.data.distill_rows.judge`): the row is kept only if its answer scores 1 with the
   accuracy reward against the gold answer and the reasoning is not empty.

Writes to ``output_dir``: ``sft.jsonl`` (kept rows in the messages format: the row's own user turn with its
``<image>`` placeholders, then ``<think>\\nreasoning\\n</think>\\n<answer>…</answer>``; image paths relative to
the input's image root, which the report names), ``rejected.jsonl`` (reason, detail and the teacher's reply),
``report.json`` and ``recipe.resolved.yaml``.

Resuming: every finished row is one fsynced line in ``sft.jsonl`` or ``rejected.jsonl`` under its ``key``
(``source#id``, or ``source@file:line`` for rows without an ``id``); together they are the done-log, and a rerun
skips those rows. ``--retry-errors`` gives rows whose last outcome was ``teacher_error`` another try. Rows are
written in the order they finish.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.config import load_any, save_resolved
from align.data.config import DataSource
from align.data.distill_recipe import (
    Describe,
    DescriptionSpec,
    DistillRecipe,
    Teacher,
    TeacherSpec,
    build_describe,
    build_teacher,
    column_description,
)
from align.data.distill_rows import (
    KEPT,
    REASONS,
    JsonlLog,
    Rejected,
    judge,
    load_prompt,
    question_text,
    read_log,
    render_prompt,
)
from align.data.distill_teacher import RetryPolicy, TeacherError, call_with_retries
from align.data.mixing import format_table
from align.data.sample import Sample
from align.errors import AlignError
from align.rewards import gold_kind

# The recipe schema lives in distill_recipe; align.config's kind table names it through this module.
__all__ = [
    "DescriptionSpec",
    "DistillRecipe",
    "DistillReport",
    "TeacherSpec",
    "add_arguments",
    "build_describe",
    "build_teacher",
    "column_description",
    "distill",
    "run",
]

KEPT_FILE, REJECTED_FILE, REPORT_FILE = "sft.jsonl", "rejected.jsonl", "report.json"


# ---------------------------------------------------------------- rows in, records out


def row_key(sample: Sample) -> str:
    """The done-log key: the row's ``id`` if it has one (stable when the file is reordered), else its origin."""
    row_id = sample.meta.get("id")
    if isinstance(row_id, (str, int)) and not isinstance(row_id, bool):
        return f"{sample.source}#{row_id}"
    return f"{sample.source}@{sample.origin}"


def unique_keys(samples: Sequence[Sample]) -> list[str]:
    """Keys of ``samples``; two rows with one key would resume as one, so that is an error naming both."""
    seen: dict[str, str] = {}
    keys = []
    for sample in samples:
        key = row_key(sample)
        if key in seen:
            raise AlignError(
                f"{sample.origin}: id {sample.meta.get('id')!r} repeats the row at {seen[key]}; "
                "ids must be unique (resuming skips rows by id)"
            )
        seen[key] = sample.origin
        keys.append(key)
    return keys


def source_image_root(source: DataSource) -> Path:
    """The folder a source's image paths are relative to (the same rule as the readers)."""
    path = Path(source.path)
    root = Path(source.image_root) if source.image_root else (path if path.is_dir() else path.parent)
    return Path(os.path.abspath(root))


def _image_refs(images: Sequence[Any], root: Path) -> list[str]:
    """Image paths for the output row: relative to ``root`` when inside it, else absolute."""
    refs = []
    for image in images:
        if not isinstance(image, (str, Path)):
            raise Rejected(
                "image_error", "an in-memory image: distill writes image paths, so images must be files"
            )
        path = Path(os.path.abspath(image))
        if not path.is_file():
            raise Rejected("image_error", f"image not found: {path}")
        refs.append(str(path.relative_to(root)) if path.is_relative_to(root) else str(path))
    return refs


@dataclass
class _Job:
    teacher: Teacher
    describe: Describe
    template: str
    image_root: Path
    policy: RetryPolicy
    rng: random.Random
    sleep: Callable[[float], None]

    def __call__(self, key: str, sample: Sample) -> tuple[dict[str, Any], int]:
        """The log record of one row (``reason`` is KEPT or a rejection) and the retries it used."""
        base = {
            **sample.meta,
            "key": key,
            "origin": sample.origin,
            "source": sample.source,
            "gold": sample.answer,
        }
        try:
            if sample.answer is None or gold_kind(sample.answer) is None:
                raise Rejected("no_gold", f"gold answer {sample.answer!r} cannot be scored")
            images = _image_refs(sample.images, self.image_root)
            description = self.describe(sample)
            if not description or not description.strip():
                raise Rejected("no_description", "no description (empty or missing field / caption)")
        except Rejected as rejected:
            return {**base, "reason": rejected.reason, "detail": rejected.detail}, 0
        base["description"] = description
        prompt = render_prompt(self.template, description, question_text(sample.messages))
        messages = [{"role": "user", "content": prompt}]
        try:
            reply, retries = call_with_retries(
                lambda: self.teacher(messages), self.policy, self.rng, self.sleep
            )
        except TeacherError as err:
            return {**base, "reason": "teacher_error", "detail": str(err)}, err.retries
        verdict = judge(reply.content, reply.reasoning, reply.finish_reason, sample.answer)
        if verdict.reason != KEPT:
            reply_fields = {"answer": verdict.answer, "reply": reply.content, "reasoning": reply.reasoning}
            return {**base, "reason": verdict.reason, "detail": verdict.detail, **reply_fields}, retries
        history = sample.messages[:-1] if sample.messages[-1]["role"] == "assistant" else sample.messages
        turns = [*history, {"role": "assistant", "content": verdict.target}]
        return {**base, "reason": KEPT, "messages": turns, "images": images}, retries


# ---------------------------------------------------------------- the run


@dataclass
class DistillReport:
    rows: int  # input rows (after sampling)
    skipped: int  # finished in an earlier run
    outcomes: Counter = field(default_factory=Counter)  # this run: "kept" or a reason -> rows
    retries: int = 0  # teacher retries this run
    totals: Counter = field(default_factory=Counter)  # every run so far, from the logs
    image_root: str = ""  # what sft.jsonl's image paths are relative to
    absolute_images: bool = False  # some image lies outside image_root: its path is absolute
    input_problems: int = 0  # unreadable input rows skipped (data.strict: false)

    @property
    def done(self) -> int:
        return sum(self.outcomes.values())

    def sft_source(self, out_dir: Path) -> dict[str, Any]:
        """The data source that reads the kept rows in an SFT recipe."""
        source = {"name": "distilled", "path": str(out_dir / KEPT_FILE), "format": "messages"}
        source["image_root"] = self.image_root
        if self.absolute_images:
            source["allow_outside_root"] = True
        return source

    def table(self) -> str:
        names = [KEPT, *REASONS]
        rows = [(n, self.outcomes[n], self.totals[n]) for n in names if self.outcomes[n] or self.totals[n]]
        rows.append(("all", self.done, sum(self.totals.values())))
        return format_table(("outcome", "this run", "total"), rows)

    def to_dict(self, out_dir: Path) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "skipped": self.skipped,
            "this_run": dict(self.outcomes),
            "retries": self.retries,
            "total": dict(self.totals),
            "input_problems": self.input_problems,
            "sft_source": self.sft_source(out_dir),
        }


def log_state(out_dir: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """``(kept, rejected)``: the last record per key in each log (a crash-cut last line is repaired first)."""
    kept = {r["key"]: r for r in read_log(out_dir / KEPT_FILE)}
    rejected = {r["key"]: r for r in read_log(out_dir / REJECTED_FILE)}
    return kept, rejected


def _totals(kept: dict[str, dict], rejected: dict[str, dict]) -> Counter:
    totals = Counter({KEPT: len(kept)})
    totals.update(r["reason"] for key, r in rejected.items() if key not in kept)
    return +totals


def distill(
    samples: Sequence[Sample],
    out_dir: str | Path,
    *,
    teacher: Teacher,
    describe: Describe,
    template: str,
    image_root: str | Path,
    policy: RetryPolicy,
    max_concurrency: int,
    retry_errors: bool = False,
    seed: int = 0,
    sleep: Callable[[float], None] = time.sleep,
    progress: Callable[[DistillReport], None] | None = None,
) -> DistillReport:
    """Distil the rows not finished yet into ``out_dir`` (see the module docstring); ``progress`` is called
    after every finished row. A :class:`~align.errors.AlignError` from the teacher (wrong key or URL) stops the
    run; rows finished by then are kept."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = unique_keys(samples)
    kept, rejected = log_state(out)
    done = set(kept) | {
        k for k, r in rejected.items() if not (retry_errors and r["reason"] == "teacher_error")
    }
    todo = iter([(k, s) for k, s in zip(keys, samples, strict=True) if k not in done])
    report = DistillReport(rows=len(samples), skipped=sum(k in done for k in keys))
    report.image_root = str(Path(os.path.abspath(image_root)))
    job = _Job(teacher, describe, template, Path(report.image_root), policy, random.Random(seed), sleep)
    with (
        JsonlLog(out / KEPT_FILE) as kept_log,
        JsonlLog(out / REJECTED_FILE) as rejected_log,
        ThreadPoolExecutor(max_concurrency, thread_name_prefix="distill") as pool,
    ):
        running: set[Future] = set()
        try:
            while True:
                # A short queue: memory stays flat on big inputs and a fatal error stops quickly.
                while len(running) < 2 * max_concurrency and (item := next(todo, None)) is not None:
                    running.add(pool.submit(job, *item))
                if not running:
                    break
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    record, retries = future.result()
                    (kept_log if record["reason"] == KEPT else rejected_log).write(record)
                    report.outcomes[record["reason"]] += 1
                    report.retries += retries
                    if progress is not None:
                        progress(report)
        except BaseException:
            for future in running:
                future.cancel()
            raise
    kept, rejected = log_state(out)
    report.totals = _totals(kept, rejected)
    report.absolute_images = any(os.path.isabs(p) for r in kept.values() for p in r.get("images", []))
    return report


def common_image_root(sources: Sequence[DataSource]) -> Path:
    """One folder all sources' image roots lie in: the kept rows of several sources share one file."""
    return Path(os.path.commonpath([source_image_root(s) for s in sources]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="distill recipe (kind: distill)")
    parser.add_argument(
        "overrides", nargs="*", help="key.path=value overrides, e.g. teacher.max_concurrency=16"
    )
    parser.add_argument(
        "--retry-errors", action="store_true", help="try again the rows whose last outcome was teacher_error"
    )


def run(args: argparse.Namespace) -> int:
    from align.data.mixing import build_mix

    recipe: DistillRecipe = load_any(args.recipe, args.overrides, expect="distill")
    template = load_prompt(recipe.prompt)
    seed = recipe.data.seed if recipe.data.seed is not None else recipe.seed
    samples, mix = build_mix(recipe.data.sources, seed, strict=recipe.data.strict)
    print(mix.table())
    teacher = build_teacher(recipe.teacher, recipe.seed)
    describe = build_describe(recipe.description, recipe.data.max_image_pixels)
    out = Path(recipe.output_dir)
    save_resolved(recipe, out)
    spec = recipe.teacher
    started = time.monotonic()

    def progress(report: DistillReport) -> None:
        step = max(1, (report.rows - report.skipped) // 20)
        if report.done % step == 0 or report.done == report.rows - report.skipped:
            kept = report.outcomes[KEPT]
            print(
                f"distill: {report.done}/{report.rows - report.skipped} rows, kept {kept}, "
                f"{time.monotonic() - started:.0f} s",
                file=sys.stderr,
            )

    report = distill(
        samples,
        out,
        teacher=teacher,
        describe=describe,
        template=template,
        image_root=common_image_root(recipe.data.sources),
        policy=RetryPolicy(spec.max_retries, spec.backoff, spec.max_backoff),
        max_concurrency=spec.max_concurrency,
        retry_errors=args.retry_errors,
        seed=recipe.seed,
        progress=progress,
    )
    report.input_problems = len(mix.problems)
    (out / REPORT_FILE).write_text(json.dumps(report.to_dict(out), indent=2) + "\n")
    print(
        f"distill: {report.rows} rows, {report.skipped} done in earlier runs, {report.retries} teacher retries"
    )
    print(report.table())
    print(f"\nkept rows: {out / KEPT_FILE}; as an SFT data source:\n  {json.dumps(report.sft_source(out))}")
    return 0
