"""Bad rows and files never train silently: ``align data check`` lists each as ``file:line: reason`` and the stages
apply ``data.strict`` (stop, or skip and count per file) before anything trains.

The row cases are RL / R1-Onevision rows whose gold answer or box no reward could score, and images that are
truncated or over the pixel limit; the file cases are an empty file, a file of only bad rows and a weight that
rounds to 0 rows. Data-check cases run through ``align.cli.main`` on tiny files (no model); the stage cases run
``align sft`` / ``align grpo`` / ``align eval`` on the tiny zoo and stop before the first step, except the one
that proves ``data.strict: false`` skips a row and trains on the rest.

    HF_HUB_OFFLINE=1 .venv/bin/pytest -q tests/test_bad_rows.py
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from PIL import Image

from align.cli import main
from align.config import from_dict
from align.data.check import checked_mix, stage_row_check
from align.data.config import DEFAULT_MAX_IMAGE_PIXELS, DataConfig
from align.data.images import pixel_limit_warning
from align.errors import AlignError
from align.rewards import accuracy, iou, unscorable_gold

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"image": "img.png", "problem": "How many squares?", "solution": "3", "family": "count"}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    Image.new("RGB", (32, 24), (200, 10, 10)).save(tmp_path / "img.png")
    return tmp_path


def rows_file(folder: Path, rows: list, name: str = "rows.jsonl") -> Path:
    """JSONL rows (a str is written as the raw line); json.dumps writes NaN as the literal JSON readers accept."""
    path = folder / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def check_recipe(folder: Path, sources: list[dict], kind: str = "grpo", **top) -> str:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"kind": kind, "data": {"sources": sources}, **top}))
    return str(path)


def truncated_png(folder: Path, name: str, keep: int) -> str:
    """A noisy PNG cut to ``keep`` bytes (negative: that many bytes short of the end)."""
    whole = folder / f"whole-{name}"
    Image.effect_noise((48, 48), 60).convert("RGB").save(whole)
    data = whole.read_bytes()
    (folder / name).write_bytes(data[:keep])
    return name


def bomb_png(folder: Path) -> str:
    """A tiny file that decodes to 9000 x 9000 pixels (81M: under PIL's default limit, so PIL opens it)."""
    Image.new("1", (9000, 9000)).save(folder / "bomb.png")
    return "bomb.png"


# (id, bad row (given the folder), data check overrides, the reason listed at rows.jsonl:2)
ROW_CASES = [
    (
        "solution-dict",
        lambda f: {**GOOD, "solution": {"answer": 3}},
        [],
        "'solution' is a dict ({'answer': 3})",
    ),
    ("solution-list-3", lambda f: {**GOOD, "solution": [1, 2, 3]}, [], "got [1, 2, 3] (3 coordinates)"),
    ("solution-words", lambda f: {**GOOD, "solution": ["a", "b"]}, [], "'solution' is a list"),
    ("solution-nan", lambda f: {**GOOD, "solution": math.nan}, [], "'solution' is a non-finite number"),
    ("box-3-coordinates", lambda f: {**GOOD, "solution": "[1, 2, 3]"}, [], "(3 coordinates)"),
    (
        "box-3-in-answer-tags",
        lambda f: {**GOOD, "family": "grounding", "solution": "<answer>[4, 4, 9]</answer>"},
        [],
        "(3 coordinates)",
    ),
    (
        "box-inverted",
        lambda f: {**GOOD, "solution": "[20, 4, 10, 9]"},
        [],
        "need 0 <= x1 < x2 and 0 <= y1 < y2",
    ),
    ("box-nan", lambda f: {**GOOD, "solution": "[NaN, 1, 5, 5]"}, [], "coordinates must be finite numbers"),
    (
        "box-field-inverted",
        lambda f: {**GOOD, "box": [5, 9, 10, 2]},
        [],
        "need 0 <= x1 < x2 and 0 <= y1 < y2",
    ),
    ("box-outside-image", lambda f: {**GOOD, "solution": [1, 1, 40, 20]}, [], "lies outside the 32x24 image"),
    (
        "gold-math-unparseable",
        lambda f: {**GOOD, "solution": "\\frac{"},
        [],
        "cannot be scored: accuracy reward: math_verify cannot parse the gold answer",
    ),
    ("gold-blank", lambda f: {**GOOD, "solution": "$ $"}, [], "is blank once"),
    (
        "gold-only-an-article",
        lambda f: {**GOOD, "solution": "the"},
        [],
        "has no letters or digits to compare",
    ),
    (
        "gold-math-guard",
        lambda f: {**GOOD, "solution": "10^{10^{10}}"},
        [],
        "refused by the math guard (a power tower)",
    ),
    (
        "iou-without-a-box",
        lambda f: GOOD,
        ["grpo.reward_funcs=[iou,format]"],
        "iou reward: no valid gold box",
    ),
    (
        "image-truncated",
        lambda f: {**GOOD, "image": truncated_png(f, "cut.png", 400)},
        [],
        "cut.png: corrupt or truncated",
    ),
    (
        "image-end-chunk-missing",  # PIL decodes this one without complaint: only verify() sees it
        lambda f: {**GOOD, "image": truncated_png(f, "noend.png", -12)},
        [],
        "noend.png: corrupt or truncated",
    ),
    (
        "image-over-the-limit",
        lambda f: {**GOOD, "image": bomb_png(f)},
        ["data.max_image_pixels=1000000"],
        "9000x9000 = 81000000 pixels exceeds max_image_pixels 1000000",
    ),
]


@pytest.mark.parametrize(("case", "bad", "overrides", "reason"), ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_data_check_lists_each_bad_row_with_file_line_and_reason(
    folder, capsys, case, bad, overrides, reason
) -> None:
    good = {**GOOD, "box": [1, 1, 5, 5]} if case == "iou-without-a-box" else GOOD
    data = rows_file(folder, [good, bad(folder), good])
    path = check_recipe(folder, [{"name": "q", "path": str(data), "format": "rl"}])
    assert main(["data", "check", path, *overrides]) == 1
    out = capsys.readouterr().out
    listed = [line for line in out.splitlines() if line.startswith(f"{data}:")]
    assert len(listed) == 1 and listed[0].startswith(f"{data}:2: "), out
    assert reason in listed[0], listed[0]
    assert "FAIL: 1 problems" in out
    assert main(["data", "check", path, *overrides, "--no-strict"]) == 0  # listed, counted, not fatal
    assert "ok: 1 problems" in capsys.readouterr().out


def test_r1_onevision_gold_of_the_wrong_type(folder, capsys) -> None:
    turns = [{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "<answer>3</answer>"}]
    good = {"image": "img.png", "conversations": turns, "gt": "3"}
    data = rows_file(folder, [good, {**good, "gt": {"n": 3}}])
    path = check_recipe(folder, [{"name": "ov", "path": str(data), "format": "r1_onevision"}])
    assert main(["data", "check", path]) == 1
    assert f"{data}:2: 'gt' is a dict ({{'n': 3}})" in capsys.readouterr().out


def test_sft_recipe_refuses_question_rows(folder, capsys) -> None:
    data = rows_file(folder, [GOOD])
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A square."}]
    chat = rows_file(folder, [{"image": "img.png", "conversations": turns}], "chat.jsonl")
    sources = [
        {"name": "q", "path": str(data), "format": "rl"},
        {"name": "chat", "path": str(chat), "format": "llava"},
    ]
    assert main(["data", "check", check_recipe(folder, sources, kind="sft"), "--no-strict"]) == 2
    captured = capsys.readouterr()
    assert f"{data}:1: a question + solution row has no assistant turn to learn from" in captured.out
    assert f"error: data source 'q' ({data}): none of its 1 row is usable" in captured.err


# (id, the files, what the one error line names)
FILE_CASES = [
    ("empty", lambda f: [rows_file(f, [], "empty.jsonl")], "data source 's0' ({0}): the file has no rows"),
    ("blank-lines", lambda f: [rows_file(f, ["", "  "], "blank.jsonl")], "({0}): the file has no rows"),
    (
        "only-bad-rows",
        lambda f: [rows_file(f, ["{nope", {**GOOD, "solution": {"a": 1}}], "bad.jsonl")],
        "({0}): none of its 2 rows is usable (2 bad: answer 1, json 1; first: {0}:1: malformed JSON",
    ),
    (
        "weight-rounds-to-0",
        lambda f: [rows_file(f, [GOOD, GOOD], "a.jsonl"), rows_file(f, [GOOD], "b.jsonl")],
        "data source 's1' ({1}): weight 0.1 gives it 0 of the 2 mixed rows",
    ),
]


@pytest.mark.parametrize(("case", "make", "message"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_a_source_left_without_rows_is_an_error_naming_the_file(folder, capsys, case, make, message) -> None:
    files = make(folder)
    sources = [{"name": f"s{i}", "path": str(p), "format": "rl"} for i, p in enumerate(files)]
    if case == "weight-rounds-to-0":
        sources[1]["weight"] = 0.1
    path = check_recipe(folder, sources)
    for strictness in ([], ["--no-strict"]):
        assert main(["data", "check", path, *strictness]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        assert message.format(*files) in err, err


@pytest.mark.parametrize(
    ("max_pixels", "warned"),
    [(DEFAULT_MAX_IMAGE_PIXELS, False), (1_000, False), (DEFAULT_MAX_IMAGE_PIXELS + 1, True), (10**9, True)],
)
def test_raising_the_pixel_limit_warns_with_the_numbers(folder, capsys, max_pixels, warned) -> None:
    message = pixel_limit_warning(max_pixels)
    assert (message is not None) == warned
    data = rows_file(folder, [GOOD])
    path = check_recipe(folder, [{"name": "q", "path": str(data), "format": "rl"}])
    assert main(["data", "check", path, f"data.max_image_pixels={max_pixels}"]) == 0
    err = capsys.readouterr().err
    if warned:
        assert f"WARNING: data.max_image_pixels is {max_pixels:,}" in err
        assert "PIL's decompression-bomb limit of 89,478,485" in err and "GiB decoded" in err
    else:
        assert "WARNING" not in err


@pytest.mark.parametrize(
    ("rewards", "solution", "box", "scorable"),
    [
        (["accuracy", "format"], "3", None, True),
        (["accuracy", "format"], "\\frac{", None, False),
        (["accuracy", "format"], None, None, False),
        (["format"], "\\frac{", None, True),  # nothing reads the gold
        (["accuracy", "iou"], "\\frac{", [1, 1, 5, 5], True),  # the box still scores
        (["iou"], "3", None, False),
        (["iou"], "3", [5, 5, 1, 1], False),
        (["iou_soft", "length"], "3", [1, 1, 5, 5], True),
        (["tests/x.py:custom"], "\\frac{", None, True),  # custom rewards are not judged
    ],
)
def test_unscorable_gold_agrees_with_the_rewards(rewards, solution, box, scorable) -> None:
    assert (unscorable_gold(rewards, solution, box) is None) == scorable
    # the rewards themselves: None ("not applicable") exactly when the gold is unscorable, never a crash
    if rewards[0] == "accuracy":
        assert (accuracy("<answer>3</answer>", solution) is None) == (
            unscorable_gold(["accuracy"], solution) is not None
        )
    if rewards[0] == "iou":
        assert iou("<answer>[1, 1, 5, 5]</answer>", box) is None


def test_checked_mix_skips_and_counts_per_file_when_not_strict(folder) -> None:
    data = rows_file(folder, [GOOD, {**GOOD, "solution": "\\frac{"}, GOOD, {**GOOD, "image": "none.png"}])
    sources = [{"name": "q", "path": str(data), "format": "rl", "sampling": "first:2"}]
    config = from_dict(DataConfig, {"sources": sources, "strict": False})
    printed: list[str] = []
    samples, mix = checked_mix(config, 0, stage_row_check("grpo"), log=printed.append)
    # the bad rows go before sampling: first:2 takes the two good rows
    assert [s.origin for s in samples] == [f"{data}:1", f"{data}:3"]
    assert (mix.sources[0].problems, mix.sources[0].kept) == (2, 2)
    assert printed == [
        f"data.strict is false: skipping 2 of 4 rows of {data} (gold 1, image-missing 1), first {data}:2: "
        "cannot be scored: accuracy reward: math_verify cannot parse the gold answer '\\\\frac{'"
    ]
    with pytest.raises(
        AlignError, match=rf"^{data}:2: cannot be scored: .*\(2 bad data rows: gold 1, image-missing 1; "
    ):
        checked_mix(from_dict(DataConfig, {"sources": sources}), 0, stage_row_check("grpo"), log=None)


# ---------------------------------------------------------------- the stages on the tiny zoo


@pytest.fixture(scope="module")
def world(siglip_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic data beside a link to the shared assembled model (the stages read it, never write it)."""
    from align.data.synth import synthesize

    root = tmp_path_factory.mktemp("bad_rows")
    synthesize(root / "synth", train=8, test=1)
    (root / "model").symlink_to(siglip_qwen2, target_is_directory=True)
    return root


def stage_recipe(world: Path, command: str, rows: Path, out: Path) -> str:
    recipe = yaml.safe_load((ROOT / f"recipes/tiny/{command}.yaml").read_text())
    recipe["data"]["sources"][0]["path"] = str(rows)
    recipe["data"]["max_length"] = 512
    recipe.update(model=str(world / "model"), output_dir=str(out))
    recipe["run"] = {"micro_batch_size": 1, "grad_accum": 1, "max_steps": 1, "tensorboard": False}
    if command == "grpo":
        recipe["grpo"].update(num_generations=2, max_completion_length=8)
    path = out.parent / f"{command}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def good(world: Path, kind: str, n: int) -> list[dict]:
    lines = (world / "synth" / "train" / f"{kind}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def sft_with_truncated_png(world: Path, tmp: Path) -> Path:
    rows = good(world, "sft", 3)
    images = world / "synth" / "train" / "images"
    whole = (images / Path(rows[1]["images"][0]).name).read_bytes()
    (images / "noend.png").write_bytes(whole[:-12])  # decodes in PIL; only the end chunk is missing
    rows[1]["images"] = ["images/noend.png"]
    return rows_file(world / "synth" / "train", rows, "noend.jsonl")


def sft_overlong(world: Path, tmp: Path) -> Path:
    long_row = {
        "messages": [
            {"role": "user", "content": "How many?"},
            {
                "role": "assistant",
                "content": "<think>\n" + "count " * 600_000 + "</think>\n<answer>1</answer>",
            },
        ]
    }
    return rows_file(world / "synth" / "train", [*good(world, "sft", 2), long_row], "overlong.jsonl")


def grpo_with(solution) -> Callable[[Path, Path], Path]:
    def make(world: Path, tmp: Path) -> Path:
        rows = good(world, "rl", 3)
        rows[1]["solution"] = solution
        return rows_file(world / "synth" / "train", rows, "grpo_bad.jsonl")

    return make


# (id, command, the broken data file, extra overrides, in the one error line)
STAGE_CASES = [
    ("sft-truncated-png", "sft", sft_with_truncated_png, [], "noend.jsonl:2: image "),
    (
        "sft-empty-file",
        "sft",
        lambda w, t: rows_file(t, [], "empty.jsonl"),
        [],
        "empty.jsonl): the file has no rows",
    ),
    # the target is ~600k tokens; overlong: error used to cut it to max_length and train on the start
    ("sft-600k-token-row", "sft", sft_overlong, ["data.overlong=error"], "overlong.jsonl:3: "),
    ("grpo-dict-solution", "grpo", grpo_with({"answer": 3}), [], "grpo_bad.jsonl:2: 'solution' is a dict"),
    ("grpo-unscorable-gold", "grpo", grpo_with("\\frac{"), [], "grpo_bad.jsonl:2: cannot be scored"),
    (
        "grpo-empty-file",
        "grpo",
        lambda w, t: rows_file(t, [], "empty.jsonl"),
        [],
        "empty.jsonl): the file has no rows",
    ),
]


@pytest.mark.parametrize(
    ("case", "command", "make", "overrides", "expect"), STAGE_CASES, ids=[c[0] for c in STAGE_CASES]
)
def test_stages_refuse_bad_data_before_training(
    world, tmp_path, capsys, case, command, make, overrides, expect
):
    rows = make(world, tmp_path)
    out = tmp_path / "run"
    assert main([command, stage_recipe(world, command, rows, out), *overrides]) == 2
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("error: "))
    assert expect in line, err[-3000:]
    if case == "sft-600k-token-row":
        assert "tokens > max_length 512 (overlong: error)" in line
    if case == "sft-truncated-png":
        assert "noend.png: corrupt or truncated" in line
    assert not (out / "model").exists() and not (out / "metrics.jsonl").exists()


def test_grpo_skips_and_counts_unscorable_rows_when_not_strict(world, tmp_path, capsys) -> None:
    rows = grpo_with("\\frac{")(world, tmp_path)
    out = tmp_path / "run"
    assert main(["grpo", stage_recipe(world, "grpo", rows, out), "data.strict=false"]) == 0
    printed = capsys.readouterr().out
    assert (
        f"data.strict is false: skipping 1 of 3 rows of {rows} (gold 1), first {rows}:2: cannot be scored"
        in printed
    )
    assert "2 questions (0 too long)" in printed
    assert (out / "model" / "config.json").exists()
    assert all(
        json.loads(line)["origin"] != f"{rows}:2"
        for line in (out / "completions.jsonl").read_text().splitlines()
    )


def test_eval_counts_unscorable_rows_or_stops_on_them(world, tmp_path, capsys) -> None:
    rows = grpo_with("\\frac{")(world, tmp_path)
    base = [
        "eval",
        str(world / "model"),
        "--data",
        str(rows),
        "--max-new-tokens",
        "2",
        "--out",
        str(tmp_path / "e"),
    ]
    assert main([*base, "--strict"]) == 2
    assert f"{rows}:2: cannot be scored: accuracy reward: math_verify cannot parse" in capsys.readouterr().err
    assert main(base) == 0
    out = capsys.readouterr().out
    assert f"eval: skipping 1 rows of {rows} that cannot be scored, first {rows}:2" in out
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["questions"] == 2
