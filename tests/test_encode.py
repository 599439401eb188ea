"""Tokenisation, labels and truncation (align/data/encode.py) on the zoo's real R1-distill tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from align.data.encode import (
    IGNORE_INDEX,
    encode_prompt,
    encode_sft,
    encoded_length,
    fit_all,
    fit_length,
    labelled_spans,
)
from align.data.sample import Sample
from align.errors import AlignError

EOS = "<｜end▁of▁sentence｜>"
SYSTEM = "Answer with a number."
QUESTION = "<image>\nHow many red circles are there?"
REASONING = "I see circles: 1 at the left, 2 above, 3 below. They are red.\nSo the total is 3."
ANSWER = " The answer is \\boxed{3}."
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(zoo: Path, part: str, template: str | None = None):
    tokenizer = AutoTokenizer.from_pretrained(zoo / part)
    tokenizer.add_tokens(
        ["<image>"], special_tokens=True
    )  # the caller's job (assemble adds it to the model folder)
    if template is not None:
        tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
        tokenizer.chat_template = template
    return tokenizer, tokenizer.convert_tokens_to_ids("<image>")


@pytest.fixture(scope="module", params=["qwen2-r1", "llama-r1"])
def r1(zoo: Path, request: pytest.FixtureRequest):
    return _tokenizer(zoo, request.param)


@pytest.fixture(scope="module")
def chatml(zoo: Path):
    return _tokenizer(zoo, "qwen2-r1", CHATML)


def _sample(messages: list[tuple[str, str]], images: int = 1, origin: str = "rows.jsonl:7") -> Sample:
    return Sample(
        source="test",
        origin=origin,
        messages=[{"role": role, "content": content} for role, content in messages],
        images=[f"img{i}.png" for i in range(images)],
    )


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _inference_prompt(tokenizer, sample: Sample, image_token_id: int, image_seq_len: int) -> list[int]:
    """What generation sees: the template's prompt tokenised, each image token expanded as the processor does."""
    history = sample.messages[:-1] if sample.messages[-1]["role"] == "assistant" else sample.messages
    ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)["input_ids"]
    return [x for i in ids for x in ([i] * image_seq_len if i == image_token_id else [i])]


@pytest.mark.parametrize(
    "target",
    [
        f"<think>\n{REASONING}</think>{ANSWER}",  # as R1 writes it: the prefill is not repeated
        f"{REASONING}</think>{ANSWER}",  # already without the prefill
        f"<think>{REASONING}</think>{ANSWER}",  # the tag without its newline
    ],
)
@pytest.mark.parametrize("image_seq_len", [1, 5])
def test_r1_target_is_full_reasoning_and_answer_plus_eos(r1, target: str, image_seq_len: int) -> None:
    tokenizer, image_id = r1
    sample = _sample([("system", SYSTEM), ("user", QUESTION), ("assistant", target)])
    encoded = encode_sft(sample, tokenizer, image_id, image_seq_len)

    assert [_decode(tokenizer, span) for span in labelled_spans(encoded)] == [
        f"{REASONING}</think>{ANSWER}{EOS}"
    ]
    # Training sees exactly the inference prompt, then the tokens the model must generate.
    prompt = _inference_prompt(tokenizer, sample, image_id, image_seq_len)
    assert _decode(tokenizer, prompt).endswith("<｜Assistant｜><think>\n")
    assert encoded.input_ids[: encoded.prompt_length] == prompt
    generated = tokenizer(f"{REASONING}</think>{ANSWER}{EOS}", add_special_tokens=False)["input_ids"]
    assert encoded.input_ids == prompt + generated
    assert encoded.labels == [IGNORE_INDEX] * len(prompt) + generated
    assert encoded.input_ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("images,image_seq_len", [(0, 3), (1, 3), (2, 4)])
def test_no_labels_on_images_system_or_user(r1, images: int, image_seq_len: int) -> None:
    tokenizer, image_id = r1
    question = " and ".join(["<image>"] * images) + " How many?"
    sample = _sample([("system", SYSTEM), ("user", question), ("assistant", "<think>\nr</think>2")], images)
    encoded = encode_sft(sample, tokenizer, image_id, image_seq_len)

    assert encoded.input_ids.count(image_id) == images * image_seq_len == encoded.n_image_tokens
    assert encoded.n_images == images and encoded.images == sample.images
    labelled = [i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX]
    assert labelled == list(range(encoded.prompt_length, len(encoded)))
    assert encoded.n_labels == len(labelled)
    assert all(encoded.input_ids[i] == encoded.labels[i] for i in labelled)
    assert image_id not in encoded.labels
    # Each image is one contiguous run of image_seq_len tokens.
    runs = "".join("I" if t == image_id else "." for t in encoded.input_ids).split(".")
    assert sorted(len(r) for r in runs if r) == [image_seq_len] * images


def test_multi_turn_labels_every_assistant_turn_as_history_renders_it(r1) -> None:
    tokenizer, image_id = r1
    sample = _sample(
        [
            ("user", QUESTION),
            ("assistant", "<think>\nfirst look</think>3"),
            ("user", "And blue ones?"),
            ("assistant", f"<think>\n{REASONING}</think>{ANSWER}"),
        ]
    )
    encoded = encode_sft(sample, tokenizer, image_id, 2)
    spans = [_decode(tokenizer, span) for span in labelled_spans(encoded)]
    # The R1 template strips reasoning from earlier turns; only the final turn keeps it.
    assert spans == [f"3{EOS}", f"{REASONING}</think>{ANSWER}{EOS}"]
    assert encoded.input_ids[: encoded.prompt_length] == _inference_prompt(tokenizer, sample, image_id, 2)
    assert "first look" not in _decode(tokenizer, encoded.input_ids)


def test_generic_chatml_template_without_prefill(chatml) -> None:
    tokenizer, image_id = chatml
    sample = _sample(
        [
            ("system", SYSTEM),
            ("user", QUESTION),
            ("assistant", "Three."),
            ("user", "Sure?"),
            ("assistant", f"<think>\n{REASONING}</think>{ANSWER}"),
        ]
    )
    encoded = encode_sft(sample, tokenizer, image_id, 3)
    spans = [_decode(tokenizer, span) for span in labelled_spans(encoded)]
    # No prefill: the target is kept whole; the end-of-turn is supervised, the template's "\n" after it is not.
    assert spans == ["Three.<|im_end|>", f"<think>\n{REASONING}</think>{ANSWER}<|im_end|>"]
    assert encoded.input_ids[: encoded.prompt_length] == _inference_prompt(tokenizer, sample, image_id, 3)
    assert _decode(tokenizer, encoded.input_ids).endswith(f"{ANSWER}<|im_end|>")


def test_encode_prompt_is_the_generation_prompt(r1) -> None:
    tokenizer, image_id = r1
    rl_row = _sample([("user", QUESTION)])
    sft_row = _sample([("user", QUESTION), ("assistant", "<think>\nr</think>3")])
    for sample in (rl_row, sft_row):
        encoded = encode_prompt(sample, tokenizer, image_id, 4)
        assert encoded.input_ids == _inference_prompt(tokenizer, sample, image_id, 4)
        assert encoded.labels == [IGNORE_INDEX] * len(encoded) and encoded.prompt_length == len(encoded)
        assert encoded_length(rl_row, tokenizer, image_id, 4) == len(encoded)
    assert encoded_length(sft_row, tokenizer, image_id, 4) == len(encode_sft(sft_row, tokenizer, image_id, 4))


@pytest.mark.parametrize(
    "messages,images,expected",
    [
        (
            [("user", "<image><image> Which?"), ("assistant", "a")],
            1,
            "2 <image> placeholder(s) but 1 image(s)",
        ),
        ([("user", "Which?"), ("assistant", "a")], 2, "0 <image> placeholder(s) but 2 image(s)"),
        ([("user", "<image> Which?")], 1, "must end with an assistant message (last role: user)"),
        ([("user", "Which?"), ("assistant", "see <image>")], 1, "message 1 (assistant) contains <image>"),
    ],
)
def test_row_errors_name_the_origin_and_numbers(r1, messages, images: int, expected: str) -> None:
    tokenizer, image_id = r1
    with pytest.raises(
        AlignError, match="rows.jsonl:7: .*" + expected.replace("(", r"\(").replace(")", r"\)")
    ):
        encode_sft(_sample(messages, images), tokenizer, image_id, 4)


def test_image_token_must_be_a_single_token(r1) -> None:
    tokenizer, _ = r1
    ordinary = tokenizer("circle", add_special_tokens=False)["input_ids"][0]
    sample = _sample([("user", QUESTION), ("assistant", "3")])
    for bad in (ordinary, len(tokenizer) + 5):
        with pytest.raises(AlignError, match=f"image token id {bad} is not a special token"):
            encode_sft(sample, tokenizer, bad, 4)


@pytest.fixture(scope="module")
def long_row(zoo: Path):
    tokenizer, image_id = _tokenizer(zoo, "qwen2-r1")
    sample = _sample(
        [("user", "<image> and <image>: which is larger?"), ("assistant", f"{REASONING}</think>2")], 2
    )
    return encode_sft(sample, tokenizer, image_id, 8), image_id


def test_fit_length_keeps_prompt_and_images_and_cuts_only_the_target(long_row) -> None:
    encoded, image_id = long_row
    target = len(encoded) - encoded.prompt_length
    assert encoded.n_image_tokens == 16 and target > 10
    for max_length in range(1, len(encoded) + 3):
        fitted = fit_length(encoded, max_length, "drop")
        if max_length <= encoded.prompt_length:
            assert fitted is None
            continue
        assert fitted is not None and len(fitted) == min(max_length, len(encoded))
        assert fitted.input_ids == encoded.input_ids[: len(fitted)]
        assert fitted.labels == encoded.labels[: len(fitted)]
        assert fitted.input_ids.count(image_id) == 16 and fitted.prompt_length == encoded.prompt_length
        assert fitted.truncated == len(encoded) - len(fitted)


@pytest.mark.parametrize(
    "extra,policy,outcome",
    [
        (+5, "error", "kept"),
        (0, "error", "kept"),
        (-3, "error", "error"),  # overlong: error stops on any row over max_length, never cuts its target
        (-3, "drop", "truncated"),
        ("prompt", "drop", "dropped"),
        ("prompt", "error", "error"),
        ("prompt-1", "drop", "dropped"),
    ],
)
def test_fit_policy_and_counts(long_row, extra, policy: str, outcome: str) -> None:
    encoded, _ = long_row
    if extra == "prompt":
        max_length = encoded.prompt_length
    elif extra == "prompt-1":
        max_length = encoded.prompt_length - 1
    else:
        max_length = len(encoded) + extra
    if outcome == "error":
        numbers = f"{len(encoded)} tokens > max_length {max_length} \\(overlong: error\\): the prompt is {encoded.prompt_length} tokens \\(16 of them for 2 image\\(s\\)\\)"
        with pytest.raises(AlignError, match=f"rows.jsonl:7: {numbers}"):
            fit_all([encoded], max_length, policy)
        return
    kept, report = fit_all([encoded, encoded], max_length, policy)
    expected = {"kept": (2, 0, 0), "truncated": (2, 2, 0), "dropped": (0, 0, 2)}[outcome]
    assert (report.kept, report.truncated, report.dropped) == expected
    assert report.cut_tokens == (2 * (len(encoded) - max_length) if outcome == "truncated" else 0)
    assert report.dropped_origins == (["rows.jsonl:7"] * 2 if outcome == "dropped" else [])
    assert f"dropped {expected[2]}" in str(report)
    assert len(kept) == expected[0]


def test_fit_length_rejects_unknown_policy(long_row) -> None:
    with pytest.raises(ValueError, match="policy must be"):
        fit_length(long_row[0], 10, "truncate")


def test_text_spelling_the_image_token_is_an_error(zoo: Path) -> None:
    tokenizer, _ = _tokenizer(zoo, "llama-r1")
    tokenizer.add_tokens(["<|image_pad|>"], special_tokens=True)
    pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    sample = _sample([("user", "<image> looks like <|image_pad|>"), ("assistant", "ok")])
    with pytest.raises(
        AlignError, match=r"rows.jsonl:7: 8 image tokens after tokenisation, expected 4 \(1 image"
    ):
        encode_sft(sample, tokenizer, pad_id, 4)


def test_generation_prefill_is_what_the_template_opens_with(r1, chatml) -> None:
    from align.data.encode import generation_prefill

    assert generation_prefill(r1[0]) == "<think>\n"
    assert generation_prefill(chatml[0]) == ""


def test_eos_token_ids_merge_tokenizer_and_generation_config(r1) -> None:
    from types import SimpleNamespace

    from align.checkpoint import eos_token_ids

    tokenizer = r1[0]
    eos = tokenizer.eos_token_id
    assert eos_token_ids(tokenizer, SimpleNamespace(eos_token_id=None)) == [eos]
    assert eos_token_ids(tokenizer, SimpleNamespace(eos_token_id=[eos, 7])) == sorted({eos, 7})
    assert eos_token_ids(SimpleNamespace(eos_token_id=None), SimpleNamespace(eos_token_id=5)) == [5]
