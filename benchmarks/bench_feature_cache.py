"""Stage 1 epoch time with and without the frozen-tower feature cache (``feature_cache: memory | disk | none``).

Runs ``align projector`` (the real stage, in this process) on the tiny zoo for several epochs per mode and
prints per-epoch step time. Epoch 1 fills the cache; later epochs read every image's features from it and
skip image decoding, preprocessing and the tower.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_feature_cache.py [--rows 128 --epochs 3 --repeats 3]

Also provides :func:`prepare` (zoo + assembled model + synthetic data, built once under ``--work``) for the
other benchmarks in this folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK = Path("/tmp/align-bench")


def prepare(work: Path, rows: int) -> dict[str, Path]:
    """The tiny zoo, a SigLIP + Qwen2 Llava folder and ``rows`` synthetic scenes under ``work`` (reused)."""
    from align.assemble import AssembleRecipe, assemble
    from align.config import from_dict
    from align.data.synth import synthesize
    from align.zoo import build_zoo

    zoo = work / "zoo"
    build_zoo(zoo)  # complete parts are skipped
    model = work / "siglip-qwen2"
    if not (model / "config.json").exists():
        spec = {
            "kind": "assemble",
            "vision": {"source": "hf", "name_or_path": str(zoo / "siglip-hf")},
            "llm": {"name_or_path": str(zoo / "qwen2-r1")},
            "output_dir": str(model),
        }
        assemble(from_dict(AssembleRecipe, spec))
    synth = work / f"synth-{rows}"
    if not (synth / "train" / "sft.jsonl").exists():
        synthesize(synth, train=rows, test=1)
    train = synth / "train"
    return {"model": model, "captions": train / "captions.jsonl", "sft": train / "sft.jsonl"}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_stage(command: str, recipe: Path, out: Path, overrides: list[str]) -> list[dict]:
    """One stage run through the command line, in this process; returns its metrics rows."""
    import shutil

    from align.cli import main

    shutil.rmtree(out, ignore_errors=True)
    argv = [
        command,
        str(recipe),
        f"output_dir={out}",
        "run.tensorboard=false",
        "run.save_every=0",
        *overrides,
    ]
    if main(argv) != 0:
        raise SystemExit(f"{' '.join(argv)} failed")
    return metrics(out)


def epoch_seconds(runs: list[list[dict]]) -> list[float]:
    """Per epoch: median step time over every step of that epoch in every run, times its steps.

    Medians of single steps shrug off the bursts of other work on a shared machine that sums of steps absorb.
    Model loading and the final save are excluded.
    """
    epochs = sorted({r["epoch"] for r in runs[0]})
    out = []
    for e in epochs:
        times = [r["step_time_s"] for rows in runs for r in rows if r["epoch"] == e]
        out.append(statistics.median(times) * len(times) / len(runs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--rows", type=int, default=128, help="caption rows (= distinct images)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    paths = prepare(args.work, args.rows)
    recipe = ROOT / "recipes" / "tiny" / "projector.yaml"
    common = [
        f"model={paths['model']}",
        f"data.sources.0.path={paths['captions']}",
        f"run.epochs={args.epochs}",
        f"run.micro_batch_size={args.micro_batch}",
    ]
    runs: dict[str, list[list[dict]]] = {"none": [], "memory": [], "disk": []}
    for _ in range(args.repeats):
        for mode in runs:  # interleaved: load changes on a shared machine hit every mode alike
            out = args.work / f"cache-{mode}"
            runs[mode].append(run_stage("projector", recipe, out, [*common, f"feature_cache='{mode}'"]))
    med = {m: epoch_seconds(rs) for m, rs in runs.items()}
    losses = {m: [r["loss"] for r in rs[0]] for m, rs in runs.items()}
    later = {m: statistics.mean(v[1:]) for m, v in med.items()}
    print(
        f"\nstage 1, tiny zoo (SigLIP 64px 2 layers + Qwen2 2 layers), {args.rows} images, micro batch "
        f"{args.micro_batch}, {args.epochs} epochs, {args.threads} thread(s), median step x steps over {args.repeats} runs"
    )
    head = " | ".join(f"epoch {e + 1} s" for e in range(args.epochs))
    print(f"| feature_cache | {head} | epochs 2+ mean s | speed-up (epochs 2+) |")
    print("|---|" + "---|" * (args.epochs + 2))
    for mode, values in med.items():
        cells = " | ".join(f"{v:.2f}" for v in values)
        print(f"| {mode} | {cells} | {later[mode]:.2f} | {later['none'] / later[mode]:.2f}x |")
    same = all(abs(a - b) < 1e-5 for a, b in zip(losses["none"], losses["memory"], strict=True))
    print(f"losses identical with and without the cache (|diff| < 1e-5): {same}")


if __name__ == "__main__":
    main()
