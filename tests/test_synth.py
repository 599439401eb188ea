"""`align data synth`: deterministic files, disjoint splits, answers that an independent solver agrees with."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from align.cli import main
from align.config import from_dict
from align.data.check import check_sources
from align.data.config import DataSource
from align.data.synth import FILES, RL_QUESTION_TEMPLATE, synthesize
from align.data.synth_scenes import BACKGROUND, COLOURS, SHAPES
from align.data.synth_tasks import FAMILIES


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, train=60, test=20, image_size=64, seed=3)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    synthesize(tmp_path / "a", train=12, test=5, seed=7)
    synthesize(tmp_path / "b", train=12, test=5, seed=7)
    synthesize(tmp_path / "c", train=12, test=5, seed=8)
    a, b, c = (all_files(tmp_path / x) for x in "abc")
    assert len(a) == 2 * len(FILES) + 12 + 5  # per split: the JSONL files and one PNG per scene
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_splits_never_share_a_scene(synth):
    train = read_jsonl(synth / "train" / "scenes.jsonl")
    test = read_jsonl(synth / "test" / "scenes.jsonl")
    assert (len(train), len(test)) == (60, 20)
    layouts = [{json.dumps(r["objects"], sort_keys=True) for r in rows} for rows in (train, test)]
    assert len(layouts[0]) == 60 and not layouts[0] & layouts[1]
    pixels = [{p.read_bytes() for p in (synth / split / "images").iterdir()} for split in ("train", "test")]
    assert not pixels[0] & pixels[1]


def test_val_split_is_disjoint_and_leaves_the_other_splits_alone(tmp_path):
    synthesize(tmp_path / "a", train=20, test=5, seed=1)
    synthesize(tmp_path / "b", train=20, test=8, seed=1, val=6)
    a, b = all_files(tmp_path / "a"), all_files(tmp_path / "b")
    assert {k: v for k, v in b.items() if k.startswith("train/")} == {
        k: v for k, v in a.items() if k.startswith("train/")
    }
    first_test = [r["objects"] for r in read_jsonl(tmp_path / "b" / "test" / "scenes.jsonl")[:5]]
    assert first_test == [r["objects"] for r in read_jsonl(tmp_path / "a" / "test" / "scenes.jsonl")]
    layouts = {
        split: {json.dumps(r["objects"]) for r in read_jsonl(tmp_path / "b" / split / "scenes.jsonl")}
        for split in ("train", "test", "val")
    }
    assert len(layouts["val"]) == 6 and not layouts["val"] & (layouts["train"] | layouts["test"])
    assert len(read_jsonl(tmp_path / "b" / "val" / "rl.jsonl")) == 6


def test_images_match_ground_truth(synth):
    for row in read_jsonl(synth / "train" / "scenes.jsonl"):
        image = Image.open(synth / "train" / row["image"]).convert("RGB")
        assert image.size == (64, 64) and 1 <= len(row["objects"]) <= 6
        for o in row["objects"]:
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            assert image.getpixel(((x1 + x2) // 2, (y1 + y2) // 2)) == COLOURS[o["colour"]]
        # boxes never overlap
        boxes = [o["box"] for o in row["objects"]]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        assert image.getpixel((0, 0)) == BACKGROUND  # objects keep a margin inside their grid cell


def test_image_size_option(tmp_path):
    synthesize(tmp_path, train=3, test=0, image_size=40, seed=0)
    assert Image.open(tmp_path / "train" / "images" / "000000.png").size == (40, 40)
    assert not (tmp_path / "test").exists()


# ---------------------------------------------------------------- an independent solver for the questions


def group(words: str) -> tuple[str | None, str | None]:
    """'red circles' or 'red circle' -> (red, circle); 'objects' -> (None, None)."""
    parts = words.split()
    colour = parts[0] if parts[0] in COLOURS else None
    noun = parts[-1].removesuffix("s")
    return colour, (noun if noun in SHAPES else None)


def count(objects: list[dict], colour: str | None, shape: str | None) -> int:
    return sum(
        (colour is None or o["colour"] == colour) and (shape is None or o["shape"] == shape) for o in objects
    )


def unique(objects: list[dict], colour: str | None, shape: str | None) -> dict:
    (match,) = [
        o
        for o in objects
        if (colour is None or o["colour"] == colour) and (shape is None or o["shape"] == shape)
    ]
    return match


def solve(question: str, objects: list[dict]) -> tuple[str, str]:
    """(family, answer) from the question text and the scene's ground truth alone."""
    if m := re.fullmatch(r"How many (.+) are there in the image\?", question):
        return "count", str(count(objects, *group(m[1])))
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        return "colour", unique(objects, None, m[1])["colour"]
    if m := re.fullmatch(r"Are there more (.+) than (.+) in the image\? Answer yes or no\.", question):
        return "compare", "yes" if count(objects, *group(m[1])) > count(objects, *group(m[2])) else "no"
    if m := re.fullmatch(r"What is the number of (.+) plus the number of (.+)\?", question):
        return "arithmetic", str(count(objects, *group(m[1])) + count(objects, *group(m[2])))
    if m := re.fullmatch(
        r"What is the bounding box of the (.+)\? Answer with .* of this 64x64 image\.", question
    ):
        return "grounding", str(unique(objects, *group(m[1]))["box"])
    raise AssertionError(f"unknown question: {question}")


@pytest.mark.parametrize("split", ["train", "test"])
def test_rl_and_sft_answers_agree_with_the_solver(synth, split):
    scenes = {r["id"]: r for r in read_jsonl(synth / split / "scenes.jsonl")}
    instruction = RL_QUESTION_TEMPLATE.format(question="")
    for row in read_jsonl(synth / split / "rl.jsonl"):
        objects = scenes[row["id"]]["objects"]
        assert solve(row["problem"], objects) == (row["family"], row["solution"]), row
    for row in read_jsonl(synth / split / "sft.jsonl"):
        objects = scenes[row["id"]]["objects"]
        user, reply = (m["content"] for m in row["messages"])
        question = user.removeprefix("<image>\n").removesuffix(instruction)
        family, answer = solve(question, objects)
        assert family == row["family"]
        m = re.fullmatch(r"<think>\n(.+)\n</think>\n<answer>(.+)</answer>", reply, re.DOTALL)
        assert m and m[2] == answer, reply
        # the derivation lists every object of the scene, in order, with its position
        listed = re.findall(r"^\d+\. a (\w+) (\w+) (.+)$", m[1], re.MULTILINE)
        assert listed == [(o["colour"], o["shape"], o["position"]) for o in objects]


def test_both_files_cover_every_family(synth):
    for name in ("rl.jsonl", "sft.jsonl"):
        families = {r["family"] for r in read_jsonl(synth / "train" / name)}
        assert families == set(FAMILIES), name


def test_captions_describe_the_scene(synth):
    scenes = {r["id"]: r for r in read_jsonl(synth / "train" / "scenes.jsonl")}
    for row in read_jsonl(synth / "train" / "captions.jsonl"):
        prompt, caption = (t["value"] for t in row["conversations"])
        assert prompt.startswith("<image>\n")
        for o in scenes[row["id"]]["objects"]:
            assert o["colour"] in caption and (o["shape"] in caption or "object" in caption)


def test_files_read_and_check_clean(synth):
    root = synth / "train"
    sources = [
        from_dict(DataSource, {"name": "captions", "path": str(root / "captions.jsonl"), "format": "llava"}),
        from_dict(DataSource, {"name": "sft", "path": str(root / "sft.jsonl"), "format": "messages"}),
        from_dict(
            DataSource,
            {
                "name": "rl",
                "path": str(root / "rl.jsonl"),
                "format": "rl",
                "question_template": RL_QUESTION_TEMPLATE,
            },
        ),
    ]
    report = check_sources(sources, max_image_pixels=64 * 64)
    assert report.ok, report.listing(5)
    assert [s.ok for s in report.sources] == [60, 60, 60]


def test_cli_prints_summary_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "s"
    argv = [
        "data",
        "synth",
        "--out",
        str(out),
        "--train",
        "10",
        "--test",
        "5",
        "--image-size",
        "32",
        "--seed",
        "1",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "synth: 10 train, 5 test scenes of 32x32, seed 1" in printed
    assert printed.splitlines()[1].split() == ["split", "rows", *FAMILIES]
    assert main(argv) == 2
    assert "is not empty; choose another --out or pass --force" in capsys.readouterr().err
    before = all_files(out)
    assert main([*argv, "--force"]) == 0
    assert all_files(out) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image-size", "8"], "--image-size must be between 24"),
        (["--train", "0", "--test", "0"], "not all 0"),
        (["--val", "-1"], "--val must be >= 0"),
    ],
)
def test_cli_rejects_bad_options(tmp_path, capsys, args, message):
    assert main(["data", "synth", "--out", str(tmp_path / "x"), *args]) == 2
    assert message in capsys.readouterr().err
