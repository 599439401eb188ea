"""Tokenisation, labels and the truncation policy: one :class:`~align.data.sample.Sample` -> :class:`Encoded`.

This module owns how a conversation becomes ``input_ids`` and ``labels`` for training (:func:`encode_sft`), for
generation (:func:`encode_prompt`), how long a row is (:func:`encoded_length`, used by ``align data check``) and
what happens to rows longer than ``max_length`` (:func:`fit_length`, :func:`fit_all`).

The rule: the tokens the model is trained on are the tokens it sees at inference.

* The prompt is the tokenizer's own chat template, ``apply_chat_template(history, add_generation_prompt=True)``,
  tokenised as one string exactly as inference does; the final assistant target is appended as written and
  tokenised on its own, as generated tokens are.
* Templates that prefill the generation prompt (DeepSeek-R1-Distill ends it with ``<｜Assistant｜><think>\\n``)
  are handled: a target that starts with the prefill (``<think>\\n...``) does not repeat it, so the supervised
  span is ``reasoning</think>answer`` + end-of-turn. A target written without ``</think>`` is trained as written
  after the prefill (captions become the "reasoning"); rows that should skip thinking must say so explicitly
  (e.g. ``"\\n</think>\\n\\nA cat."``).
* The end-of-turn the template writes after an assistant message (``<｜end▁of▁sentence｜>`` for R1,
  ``<|im_end|>`` for ChatML) is found by rendering a marker message, and is supervised: the model must emit it
  to stop. Whitespace the template adds after it (ChatML's ``\\n``) is never generated, so it is not appended.
* Multi-turn rows (LLaVA-665K style): every assistant turn is supervised. Earlier turns appear as the template
  renders history, i.e. what the model sees in a real multi-turn chat; for R1 that means earlier turns lose
  their reasoning (the template strips everything up to ``</think>``). Only the final turn keeps it.
* Labels are ``-100`` on system, user and template text, on image tokens and on the prefill.
* Each ``<image>`` becomes ``image_seq_len`` copies of ``image_token_id`` (the caller reads ``image_seq_len``
  from the model folder's processor). The image token must be a single special token of the tokenizer, as the
  Llava processor expands it. Images belong in user turns; placeholders in assistant turns are an error.

Truncation (:func:`fit_length`) never cuts an image span or the prompt. With ``policy="error"`` any row longer
than ``max_length`` is an error naming it. With ``policy="drop"`` a row whose prompt and images leave no room for
a single target token is dropped, and a row that only overflows in its final target keeps the start of the
target, as TRL's ``SFTTrainer`` (``keep_start``) and LLaVA do; labels are cut with the ids and the row is counted
as truncated in :class:`FitReport`.

Try it::

    HF_HUB_OFFLINE=1 .venv/bin/pytest -q tests/test_encode.py
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from align.data.sample import IMAGE_PLACEHOLDER, Sample
from align.errors import AlignError

IGNORE_INDEX = -100
# Private-use characters: no dataset contains them and no template rewrites them, so the rendered position of
# this marker tells where a template puts an assistant message's content.
_MARKER = "\ue000align-assistant-content\ue001"


@dataclass(frozen=True)
class Encoded:
    """One tokenised row. ``labels[i]`` is the id the model must produce at position ``i`` (or -100)."""

    input_ids: list[int]
    labels: list[int]
    n_images: int
    origin: str
    prompt_length: int  # tokens up to the final target: never truncated
    n_image_tokens: int  # n_images * image_seq_len, all inside the prompt
    images: list[Any] = field(default_factory=list)  # the sample's images, in the order of their token spans
    truncated: int = 0  # target tokens removed by fit_length

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_labels(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, origin: str) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # jinja raises whatever the template author chose (often role-order checks)
        raise AlignError(f"{origin}: the tokenizer's chat template failed on this row: {err}") from err


def _assistant_frame(tokenizer: Any, history: list[dict[str, str]], origin: str) -> tuple[str, str]:
    """``(opening, end)``: what the template writes before and after an assistant message following ``history``."""
    rendered = _render(tokenizer, [*history, {"role": "assistant", "content": _MARKER}], False, origin)
    if rendered.count(_MARKER) != 1:
        raise AlignError(
            f"{origin}: the chat template does not render an assistant message's content verbatim "
            f"(marker found {rendered.count(_MARKER)} times); cannot locate the assistant turn"
        )
    opening, end = rendered.split(_MARKER)
    return opening, end


def _check_images(sample: Sample, messages: list[dict[str, str]]) -> None:
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and IMAGE_PLACEHOLDER in message["content"]:
            raise AlignError(
                f"{sample.origin}: message {i} (assistant) contains {IMAGE_PLACEHOLDER}; "
                "images belong in user or system turns"
            )
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if placeholders != len(sample.images):
        raise AlignError(
            f"{sample.origin}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(sample.images)} image(s)"
        )


def _image_token(tokenizer: Any, image_token_id: int) -> str:
    """The image token's string; it must be a special added token so that text around it never merges with it."""
    added = tokenizer.added_tokens_decoder.get(image_token_id)
    if added is None or not added.special:
        raise AlignError(
            f"image token id {image_token_id} is not a special token of this tokenizer "
            f"({len(tokenizer)} tokens); add it as one (the model folder's processor names it)"
        )
    return added.content


def _tokenize_prompt(
    tokenizer: Any, text: str, image_token: str, image_token_id: int, image_seq_len: int
) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character spans of ``text`` tokenised as one string, each image token expanded in place.

    The Llava processor does the same: it writes the image token string per image and tokenises the whole text,
    then repeats each image token ``image_seq_len`` times.
    """
    # verbose=False: no "longer than the specified maximum" warning; align measures every row against
    # data.max_length itself and drops or refuses the long ones, naming them
    enc = tokenizer(
        text.replace(IMAGE_PLACEHOLDER, image_token),
        add_special_tokens=False,
        return_offsets_mapping=True,
        verbose=False,
    )
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for token_id, span in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        copies = image_seq_len if token_id == image_token_id else 1
        ids.extend([token_id] * copies)
        spans.extend([tuple(span)] * copies)
    return ids, spans


def _history_label_ranges(
    tokenizer: Any, messages: list[dict[str, str]], prompt: str, origin: str
) -> list[tuple[int, int]]:
    """Character ranges of ``prompt`` holding the earlier assistant turns as the template renders them."""
    ranges = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        opening, end = _assistant_frame(tokenizer, messages[:i], origin)
        through = _render(tokenizer, messages[: i + 1], False, origin)
        if not (through.startswith(opening) and through.endswith(end) and prompt.startswith(through)):
            raise AlignError(
                f"{origin}: the chat template renders assistant turn {i} inconsistently with the rest of the "
                "conversation (history is not a prefix of the next prompt); cannot label it"
            )
        ranges.append((len(opening), len(through) - len(end) + len(end.rstrip())))
    return ranges


def _strip_prefill(target: str, prefill: str) -> str:
    """The target without the text the generation prompt already prefilled (R1: ``<think>\\n``)."""
    if not prefill:
        return target
    if target.startswith(prefill):
        return target[len(prefill) :]
    tag = prefill.strip()
    # "<think>reasoning" or "\n<think>\n\nreasoning": the tag is written with other whitespace around it.
    if tag and target.lstrip().startswith(tag):
        return target.lstrip()[len(tag) :].lstrip()
    return target


def _prompt_parts(tokenizer: Any, history: list[dict[str, str]], origin: str) -> tuple[str, str, str]:
    """``(prompt, prefill, end)`` for the assistant turn that follows ``history``."""
    opening, end = _assistant_frame(tokenizer, history, origin)
    prompt = _render(tokenizer, history, True, origin)
    if not prompt.startswith(opening):
        raise AlignError(
            f"{origin}: the chat template's generation prompt ({prompt[-40:]!r}) does not start the way it renders "
            f"an assistant turn ({opening[-40:]!r}); training would not match inference"
        )
    return prompt, prompt[len(opening) :], end


def generation_prefill(tokenizer: Any) -> str:
    """What the chat template writes after the assistant opening of a generation prompt (R1: ``<think>\n``).

    Generated text continues it, so rewards and displays put it back in front of a completion.
    """
    return _prompt_parts(tokenizer, [{"role": "user", "content": "x"}], "chat template probe")[1]


def encode_sft(sample: Sample, tokenizer: Any, image_token_id: int, image_seq_len: int) -> Encoded:
    """Ids and labels of a conversation whose last message is the assistant target (see the module docstring)."""
    messages = sample.messages
    if not messages or messages[-1]["role"] != "assistant":
        last = messages[-1]["role"] if messages else "none"
        raise AlignError(
            f"{sample.origin}: an SFT row must end with an assistant message (last role: {last})"
        )
    _check_images(sample, messages)
    image_token = _image_token(tokenizer, image_token_id)
    history = messages[:-1]
    prompt, prefill, end = _prompt_parts(tokenizer, history, sample.origin)
    ranges = _history_label_ranges(tokenizer, history, prompt, sample.origin)

    prompt_ids, spans = _tokenize_prompt(tokenizer, prompt, image_token, image_token_id, image_seq_len)
    labels = [
        token_id if token_id != image_token_id and any(a <= s and e <= b for a, b in ranges) else IGNORE_INDEX
        for token_id, (s, e) in zip(prompt_ids, spans, strict=True)
    ]
    target = _strip_prefill(messages[-1]["content"], prefill) + end.rstrip()
    target_ids = tokenizer(target, add_special_tokens=False, verbose=False)["input_ids"]
    return _finish(
        sample, prompt_ids + target_ids, labels + target_ids, len(prompt_ids), image_token_id, image_seq_len
    )


def raw_prefill(prompt_template: str) -> str:
    """The prefill of a raw prompt template: from its last ``<think>`` when the template ends with it
    (VisualThinker-R1-Zero's ``...Assistant: Let me solve this step by step.\n<think>``), else nothing."""
    _, tag, tail = prompt_template.rpartition("<think>")
    return tag + tail if tag and not tail.strip() else ""


def prompt_template_problem(prompt_template: str) -> str | None:
    """What is wrong with a raw prompt template (``grpo.prompt_template``, ``--prompt-template``), or None."""
    if prompt_template.count("{question}") == 1:
        return None
    return f"must hold {{question}} exactly once, got {prompt_template!r:.80}"


def prompt_prefill(tokenizer: Any, prompt_template: str | None) -> str:
    """What a generation prompt opens the completion with: the raw template's (:func:`raw_prefill`), else the
    chat template's (:func:`generation_prefill`); rewards see it put back in front of each completion."""
    return raw_prefill(prompt_template) if prompt_template is not None else generation_prefill(tokenizer)


def _raw_prompt(tokenizer: Any, history: list[dict[str, str]], prompt_template: str, origin: str) -> str:
    """A base model's prompt: the template with the row's one user turn as ``{question}``, after the BOS the
    tokenizer would add; no chat template."""
    roles = [m["role"] for m in history]
    if roles != ["user"]:
        raise AlignError(
            f"{origin}: grpo.prompt_template takes rows of one user turn (the question), got turns {roles}"
        )
    return (tokenizer.bos_token or "") + prompt_template.replace("{question}", history[0]["content"])


def encode_prompt(
    sample: Sample,
    tokenizer: Any,
    image_token_id: int,
    image_seq_len: int,
    prompt_template: str | None = None,
) -> Encoded:
    """The generation prompt only (GRPO rollouts, evaluation); a trailing assistant message is left out.

    ``prompt_template``: a raw prompt for base models (``{question}`` is the user turn) instead of the chat
    template."""
    messages = sample.messages
    history = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    _check_images(sample, history)
    image_token = _image_token(tokenizer, image_token_id)
    if prompt_template is not None:
        prompt = _raw_prompt(tokenizer, history, prompt_template, sample.origin)
    else:
        prompt = _render(tokenizer, history, True, sample.origin)
    ids, _ = _tokenize_prompt(tokenizer, prompt, image_token, image_token_id, image_seq_len)
    return _finish(sample, ids, [IGNORE_INDEX] * len(ids), len(ids), image_token_id, image_seq_len)


def _finish(
    sample: Sample,
    ids: list[int],
    labels: list[int],
    prompt_length: int,
    image_token_id: int,
    image_seq_len: int,
) -> Encoded:
    n_image_tokens = len(sample.images) * image_seq_len
    found = ids.count(image_token_id)
    if found != n_image_tokens:
        # The text itself spells the image token (e.g. a literal "<image>" written differently) or a template
        # dropped a message: the model would fill the wrong positions with image features.
        raise AlignError(
            f"{sample.origin}: {found} image tokens after tokenisation, expected {n_image_tokens} "
            f"({len(sample.images)} image(s) x {image_seq_len})"
        )
    return Encoded(
        input_ids=ids,
        labels=labels,
        n_images=len(sample.images),
        origin=sample.origin,
        prompt_length=prompt_length,
        n_image_tokens=n_image_tokens,
        images=list(sample.images),
    )


def encoded_length(sample: Sample, tokenizer: Any, image_token_id: int, image_seq_len: int) -> int:
    """Tokens of the training row (rows ending with an assistant message) or of the generation prompt."""
    if sample.messages and sample.messages[-1]["role"] == "assistant":
        return len(encode_sft(sample, tokenizer, image_token_id, image_seq_len))
    return len(encode_prompt(sample, tokenizer, image_token_id, image_seq_len))


def fit_length(encoded: Encoded, max_length: int, policy: Literal["drop", "error"]) -> Encoded | None:
    """``encoded`` if it fits. Longer: ``"error"`` raises AlignError naming the row; ``"drop"`` gives ``None``
    when the prompt cannot fit, else the row with its target cut to fit."""
    if policy not in ("drop", "error"):
        raise ValueError(f"policy must be 'drop' or 'error', got {policy!r}")
    if len(encoded) <= max_length:
        return encoded
    if policy == "error":  # the user asked for every row whole: cutting the target would train on less
        raise AlignError(
            f"{encoded.origin}: {len(encoded)} tokens > max_length {max_length} (overlong: error): the prompt is "
            f"{encoded.prompt_length} tokens ({encoded.n_image_tokens} of them for {encoded.n_images} image(s)) + "
            f"{len(encoded) - encoded.prompt_length} target tokens; raise max_length or set overlong: drop"
        )
    if encoded.prompt_length >= max_length:  # not even one target token would remain
        return None
    return dataclasses.replace(
        encoded,
        input_ids=encoded.input_ids[:max_length],
        labels=encoded.labels[:max_length],
        truncated=encoded.truncated + len(encoded) - max_length,
    )


@dataclass
class FitReport:
    """What :func:`fit_all` did, for the stage's start-up summary."""

    max_length: int
    kept: int = 0  # rows returned, truncated ones included
    truncated: int = 0  # rows whose target was cut
    cut_tokens: int = 0  # target tokens removed in total
    dropped: int = 0  # rows whose prompt + images alone exceed max_length
    dropped_origins: list[str] = field(default_factory=list)  # the first few, to look at

    def __str__(self) -> str:
        text = (
            f"max_length {self.max_length}: kept {self.kept} rows, truncated the target of {self.truncated} "
            f"({self.cut_tokens} tokens), dropped {self.dropped}"
        )
        if self.dropped_origins:
            text += f" (e.g. {', '.join(self.dropped_origins)})"
        return text


def fit_all(
    items: Iterable[Encoded], max_length: int, policy: Literal["drop", "error"], examples: int = 3
) -> tuple[list[Encoded], FitReport]:
    """:func:`fit_length` over ``items``, with the counts a stage reports."""
    report = FitReport(max_length=max_length)
    kept = []
    for item in items:
        fitted = fit_length(item, max_length, policy)
        if fitted is None:
            report.dropped += 1
            if len(report.dropped_origins) < examples:
                report.dropped_origins.append(item.origin)
            continue
        if fitted.truncated > item.truncated:
            report.truncated += 1
            report.cut_tokens += fitted.truncated - item.truncated
        kept.append(fitted)
    report.kept = len(kept)
    return kept, report


def labelled_spans(encoded: Encoded) -> list[list[int]]:
    """The runs of consecutive supervised ids, e.g. one per assistant turn (for tests and ``align data check``)."""
    runs: list[list[int]] = []
    previous = False
    for label in encoded.labels:
        if label != IGNORE_INDEX:
            if not previous:
                runs.append([])
            runs[-1].append(label)
        previous = label != IGNORE_INDEX
    return runs
