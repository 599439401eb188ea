"""Rows in the published systems' own layouts train GRPO as written: VLM-R1's ``grpo_jsonl`` conversations (the
gold is the last ``gpt`` turn, with a per-row ``accu_reward_method``) and ms-swift's ``messages`` + ``images`` +
``solution`` rows without an ``<image>`` placeholder (``insert_image_placeholders: true``)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from align.cli import main
from align.data.config import DataSource
from align.data.readers import read_source
from align.data.rows import RowContext, RowError, row_images
from align.data.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    synthesize(root / "synth", train=4, test=1)
    train = root / "synth" / "train"
    questions = [json.loads(line) for line in (train / "rl.jsonl").read_text().splitlines()]
    vlm_r1 = [
        {
            "id": i,
            "image": q["image"],
            "conversations": [
                {"from": "human", "value": f"<image>{q['problem']}"},
                {"from": "gpt", "value": f"<answer>{q['solution']}</answer>"},
            ],
            "accu_reward_method": "default",
        }
        for i, q in enumerate(questions)
    ]
    swift = [
        {
            "messages": [{"role": "user", "content": q["problem"]}],
            "images": [q["image"]],
            "solution": q["solution"],
        }
        for q in questions
    ]
    out = {"llava": train / "vlm_r1.jsonl", "messages": train / "swift.jsonl"}
    out["llava"].write_text("".join(json.dumps(r) + "\n" for r in vlm_r1))
    out["messages"].write_text("".join(json.dumps(r) + "\n" for r in swift))
    return out


def _cli(args: list[str]) -> tuple[int, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        rc = main(args)
    return rc, printed.getvalue()


def _source(layouts: dict[str, Path], fmt: str) -> list[str]:
    keys = [f"data.sources.0.path={layouts[fmt]}", f"data.sources.0.format={fmt}"]
    keys.append("data.sources.0.question_template='{question}'")  # the rows hold the question as published
    if fmt == "messages":
        keys.append("data.sources.0.insert_image_placeholders=true")
    return keys


@pytest.mark.parametrize("fmt", ["llava", "messages"])
def test_data_check_passes_the_published_rows(layouts, siglip_qwen2: Path, fmt: str) -> None:
    args = [
        "data",
        "check",
        str(ROOT / "recipes/tiny/grpo.yaml"),
        f"--model={siglip_qwen2}",
        *_source(layouts, fmt),
    ]
    rc, printed = _cli(args)
    assert rc == 0 and "0 problems" in printed, printed


def test_without_the_key_the_swift_rows_are_refused_naming_it(layouts, siglip_qwen2: Path) -> None:
    args = ["data", "check", str(ROOT / "recipes/tiny/grpo.yaml"), f"--model={siglip_qwen2}"]
    rc, printed = _cli([*args, *_source(layouts, "messages")[:3]])
    assert rc == 2 and "insert_image_placeholders: true" in printed, printed


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["llava", "messages"])
def test_grpo_trains_two_steps_on_the_published_rows(
    layouts, siglip_qwen2: Path, tmp_path: Path, fmt: str
) -> None:
    out = tmp_path / "run"
    args = ["grpo", str(ROOT / "recipes/tiny/grpo.yaml"), f"model={siglip_qwen2}", f"output_dir={out}"]
    rc, printed = _cli([*args, *_source(layouts, fmt), "run.max_steps=2"])
    assert rc == 0, printed
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "reward" in s] == [1, 2]
    assert all(s["reward_errors/accuracy"] == 0.0 for s in steps if "reward" in s)
    questions = [json.loads(line) for line in layouts["llava"].with_name("rl.jsonl").read_text().splitlines()]
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert logged and {row["gold"] for row in logged} <= {q["solution"] for q in questions}


# ------------------------------------------------------------- raw prompts for base models (R1-Zero style)

R1_ZERO = (
    "A conversation between User and Assistant. The user asks a question about the image, and the Assistant "
    "solves it.\nUser: {question}\nAssistant: Let me solve this step by step.\n<think>"
)


@pytest.mark.parametrize(
    ("template", "prefill"),
    [(R1_ZERO, "<think>"), ("Q: {question}\nA: <think>\n", "<think>\n"), ("Q: {question}\nA:", "")],
)
def test_raw_prefill_is_the_templates_closing_think(template: str, prefill: str) -> None:
    from align.data.encode import raw_prefill

    assert raw_prefill(template) == prefill


def test_a_raw_prompt_is_the_template_after_bos_with_the_image_expanded(siglip_qwen2: Path) -> None:
    from transformers import AutoProcessor

    from align.checkpoint import image_seq_len
    from align.data.encode import encode_prompt
    from align.data.sample import Sample
    from align.errors import AlignError

    processor = AutoProcessor.from_pretrained(siglip_qwen2)
    tokenizer, n = processor.tokenizer, image_seq_len(processor)
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    sample = Sample(
        "s", "rows.jsonl:1", [{"role": "user", "content": "<image>\nHow many?"}], images=["a.png"]
    )
    enc = encode_prompt(sample, tokenizer, image_id, n, R1_ZERO)
    text = R1_ZERO.replace("{question}", "<image>\nHow many?")
    before, after = text.split("<image>")
    expected = (
        [tokenizer.bos_token_id]
        + tokenizer(before, add_special_tokens=False)["input_ids"]
        + [image_id] * n
        + tokenizer(after, add_special_tokens=False)["input_ids"]
    )
    assert enc.input_ids == expected and enc.n_image_tokens == n
    chat = encode_prompt(sample, tokenizer, image_id, n)  # without the template: the chat template's prompt
    assert tokenizer.decode(chat.input_ids).endswith("<｜Assistant｜><think>\n")
    system = Sample(
        "s", "rows.jsonl:2", [{"role": "system", "content": "S"}, sample.messages[0]], images=["a.png"]
    )
    with pytest.raises(AlignError, match=r"rows.jsonl:2: grpo.prompt_template takes rows of one user turn"):
        encode_prompt(system, tokenizer, image_id, n, R1_ZERO)


def test_a_prompt_template_without_its_question_is_refused(siglip_qwen2: Path) -> None:
    args = [
        "grpo",
        str(ROOT / "recipes/tiny/grpo.yaml"),
        f"model={siglip_qwen2}",
        "grpo.prompt_template='Q: A:'",
    ]
    rc, printed = _cli(args)
    assert rc == 2 and "grpo.prompt_template: must hold {question} exactly once" in printed, printed


@pytest.mark.slow
def test_grpo_on_a_raw_prompt_prefills_think_and_scores_with_it(
    layouts, siglip_qwen2: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    questions = layouts["llava"].with_name("rl.jsonl")
    args = [
        "grpo",
        str(ROOT / "recipes/tiny/grpo.yaml"),
        f"model={siglip_qwen2}",
        f"output_dir={out}",
        f"data.sources.0.path={questions}",
        "data.sources.0.question_template='{question}'",
        f'grpo.prompt_template="{R1_ZERO.replace(chr(10), chr(92) + "n")}"',  # YAML double quotes: \n is a newline
        "run.max_steps=2",
    ]
    rc, printed = _cli(args)
    assert rc == 0, printed
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert logged and all(row["completion"].startswith("<think>") for row in logged)
    assert yaml.safe_load((out / "recipe.resolved.yaml").read_text())["grpo"]["prompt_template"] == R1_ZERO


# --------------------------------------------------------- align-anything's prompt / image / response rows


def test_align_anything_rows_are_sft_conversations(tmp_path: Path) -> None:
    """``format: hf`` on a JSON file of ``prompt`` / ``image`` / ``response`` rows (align-anything's
    text-image-to-text layout): the prompt (with its image) and the response become one SFT conversation."""
    from PIL import Image

    from align.config import from_dict
    from align.data.config import DataSource
    from align.data.readers import read_source

    Image.new("RGB", (8, 6), (9, 9, 9)).save(tmp_path / "a.png")
    rows = [
        {
            "prompt": "What is shown?",
            "image": "a.png",
            "response": "<think>\nA grey square.\n</think>\n\nA square.",
        },
        {"prompt": "Colour?", "image": "a.png", "response": "  "},
    ]
    (tmp_path / "aa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = from_dict(DataSource, {"name": "aa", "path": str(tmp_path / "aa.jsonl"), "format": "hf"})
    good, bad = list(read_source(source))
    assert [m["role"] for m in good.messages] == ["user", "assistant"]
    assert good.messages[0]["content"] == "<image>\nWhat is shown?" and good.answer is None
    assert good.messages[1]["content"] == rows[0]["response"] and len(good.images) == 1
    assert bad.reason == "empty or missing response (response)"
    mapped = from_dict(
        DataSource,
        {
            "name": "aa",
            "path": str(tmp_path / "aa.jsonl"),
            "format": "hf",
            "columns": {"response": "response"},
        },
    )
    assert next(iter(read_source(mapped))).messages == good.messages


def test_eval_takes_the_same_raw_prompt(layouts, siglip_qwen2: Path, tmp_path: Path) -> None:
    questions = layouts["llava"].with_name("rl.jsonl")
    args = ["eval", str(siglip_qwen2), "--data", str(questions), "--limit", "2", "--max-new-tokens", "4"]
    rc, printed = _cli([*args, "--out", str(tmp_path / "e"), "--prompt-template", R1_ZERO])
    assert rc == 0, printed
    predictions = [json.loads(line) for line in (tmp_path / "e/predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2 and all(p["completion"].startswith("<think>") for p in predictions)
    rc, printed = _cli([*args, "--out", str(tmp_path / "f"), "--prompt-template", "Q: A:"])
    assert rc == 2 and "--prompt-template must hold {question} exactly once" in printed


def test_a_vlm_r1_rec_row_gives_its_gpt_box_to_the_grounding_rewards(
    tmp_path: Path, siglip_qwen2: Path
) -> None:
    """VLM-R1's REC rows answer with a box in the gpt turn: it is the row's box for iou / iou_soft / giou."""
    from PIL import Image

    Image.new("RGB", (64, 48), (9, 9, 9)).save(tmp_path / "a.png")
    rows = [
        {
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>Where is the dog? Output its bounding box."},
                {"from": "gpt", "value": "<answer>[4, 6, 30, 40]</answer>"},
            ],
        },
        {
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>Q"},
                {"from": "gpt", "value": "[9, 9, 3, 3]"},
            ],
            "family": "grounding",
        },
    ]
    data = tmp_path / "rec.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["data", "check", str(ROOT / "recipes/tiny/grpo.yaml"), f"--model={siglip_qwen2}"]
    keys = [
        f"data.sources.0.path={data}",
        "data.sources.0.format=llava",
        "data.sources.0.question_template='{question}'",
    ]
    rc, printed = _cli([*args, *keys, "grpo.reward_funcs=[iou, rec_format]"])
    assert rc == 1 and "1 problem rows" in printed, printed
    assert f"{data}:2: malformed box [9, 9, 3, 3]: need 0 <= x1 < x2 and 0 <= y1 < y2" in printed
    from align.config import from_dict
    from align.data.config import DataSource
    from align.data.readers import read_source

    (sample, _) = read_source(from_dict(DataSource, {"name": "r", "path": str(data), "format": "llava"}))
    assert sample.meta["box"] == [4.0, 6.0, 30.0, 40.0] and sample.gold == "[4, 6, 30, 40]"


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def _context(tmp_path: Path, template: str = "{question}") -> RowContext:
    return RowContext("s", tmp_path, False, None, template)


def test_base64_images_are_decoded_with_or_without_a_data_url(tmp_path: Path) -> None:
    text = base64.b64encode(_png_bytes()).decode()
    for value in (text, f"data:image/png;base64,{text}", [text]):
        (image,) = row_images(value, _context(tmp_path))
        assert isinstance(image, Image.Image) and image.size == (8, 6)
    # a path is still a path, and base64 that is not an image is named as a broken image, not a missing file
    assert row_images("images/a.png", _context(tmp_path)) == [str(tmp_path / "images/a.png")]
    with pytest.raises(RowError, match="base64 image: embedded image") as bad:
        row_images("iVBORw0KGgo" + "A" * 81, _context(tmp_path))  # valid base64, not an image
    assert bad.value.kind == "image-corrupt"
    with pytest.raises(RowError, match="not valid base64") as bad:
        row_images("data:image/png;base64,@@not-base64@@", _context(tmp_path))
    assert bad.value.kind == "image-corrupt"


@pytest.mark.parametrize("fmt", ["llava", "messages"])
def test_question_template_wraps_the_first_user_turn_of_conversation_rows(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "a.png").write_bytes(_png_bytes())
    if fmt == "llava":
        turns = [
            {"from": "human", "value": "<image>Where is the cat?"},
            {"from": "gpt", "value": "[1, 2, 3, 4]"},
        ]
        turns += [{"from": "human", "value": "And the dog?"}, {"from": "gpt", "value": "left"}]
        row = {"image": "a.png", "conversations": turns}
    else:
        turns = [{"role": "user", "content": "Where is the cat?"}, {"role": "assistant", "content": "left"}]
        row = {"images": ["a.png"], "messages": turns}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    source = DataSource(
        name="s",
        path=str(path),
        format=fmt,
        question_template="{question} Answer in <answer> </answer> tags.",
        insert_image_placeholders=fmt == "messages",
    )
    (sample,) = read_source(source)
    users = [m["content"] for m in sample.messages if m["role"] == "user"]
    expected = "<image>Where is the cat? Answer in <answer> </answer> tags."
    assert users[0] == (expected if fmt == "llava" else "<image>\n" + expected.removeprefix("<image>"))
    assert users[1:] == (["And the dog?"] if fmt == "llava" else [])
