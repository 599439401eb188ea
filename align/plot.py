"""``align plot RUN_DIR``: PNG charts of a run's ``metrics.jsonl``, one per metric group, against step.

This module owns reading a metrics file (:func:`read_metrics`, which tolerates the partial line a crash leaves
and the replayed steps a resume appends) and drawing it (:func:`plot_run`, which stages call at their end).

Groups (a key joins the first group that matches it): reward (``reward``, ``reward/<function>``), loss, learning
rate, accuracy, completion length, KL and gradient norm. A run folder without a ``metrics.jsonl`` of its own but
with stage sub-folders that have one (a pipeline run) gets one sub-folder of charts per stage.

Run: ``align plot checkpoints/tiny/sft [--out DIR]`` (default ``RUN_DIR/plots``).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from align.errors import AlignError

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class Group:
    name: str  # file stem of the chart
    title: str
    ylabel: str
    matches: Callable[[str], bool]


def _is_std(key: str) -> bool:
    return key.endswith(("_std", "/std"))


GROUPS: tuple[Group, ...] = (
    Group(
        "reward",
        "Reward (mean per function)",
        "reward",
        lambda k: (k == "reward" or k.startswith(("reward/", "rewards/"))) and not _is_std(k),
    ),
    Group(
        "loss",
        "Loss",
        "loss",
        lambda k: k == "loss" or k.startswith("loss/") or k.endswith(("/loss", "_loss")),
    ),
    Group(
        "lr",
        "Learning rate",
        "learning rate",
        lambda k: k == "lr" or k.startswith(("lr/", "lr_")) or k.endswith("_lr"),
    ),
    Group("accuracy", "Accuracy", "accuracy", lambda k: "accuracy" in k and not _is_std(k)),
    Group("completion_length", "Completion length", "tokens", lambda k: "length" in k and not _is_std(k)),
    Group("kl", "KL divergence to the reference", "KL", lambda k: k == "kl"),  # loss/kl (beta * KL) is a loss
    Group("grad_norm", "Gradient norm (before clipping)", "norm", lambda k: k == "grad_norm"),
)


def read_metrics(path: str | Path) -> tuple[list[dict], list[int]]:
    """``(rows, skipped_line_numbers)`` of a metrics JSONL file.

    Lines that are not JSON objects with a numeric ``step`` are skipped, not fatal: a crash mid-write leaves a
    partial last line, and a resumed run appends its next row right after it. Rows a resumed run replays
    (step <= an earlier row's step, with keys already logged at that step) replace the earlier rows from that
    step on, so every series runs forward; a second row of the same step with new keys is merged into it.
    """
    rows: list[dict] = []
    skipped: list[int] = []
    with Path(path).open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped.append(number)
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
                skipped.append(number)
                continue
            last = rows[-1] if rows else None
            if last is not None and last["step"] == row["step"] and not (set(last) & set(row)) - {"step"}:
                last.update(row)  # e.g. evaluation metrics logged as a second row of the same step
                continue
            while rows and rows[-1]["step"] >= row["step"]:
                rows.pop()
            rows.append(row)
    return rows, skipped


def series(rows: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """``key -> (steps, values)`` for every finite numeric value in ``rows`` (bools and strings are not series)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            steps, values = out.setdefault(key, ([], []))
            steps.append(row["step"])
            values.append(float(value))
    return out


def group_keys(keys: list[str]) -> dict[str, list[str]]:
    """``group name -> keys`` for the groups present, in GROUPS order; keys in no group are left out."""
    grouped: dict[str, list[str]] = {}
    for key in sorted(keys):
        group = next((g for g in GROUPS if g.matches(key)), None)
        if group is not None:
            grouped.setdefault(group.name, []).append(key)
    return {g.name: grouped[g.name] for g in GROUPS if g.name in grouped}


def _smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def _draw(group: Group, data: dict[str, tuple[list[float], list[float]]], title: str, path: Path) -> Path:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas via savefig
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.5), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    smoothed = False
    for i, (key, (steps, values)) in enumerate(data.items()):
        colour = f"C{i}"
        few = len(steps) <= 30  # a line through a handful of points hides them: mark each one
        if len(steps) > 50 and group.name != "lr":  # noisy series: faint raw values, a smoothed line on top
            ax.plot(steps, values, color=colour, alpha=0.3, linewidth=1)
            ax.plot(steps, _smoothed(values), color=colour, linewidth=2, label=f"{key} (smoothed)")
            smoothed = True
        else:
            ax.plot(steps, values, color=colour, linewidth=2, marker="o" if few else None, label=key)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    steps_seen = {s for steps, _ in data.values() for s in steps}
    if len(steps_seen) == 1:  # one logged step: matplotlib would zoom to a sub-step range
        only = steps_seen.pop()
        ax.set_xlim(only - 1, only + 1)
    ax.set_ylabel(group.ylabel)
    ax.grid(alpha=0.3)
    if group.name == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    # A lone raw series is named by the title; several series, or a smoothed one, need a legend.
    if len(data) > 1 or smoothed or group.name in ("reward", "accuracy"):
        ax.legend(loc="best", fontsize="small")
    fig.savefig(path)
    return path


def plot_metrics_file(metrics_file: Path, out_dir: Path, name: str) -> list[Path]:
    """One PNG per metric group present in ``metrics_file``; messages go to stderr, nothing raises on content."""
    rows, skipped = read_metrics(metrics_file)
    if skipped:
        lines = ", ".join(str(n) for n in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        print(f"{metrics_file}: skipped {len(skipped)} unreadable line(s): {lines}", file=sys.stderr)
    data = series(rows)
    grouped = group_keys(list(data))
    if not grouped:
        found = ", ".join(sorted(data)) or "none"
        print(
            f"{metrics_file}: nothing to plot: {len(rows)} row(s), numeric keys: {found} "
            f"(plotted groups: {', '.join(g.name for g in GROUPS)})",
            file=sys.stderr,
        )
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    by_name = {g.name: g for g in GROUPS}
    return [
        _draw(
            by_name[group],
            {k: data[k] for k in keys},
            f"{name}: {by_name[group].title}",
            out_dir / f"{group}.png",
        )
        for group, keys in grouped.items()
    ]


def stage_folders(run_dir: Path) -> list[Path]:
    """``[run_dir]`` when it has a metrics file, else its sub-folders that have one (a pipeline run), by name."""
    if (run_dir / METRICS_FILE).is_file():
        return [run_dir]
    return sorted(p for p in run_dir.iterdir() if (p / METRICS_FILE).is_file()) if run_dir.is_dir() else []


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Charts of a stage run (``out_dir/<group>.png``) or of each stage of a pipeline run
    (``out_dir/<stage>/<group>.png``); ``out_dir`` defaults to ``run_dir/plots``. Returns the PNG paths."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    stages = stage_folders(run_dir)
    if not stages:
        raise AlignError(f"{run_dir}: no {METRICS_FILE}, and no sub-folder with one (is this a run folder?)")
    paths: list[Path] = []
    for stage in stages:
        target = out if stage == run_dir else out / stage.name
        name = run_dir.name if stage == run_dir else f"{run_dir.name}/{stage.name}"
        paths += plot_metrics_file(stage / METRICS_FILE, target, name)
    return paths


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a stage output folder (with metrics.jsonl) or a pipeline run folder")
    parser.add_argument("--out", default=None, help="where the PNGs go (default: RUN_DIR/plots)")


def run(args) -> int:
    paths = plot_run(args.run_dir, args.out)
    for path in paths:
        print(path)
    return 0 if paths else 1
