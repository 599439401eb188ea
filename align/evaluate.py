"""``align eval MODEL --data SRC``: generate on a data source and score with the GRPO reward functions.

Run::

    align eval checkpoints/run/sft --data data/synth/test/rl.jsonl --format rl \\
        --question-template "{question} Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
    align eval MODEL --data rows.jsonl --format messages --samples 4 --temperature 0.6   # pass@4

Greedy by default (``--samples 1 --temperature 0``); with ``--samples k`` every question gets k sampled
completions (one shared prefix) and the summary reports mean accuracy over samples and pass@k. Gold answers
come from the row's solution, or for SFT rows (messages / LLaVA formats) from the final assistant turn's
answer. Writes ``predictions.jsonl``, ``summary.json`` and ``summary.md`` to ``--out`` and prints the table:
overall, per source and per question family (``family`` field of the rows).

Every accuracy comes with its standard error over questions (:func:`mean_and_se`: a question's score is the
mean over its samples, SE = sample standard deviation / sqrt(questions)) and the normal 95% interval
mean +- 1.96 SE; :func:`paired_gain` gives the gain of one model over another on the same questions with the SE
of the per-question differences (paired, so it is smaller than the two SEs combined when the models agree).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from align.checkpoint import eos_token_ids, image_seq_len, load_llava, resolve_model_folder
from align.data.config import DEFAULT_MAX_IMAGE_PIXELS, DataSource
from align.data.encode import encode_prompt, prompt_prefill, prompt_template_problem
from align.data.images import pixel_values
from align.data.mixing import build_mix, format_table
from align.errors import AlignError
from align.grpo.sampler import SamplingSettings, generate
from align.rewards import extract_answer, load_reward, score_all, unscorable_gold, warm_up, with_prefill

DEFAULT_REWARDS = ("accuracy", "format")


def gold_answer(sample) -> str | None:
    """The row's solution, or the answer inside the final assistant turn of an SFT row (:attr:`Sample.gold`)."""
    return sample.gold


def _scorable(rows: list, rewards: Sequence[str], strict: bool, paths: dict[str, str]) -> list:
    """The rows some configured reward can score; the others are counted per file (or an error if ``strict``)."""
    kept, bad = [], []
    for s in rows:
        gold = gold_answer(s)
        reason = (
            "no gold answer"
            if gold is None
            else unscorable_gold(rewards, gold, s.meta.get("box"), s.meta.get("accu_reward_method"))
        )
        if reason is None:
            kept.append(s)
        else:
            bad.append((s, reason))
    if bad and strict:
        s, reason = bad[0]
        raise AlignError(
            f"{s.origin}: cannot be scored: {reason} ({len(bad)} such rows for rewards {', '.join(rewards)}; "
            "without --strict they are skipped and counted)"
        )
    per_file: dict[str, list] = defaultdict(list)
    for s, reason in bad:
        per_file[paths.get(s.source, s.source)].append((s, reason))
    for path, items in per_file.items():
        s, reason = items[0]
        print(f"eval: skipping {len(items)} rows of {path} that cannot be scored, first {s.origin}: {reason}")
    return kept


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n); 0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_and_se of no values")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def interval95(mean: float, se: float) -> tuple[float, float]:
    """The normal 95% interval of a mean in [0, 1], clipped to [0, 1]."""
    return max(0.0, mean - 1.96 * se), min(1.0, mean + 1.96 * se)


def question_accuracy(predictions: Sequence[dict]) -> dict[str, float]:
    """Each question's accuracy: the mean over its samples (a sample with no accuracy score counts 0)."""
    scores: dict[str, list[float]] = defaultdict(list)
    for p in predictions:
        scores[p["origin"]].append(p["rewards"].get("accuracy") or 0.0)
    return {q: sum(v) / len(v) for q, v in scores.items()}


def paired_gain(before: Sequence[dict], after: Sequence[dict]) -> tuple[float, float, int]:
    """Accuracy gain of ``after`` over ``before`` on the questions both answered: (gain, its SE, questions)."""
    a, b = question_accuracy(before), question_accuracy(after)
    common = [q for q in b if q in a]
    if not common:
        raise ValueError("the two prediction sets share no question")
    gain, se = mean_and_se([b[q] - a[q] for q in common])
    return gain, se, len(common)


def _table(groups: dict[str, list[dict]], reward_names: list[str], samples: int) -> list[list]:
    rows = []
    for name, preds in groups.items():
        row = [name, len({p["origin"] for p in preds})]
        for r in reward_names:
            values = [p["rewards"][r] for p in preds if p["rewards"][r] is not None]
            row.append(round(sum(values) / len(values), 4) if values else "")
        if samples > 1:
            by_q: dict[str, float] = defaultdict(float)
            for p in preds:
                by_q[p["origin"]] = max(by_q[p["origin"]], p["rewards"].get("accuracy") or 0.0)
            row.append(round(sum(by_q.values()) / len(by_q), 4))
        row.append(round(sum(p["length"] for p in preds) / len(preds), 1))
        if "accuracy" in reward_names:
            mean, se = mean_and_se(list(question_accuracy(preds).values()))
            row += [round(se, 4), [round(x, 4) for x in interval95(mean, se)]]
        rows.append(row)
    return rows


def evaluate(
    model_dir: str | Path,
    sources: list[DataSource],
    out_dir: str | Path,
    *,
    rewards: Sequence[str] = DEFAULT_REWARDS,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    limit: int | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    strict: bool = False,
    prompt_template: str | None = None,
    model=None,
    processor=None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Generate, score and summarise; returns the summary dict (also written to ``out_dir``).

    Rows without a gold answer ``rewards`` can score are skipped and counted per file (``strict``: an
    AlignError listing them). ``model``/``processor`` may be passed in (already loaded) to skip loading
    ``model_dir``. ``progress`` gets one line per generation batch (``align eval`` prints them: a long
    evaluation otherwise says nothing for minutes). ``prompt_template``: a raw prompt for base models, as
    ``grpo.prompt_template``.
    """
    if model is None:
        model, processor = load_llava(resolve_model_folder(model_dir))
    model.eval()
    tokenizer = processor.tokenizer
    prefill = prompt_prefill(tokenizer, prompt_template)
    funcs = {name: load_reward(name) for name in rewards}
    warm_up()
    rows, _ = build_mix(sources, seed, strict=True)
    rows = _scorable(rows, rewards, strict, {src.name: src.path for src in sources})[:limit]
    if not rows:
        raise AlignError(f"no rows with a gold answer in {', '.join(s.path for s in sources)}")
    sampling = SamplingSettings(
        num_generations=samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_token_ids=eos_token_ids(tokenizer, model.generation_config),
        pad_token_id=tokenizer.pad_token_id,
        do_sample=temperature > 0,
    )
    generator = torch.Generator().manual_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions = []
    n_batches = math.ceil(len(rows) / batch_size)
    t0 = time.perf_counter()
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        predictions += _predict(
            model, processor, batch, sampling, generator, funcs, (prefill, prompt_template), max_pixels
        )
        if progress is not None:
            done = min(start + batch_size, len(rows))
            progress(
                f"eval: batch {start // batch_size + 1}/{n_batches}, questions {done}/{len(rows)}, "
                f"elapsed {time.perf_counter() - t0:.0f}s"
            )
    with (out_dir / "predictions.jsonl").open("w") as f:
        for p in predictions:
            f.write(json.dumps(p) + "\n")
    summary = {
        "model": str(model_dir),
        "samples": samples,
        "temperature": temperature,
        "questions": len(rows),
    }
    return _summarize(predictions, list(rewards), summary, out_dir)


def _predict(
    model, processor, batch, sampling: SamplingSettings, generator, funcs, prompting, max_pixels
) -> list[dict]:
    """One generation batch: each row's completions, the answer each extracts, and their rewards.
    ``prompting``: (the prefill, the raw prompt template or None for the chat template)."""
    tokenizer, samples = processor.tokenizer, sampling.num_generations
    prefill, template = prompting
    n_image_tokens = image_seq_len(processor)
    image_id = model.config.image_token_id
    prompts = [encode_prompt(s, tokenizer, image_id, n_image_tokens, template) for s in batch]
    pixels, sizes = pixel_values(
        [im for s in batch for im in s.images],
        processor.image_processor,
        max_pixels,
        [s.origin for s in batch for _ in s.images],
    )
    first_size = []  # each row's first image size: the frame grounding boxes are in
    for s in batch:
        first_size.append(sizes[0] if s.images else None)
        sizes = sizes[len(s.images) :]
    per_prompt = [len(s.images) for s in batch]
    rollout = generate(model, [p.input_ids for p in prompts], pixels, per_prompt, sampling, generator)
    texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    texts = with_prefill(texts, prefill) if prefill else texts
    rep = lambda values: [v for v in values for _ in range(samples)]  # noqa: E731
    columns = {
        "solution": rep([gold_answer(s) for s in batch]),
        "box": rep([s.meta.get("box") for s in batch]),
        "image_size": rep(first_size),
    }
    methods = [s.meta.get("accu_reward_method") for s in batch]
    if any(m is not None for m in methods):
        columns["accu_reward_method"] = rep(methods)
    matrix, _ = score_all(funcs, texts, columns, on_error="skip")
    return [
        {
            "origin": batch[i // samples].origin,
            "source": batch[i // samples].source,
            "family": batch[i // samples].meta.get("family", "-"),
            "gold": gold_answer(batch[i // samples]),
            "prediction": extract_answer(text),
            "completion": text,
            "length": int(rollout.lengths[i]),
            "truncated": bool(rollout.is_truncated[i]),
            "rewards": dict(zip(funcs, matrix[i], strict=True)),
        }
        for i, text in enumerate(texts)
    ]


def _summarize(predictions: list[dict], rewards: list[str], summary: dict, out_dir: Path) -> dict:
    """Rewards, pass@k, lengths and accuracy intervals per group (all, each source, each family), written as
    summary.json and summary.md; returns the summary with a printable ``table``."""
    samples = summary["samples"]
    groups: dict[str, list[dict]] = {"all": predictions}
    for key in ("source", "family"):
        for p in predictions:
            groups.setdefault(f"{key}={p[key]}", []).append(p)
    headers = ["group", "questions", *rewards, *([f"pass@{samples}"] if samples > 1 else []), "mean_length"]
    if "accuracy" in rewards:
        headers += ["accuracy_se", "accuracy_ci95"]
    table = _table(groups, rewards, samples)
    summary["groups"] = {row[0]: dict(zip(headers[1:], row[1:], strict=True)) for row in table}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    md += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table]
    (out_dir / "summary.md").write_text("\n".join(md) + "\n")
    summary["table"] = format_table(headers, [[_cell(c) for c in row] for row in table])
    return summary


def _cell(value) -> str:
    return f"{value[0]:.3f}-{value[1]:.3f}" if isinstance(value, list) else str(value)


def add_arguments(parser) -> None:
    parser.add_argument("model", help="model folder or stage output folder")
    parser.add_argument("--data", required=True, nargs="+", help="data file(s) or HF dataset folder(s)")
    parser.add_argument("--format", default="rl", choices=["rl", "messages", "llava", "r1_onevision", "hf"])
    parser.add_argument("--image-root", default=None)
    parser.add_argument(
        "--question-template", default="{question}", help="rl/hf rows: how a question is asked"
    )
    parser.add_argument(
        "--prompt-template",
        default=None,
        help="a raw prompt for base models, {question} = the row's question (as grpo.prompt_template)",
    )
    parser.add_argument(
        "--rewards", default=",".join(DEFAULT_REWARDS), help="comma-separated names or module:fn"
    )
    parser.add_argument("--samples", type=int, default=1, help="completions per question (pass@k)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generation batch")
    parser.add_argument("--limit", type=int, default=None, help="first N rows with a gold answer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop on rows no reward can score (default: skip and count them)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: MODEL/eval-<data name>)")


def run(args) -> int:
    problem = None if args.prompt_template is None else prompt_template_problem(args.prompt_template)
    if problem is not None:
        raise AlignError(f"--prompt-template {problem}")
    sources = []
    for i, path in enumerate(args.data):
        sources.append(
            DataSource(
                name=Path(path).stem if len(args.data) == 1 else f"{i}:{Path(path).stem}",
                path=path,
                format=args.format,
                image_root=args.image_root,
                question_template=args.question_template if args.format in ("rl", "hf") else "{question}",
            )
        )
        sources[-1].check()
    out = args.out or str(Path(args.model) / f"eval-{Path(args.data[0]).stem}")
    summary = evaluate(
        args.model,
        sources,
        out,
        rewards=[r for r in args.rewards.split(",") if r],
        samples=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        limit=args.limit,
        strict=args.strict,
        prompt_template=args.prompt_template,
        progress=lambda line: print(line, flush=True),
    )
    print(summary["table"])
    print(f"predictions and summary: {out}")
    return 0
