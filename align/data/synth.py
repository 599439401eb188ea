"""``align data synth``: a deterministic, verifiable visual task to sanity-check all three stages.

Run: ``align data synth --out data/synth [--train 1000 --test 100 --val 0 --image-size 64 --seed 0]``.

Writes, for each split (``train``, ``test`` and, with ``--val N``, ``val``) under ``--out``:

* ``images/NNNNNN.png`` — one scene per image (see :mod:`align.data.synth_scenes`);
* ``captions.jsonl`` — LLaVA format, "<image>\\nDescribe the image." -> a templated caption (stage 1);
* ``sft.jsonl`` — messages format, a question with ``<think>`` derivation and ``<answer>`` (stage 2);
* ``rl.jsonl`` — RL rows ``{image, problem, solution, family}`` with verifiable solutions (stage 3); read them
  with ``question_template: RL_QUESTION_TEMPLATE`` so the prompt matches the SFT rows;
* ``scenes.jsonl`` — the ground truth: every object's shape, colour, position and box.

No two splits share a scene, and the same options give byte-identical files. ``val`` is for choosing settings
(keep ``test`` for the numbers you report); it is drawn after the other two, so asking for it (or for more test
scenes) leaves the train split unchanged, and more test scenes keep the first ones.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.data.mixing import format_table
from align.data.synth_scenes import MIN_IMAGE_SIZE, Scene, caption, draw_scene, generate_scene
from align.data.synth_tasks import FAMILIES, make_task, sft_reply
from align.errors import AlignError

INSTRUCTION = "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
RL_QUESTION_TEMPLATE = "{question} " + INSTRUCTION
CAPTION_PROMPTS = ("Describe the image.", "What is in this picture?", "Describe the shapes you see.")
FILES = ("captions.jsonl", "sft.jsonl", "rl.jsonl", "scenes.jsonl")
MAX_IMAGE_SIZE = 2048
# Consecutive duplicate scenes tolerated before giving up: only reachable with more scenes than exist.
_MAX_RETRIES = 10_000


@dataclass
class SplitSummary:
    name: str
    scenes: int
    sft_families: Counter = field(default_factory=Counter)
    rl_families: Counter = field(default_factory=Counter)


@dataclass
class SynthSummary:
    out: Path
    image_size: int
    seed: int
    splits: list[SplitSummary]

    def table(self) -> str:
        rows = []
        for s in self.splits:
            for kind, families in (("sft", s.sft_families), ("rl", s.rl_families)):
                rows.append((f"{s.name} {kind}", s.scenes, *(families[f] for f in FAMILIES)))
        return format_table(("split", "rows", *FAMILIES), rows)


def _scene_key(scene: Scene) -> tuple:
    return tuple((o.shape, o.colour, o.box) for o in scene.objects)


def _scenes(n: int, size: int, rng: random.Random, seen: set[tuple]) -> list[Scene]:
    """``n`` scenes none of which is in ``seen`` (which they join): splits never share a scene."""
    scenes = []
    retries = 0
    while len(scenes) < n:
        scene = generate_scene(rng, size)
        key = _scene_key(scene)
        if key in seen:
            retries += 1
            if retries > _MAX_RETRIES:
                raise AlignError(
                    f"only {len(seen)} distinct {size}x{size} scenes found; ask for fewer or a larger --image-size"
                )
            continue
        retries = 0
        seen.add(key)
        scenes.append(scene)
    return scenes


def _rows(scene: Scene, index: int, split: str, seed: int) -> tuple[dict, dict, dict, dict]:
    """The captions, SFT, RL and ground-truth rows of one scene."""
    rng = random.Random(f"synth:{seed}:{split}:{index}")  # per scene: rows do not depend on earlier scenes
    image = f"images/{index:06d}.png"
    row_id = f"{split}-{index:06d}"
    captions = {
        "id": row_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{rng.choice(CAPTION_PROMPTS)}"},
            {"from": "gpt", "value": caption(scene, rng.randrange(3))},
        ],
    }
    # Different families for the SFT and RL rows of one scene; both cycle through all of them.
    sft_task = make_task(scene, index + 2, rng)
    sft = {
        "id": row_id,
        "family": sft_task.family,
        "images": [image],
        "messages": [
            {"role": "user", "content": f"<image>\n{sft_task.question} {INSTRUCTION}"},
            {"role": "assistant", "content": sft_reply(sft_task)},
        ],
    }
    rl_task = make_task(scene, index, rng)
    rl = {
        "id": row_id,
        "image": image,
        "problem": rl_task.question,
        "solution": rl_task.answer,
        "family": rl_task.family,
    }
    truth = {
        "id": row_id,
        "image": image,
        "size": [scene.size, scene.size],
        "objects": [
            {"shape": o.shape, "colour": o.colour, "position": o.where, "box": list(o.box)}
            for o in scene.objects
        ],
    }
    return captions, sft, rl, truth


def _prepare(directory: Path, force: bool) -> None:
    if directory.exists() and any(directory.iterdir()):
        if not force:
            raise AlignError(
                f"{directory} is not empty; choose another --out or pass --force to overwrite it"
            )
        for name in FILES:  # only what synth itself writes
            (directory / name).unlink(missing_ok=True)
        for png in (directory / "images").glob("*.png"):
            png.unlink()
    (directory / "images").mkdir(parents=True, exist_ok=True)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def synthesize(
    out: str | Path,
    train: int,
    test: int,
    image_size: int = 64,
    seed: int = 0,
    force: bool = False,
    val: int = 0,
) -> SynthSummary:
    """Write the train, test (and val) splits under ``out``; the same arguments give byte-identical files."""
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise AlignError(
            f"--image-size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE}, got {image_size}"
        )
    if min(train, test, val) < 0 or train + test + val == 0:
        raise AlignError(
            f"--train, --test and --val must be >= 0 and not all 0, got {train}, {test} and {val}"
        )
    out = Path(out)
    seen: set[tuple] = set()
    splits = []
    for split, n in (("train", train), ("test", test), ("val", val)):
        if n == 0:
            continue
        directory = out / split
        _prepare(directory, force)
        scenes = _scenes(n, image_size, random.Random(f"synth:{seed}:{split}:scenes"), seen)
        summary = SplitSummary(split, n)
        files: dict[str, list[dict]] = {name: [] for name in FILES}
        for i, scene in enumerate(scenes):
            draw_scene(scene).save(directory / "images" / f"{i:06d}.png", format="PNG")
            for name, row in zip(FILES, _rows(scene, i, split, seed), strict=True):
                files[name].append(row)
            summary.sft_families[files["sft.jsonl"][-1]["family"]] += 1
            summary.rl_families[files["rl.jsonl"][-1]["family"]] += 1
        for name, rows in files.items():
            _write_jsonl(directory / name, rows)
        splits.append(summary)
    return SynthSummary(out, image_size, seed, splits)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (gets train/, test/ and val/)")
    parser.add_argument("--train", type=int, default=1000, help="train scenes (default 1000)")
    parser.add_argument("--test", type=int, default=100, help="test scenes (default 100)")
    parser.add_argument("--val", type=int, default=0, help="validation scenes, for tuning (default 0)")
    parser.add_argument("--image-size", type=int, default=64, help="square image side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite a previous synth output in --out")


def run(args: argparse.Namespace) -> int:
    summary = synthesize(args.out, args.train, args.test, args.image_size, args.seed, args.force, args.val)
    sizes = ", ".join(f"{s.scenes} {s.name}" for s in summary.splits)
    print(
        f"synth: {sizes} scenes of {summary.image_size}x{summary.image_size}, seed {summary.seed} -> {summary.out}"
    )
    print(summary.table())
    print(
        "\nrecipe data sources: captions.jsonl (format: llava), sft.jsonl (format: messages), "
        f"rl.jsonl (format: rl, question_template: {json.dumps(RL_QUESTION_TEMPLATE)})"
    )
    return 0
