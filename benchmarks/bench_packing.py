"""SFT step time and tokens/s with and without packing (``data.packing``), same rows, same epoch.

Runs ``align sft`` (the real stage, in this process) on a mix of short caption rows and longer reasoning
rows from the synthetic set. Unpacked: ``--micro-batch`` padded rows per step, length-grouped (the default) or
in random order; packed: one row of up to ``--max-length`` tokens holding several rows (block-diagonal
attention from the position ids). Tokens/s counts real tokens only (padding excluded), so it measures useful
work. With sdpa the packed row's attention is computed over the whole row and masked, so packing only pays
when it removes more padding than that quadratic cost adds.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_packing.py [--rows 64 --max-length 1024 --repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import yaml
from bench_feature_cache import DEFAULT_WORK, ROOT, prepare, run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--rows", type=int, default=64, help="scenes: each gives one caption and one SFT row")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=4, help="unpacked rows per step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    paths = prepare(args.work, args.rows)
    recipe = args.work / "packing.yaml"
    sources = [
        {"name": "reasoning", "path": str(paths["sft"]), "format": "messages"},
        {"name": "captions", "path": str(paths["captions"]), "format": "llava"},
    ]
    base = {
        "extends": str(ROOT / "recipes" / "tiny" / "sft.yaml"),
        "model": str(paths["model"]),
        "data": {"sources": sources},
    }
    recipe.write_text(yaml.safe_dump(base))
    common = [f"data.max_length={args.max_length}", "run.epochs=1", "run.grad_accum=1", "optim.lr=1.0e-3"]
    modes = {
        "padded, length-grouped": ["data.packing=false", f"run.micro_batch_size={args.micro_batch}"],
        "padded, random order": [
            "data.packing=false",
            "data.group_by_length=false",
            f"run.micro_batch_size={args.micro_batch}",
        ],
        "packed": ["data.packing=true", "run.micro_batch_size=1"],
    }
    runs: dict[str, list[list[dict]]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode, extra in modes.items():
            runs[mode].append(
                run_stage(
                    "sft", recipe, args.work / f"pack-{mode.split(',')[0]}-{len(extra)}", [*common, *extra]
                )
            )

    print(
        f"\nSFT, tiny zoo, {2 * args.rows} rows ({args.rows} captions + {args.rows} reasoning rows), max_length "
        f"{args.max_length}, 1 epoch, {args.threads} thread(s), median step x steps over {args.repeats} runs"
    )
    print("| mode | rows per step | steps | epoch s | s/step | real tokens/s | first loss | last loss |")
    print("|---|---|---|---|---|---|---|---|")
    summary = {}
    for mode, results in runs.items():
        # median step time over every step of every run, times the steps: robust to bursts of other work
        epoch = statistics.median(r["step_time_s"] for rows in results for r in rows) * len(results[0])
        tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in results[0])
        steps = len(results[0])
        summary[mode] = epoch
        per_step = "1 packed row" if mode == "packed" else f"{args.micro_batch}"
        losses = [r["loss"] for r in results[0]]
        print(
            f"| {mode} | {per_step} | {steps} | {epoch:.2f} | {epoch / steps:.3f} | {tokens / epoch:.0f} | "
            f"{losses[0]:.3f} | {losses[-1]:.3f} |"
        )
    for mode in ("padded, length-grouped", "padded, random order"):
        print(f"packed vs {mode}: {summary[mode] / summary['packed']:.2f}x the speed")


if __name__ == "__main__":
    main()
