"""`align data check`: every planted problem in the broken fixtures is listed with its file and line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from align.checkpoint import image_seq_len
from align.cli import main
from align.config import from_dict
from align.data.check import check_sources
from align.data.config import DataSource

FIXTURES = Path(__file__).parent / "fixtures" / "data"
LLAVA = FIXTURES / "broken_llava.jsonl"
RL = FIXTURES / "broken_rl.jsonl"
IMAGES = FIXTURES / "images"

# (file, line, reason): each one planted on purpose, see tests/fixtures/data/make_fixtures.py and broken_rl.jsonl
PLANTED = [
    (LLAVA, 2, "malformed JSON: Expecting value"),
    (LLAVA, 3, "not UTF-8: byte 0xe9 at column 69"),
    (LLAVA, 4, f"image not found: {IMAGES / 'nope.png'}"),
    (LLAVA, 5, f"image {IMAGES / 'corrupt.png'}: not an image file PIL can read (23 bytes)"),
    (LLAVA, 6, "2 <image> placeholders but 1 image"),
    (LLAVA, 7, "empty assistant turn (conversations[1])"),
    (LLAVA, 8, "image path '../../secret.png' escapes image_root"),
    (LLAVA, 9, "no assistant turn"),
    (RL, 2, "box [2, 2, 30, 30] lies outside the 8x6 image"),
    (RL, 3, "malformed box: expected [x1, y1, x2, y2]"),
    (RL, 4, "missing or empty solution"),
    (RL, 5, "image path '/etc/hostname' is absolute"),
    (RL, 6, "missing or empty solution"),
]


def recipe(tmp_path: Path, data: dict | None, **top) -> str:
    """A recipe file; ``kind=None`` (no stage) mixes SFT and RL sources, a stage kind adds its row checks."""
    path = tmp_path / "recipe.yaml"
    body = {"kind": "sft", **top}
    if data is not None:
        body["data"] = data
    path.write_text(yaml.safe_dump(body))
    return str(path)


def broken_data(**extra) -> dict:
    return {
        "sources": [
            {"name": "llava", "path": str(LLAVA), "format": "llava"},
            {"name": "rl", "path": str(RL), "format": "rl"},
            {"name": "onevision", "path": str(FIXTURES / "r1_onevision.jsonl"), "format": "r1_onevision"},
        ],
        **extra,
    }


def lines_of(out: str) -> dict[str, str]:
    """Listing lines 'file:line: reason' keyed by 'file:line'."""
    found = {}
    for line in out.splitlines():
        for path in (str(LLAVA), str(RL)):
            if line.startswith(path + ":"):
                where, _, reason = line[len(path) + 1 :].partition(": ")
                found[f"{path}:{where}"] = reason
    return found


@pytest.mark.parametrize("fast", [False, True])
def test_every_planted_problem_is_listed_with_file_and_line(tmp_path, capsys, fast):
    argv = ["data", "check", recipe(tmp_path, broken_data(), kind=None)] + (["--fast"] if fast else [])
    assert main(argv) == 1
    out = capsys.readouterr().out
    listed = lines_of(out)
    for path, line, reason in PLANTED:
        assert reason in listed.get(f"{path}:{line}", ""), f"{path.name}:{line} should say {reason!r}\n{out}"
    assert len(listed) == len(PLANTED), out  # and nothing else: the good rows pass
    table = {row.split()[0]: row.split()[1:6] for row in out.splitlines()[2:5]}
    assert table == {
        "llava": ["10", "2", "0", "0", "8"],
        "rl": ["6", "1", "0", "0", "5"],
        "onevision": ["5", "2", "3", "0", "0"],
    }
    assert "answer 2, image-corrupt 1, image-missing 1, image-path 1, json 1, placeholders 1, utf8 1" in out
    assert "FAIL: 13 problems" in out


@pytest.mark.parametrize(
    "args, code, verdict",
    [
        (["--no-strict"], 0, "ok: 13 problems"),
        (["data.strict=false"], 0, "ok: 13 problems"),  # the recipe's data.strict is the default
        (["data.strict=false", "--strict"], 1, "FAIL: 13 problems"),
    ],
)
def test_strictness(tmp_path, capsys, args, code, verdict):
    path = recipe(tmp_path, broken_data(), kind=None)
    assert main(["data", "check", path, *args]) == code
    assert capsys.readouterr().out.rstrip().endswith(verdict)


def test_clean_sources_pass(tmp_path, capsys):
    data = {
        "sources": [
            {"name": "captions", "path": str(FIXTURES / "llava.json"), "format": "llava"},
            {"name": "chat", "path": str(FIXTURES / "messages.jsonl"), "format": "messages"},
            {"name": "rl", "path": str(FIXTURES / "rl.jsonl"), "format": "rl"},
            {
                "name": "hf",
                "path": str(FIXTURES / "hf" / "rl.parquet"),
                "format": "hf",
                "image_root": str(FIXTURES),
                "columns": {"image": "img", "answer": "gold"},
            },
        ]
    }
    assert main(["data", "check", recipe(tmp_path, data, kind=None)]) == 0
    out = capsys.readouterr().out
    assert "ok: 0 problems" in out and "length: not checked" in out


def test_limit_errors(tmp_path, capsys):
    assert main(["data", "check", recipe(tmp_path, broken_data(), kind=None), "--limit-errors", "3"]) == 1
    out = capsys.readouterr().out
    assert len(lines_of(out)) == 3 and "... and 10 more" in out


def test_pixel_limit_from_recipe(tmp_path, capsys):
    data = {
        "sources": [{"name": "rl", "path": str(FIXTURES / "rl.jsonl"), "format": "rl"}],
        "max_image_pixels": 47,
    }
    assert main(["data", "check", recipe(tmp_path, data, kind="grpo")]) == 1
    out = capsys.readouterr().out
    assert "image-too-large 3" in out and "8x6 = 48 pixels exceeds max_image_pixels 47" in out


def test_truncated_image_needs_full_decode(tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.effect_noise((64, 64), 50).save(big)
    (tmp_path / "cut.png").write_bytes(big.read_bytes()[:300])
    (tmp_path / "d.jsonl").write_text(
        '{"image": "cut.png", "problem": "q?", "solution": "3"}\n'
        '{"image": "big.png", "problem": "q?", "solution": "4"}\n'
    )
    data = {"sources": [{"name": "d", "path": str(tmp_path / "d.jsonl"), "format": "rl"}]}
    path = recipe(tmp_path, data, kind="grpo")
    assert main(["data", "check", path]) == 1
    assert f"{tmp_path}/d.jsonl:1: image {tmp_path}/cut.png: corrupt or truncated" in capsys.readouterr().out
    assert main(["data", "check", path, "--fast"]) == 0  # header only, as documented


@pytest.mark.parametrize(
    "data, message",
    [
        (None, "recipe.yaml: data: missing 'data:' section"),
        (
            {"sources": [{"name": "a", "path": "x", "format": "csv"}]},
            "data.sources[0].format: expected one of",
        ),
        ({"sources": [], "max_lenght": 3}, "data.max_lenght: unknown key (did you mean 'max_length'?)"),
    ],
)
def test_recipe_errors_exit_2(tmp_path, capsys, data, message):
    assert main(["data", "check", recipe(tmp_path, data)]) == 2
    assert message in capsys.readouterr().err


def sources(**kw) -> list[DataSource]:
    return [
        from_dict(
            DataSource, {"name": "chat", "path": str(FIXTURES / "messages.jsonl"), "format": "messages"}
        ),
        from_dict(DataSource, {"name": "rl", "path": str(FIXTURES / "rl.jsonl"), "format": "rl", **kw}),
    ]


def fake_length(sample) -> int:
    """Characters plus 10 per image: a stand-in for the tokenizer-based length."""
    return sum(len(m["content"]) for m in sample.messages) + 10 * len(sample.images)


@pytest.mark.parametrize(
    "overlong, max_length, problems, dropped",
    [
        ("drop", 10_000, 0, 0),
        ("drop", 40, 0, 5),
        ("error", 40, 5, 0),
        ("error", 44, 4, 0),
        ("error", 45, 3, 0),
    ],
)
def test_length_check_with_injected_length_fn(overlong, max_length, problems, dropped):
    # lengths: chat 41, 120, 8; rl 52, 45, 53, 14 (a row is too long when strictly over max_length)
    report = check_sources(sources(), 10_000, length_fn=fake_length, max_length=max_length, overlong=overlong)
    assert len(report.problems) == problems
    assert sum(s.overlong for s in report.sources) == dropped
    assert report.length_checked
    for p in report.problems:
        assert p.kind == "too-long" and f"> max_length {max_length} (overlong: error)" in p.reason


def test_check_sources_fast_mode_counts():
    report = check_sources(sources(), 10_000, decode_images=False)
    assert report.ok and [(s.name, s.rows, s.ok) for s in report.sources] == [("chat", 3, 3), ("rl", 4, 4)]
    assert not report.length_checked


def test_model_folder_without_config_is_an_error(tmp_path, capsys):
    data = {"sources": [{"name": "rl", "path": str(FIXTURES / "rl.jsonl"), "format": "rl"}]}
    assert main(["data", "check", recipe(tmp_path, data), "--model", str(tmp_path)]) == 2
    assert f"model folder {tmp_path}: no config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_length_check_with_an_assembled_model(zoo, tmp_path, capsys):
    from transformers import AutoProcessor

    from align.assemble import AssembleRecipe, assemble

    spec = {
        "kind": "assemble",
        "vision": {"source": "hf", "name_or_path": str(zoo / "clip-hf")},
        "llm": {"name_or_path": str(zoo / "llama-r1")},
        "output_dir": str(tmp_path / "llava"),
    }
    llava = assemble(from_dict(AssembleRecipe, spec))
    processor = AutoProcessor.from_pretrained(llava)
    ids = processor(text="<image> hi", images=Image.open(IMAGES / "red.png"), return_tensors="pt")[
        "input_ids"
    ]
    n_image = int((ids == processor.image_token_id).sum())
    assert image_seq_len(processor) == n_image
    capsys.readouterr()

    data = {
        "sources": [{"name": "rl", "path": str(FIXTURES / "rl.jsonl"), "format": "rl"}],
        "max_length": n_image + 2,  # every row with an image is over, the text-only row 4 is not
        "overlong": "error",
    }
    path = recipe(tmp_path, data, model=str(llava), kind=None)
    assert main(["data", "check", path]) == 1
    out = capsys.readouterr().out
    for line in (1, 2, 3):
        assert re.search(
            rf"rl\.jsonl:{line}: \d+ tokens > max_length {n_image + 2} \(overlong: error\)", out
        ), out
    assert "rl.jsonl:4:" not in out
    assert main(["data", "check", path, "data.overlong=drop"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[:5] == ["rl", "4", "1", "0", "3"]
