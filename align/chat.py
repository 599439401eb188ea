"""``align chat MODEL [--image PATH] [PROMPT]``: talk to a model folder, streaming reasoning and answer apart.

This module owns the chat loop: the prompt is the model's own chat template (R1 distills prefill ``<think>\\n``,
so the first streamed text is already reasoning; earlier turns' reasoning is stripped by the template itself),
generation runs in a thread feeding a ``TextIteratorStreamer``, and :class:`ReasoningSplitter` cuts the stream
into reasoning and answer as it arrives. On a terminal the reasoning is dim (rich); in a pipe it is prefixed
``thinking: `` and the answer ``answer: ``. Status messages go to stderr, replies to stdout.

One-shot when PROMPT is given; otherwise interactive, one message per stdin line, with ``/image PATH`` (attach
an image to the next message), ``/reset`` (forget the conversation) and ``/exit``. Ctrl-C stops a reply.

Run: ``align chat checkpoints/tiny/sft --image cat.png "What is on the mat?" --temperature 0``.
"""

from __future__ import annotations

import copy
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import torch

from align.data.encode import generation_prefill
from align.errors import AlignError
from align.rewards.extract import THINK_CLOSE, THINK_OPEN

REASONING, ANSWER = "reasoning", "answer"
LABELS = {REASONING: "thinking: ", ANSWER: "answer: "}  # plain-text markers of the two parts of a reply
HELP = "commands: /image PATH (attach to the next message), /reset (new conversation), /exit"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``tag`` (a tag split across chunks)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningSplitter:
    """Streamed text in, ``(REASONING | ANSWER, text)`` segments out, as early as the tags allow.

    ``prefilled``: the prompt already opened ``<think>``, so the text starts as reasoning. Otherwise a
    ``<think>`` at the very start (after whitespace) opens reasoning, and any other start is the answer.
    The first ``</think>`` closes the reasoning; everything after it is answer, tags included.
    """

    def __init__(self, prefilled: bool):
        self.state = REASONING if prefilled else "start"
        self.pending = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.pending += text
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":
                head = self.pending.lstrip()
                if head.startswith(THINK_OPEN):
                    self.pending, self.state = head[len(THINK_OPEN) :], REASONING
                elif THINK_OPEN.startswith(head):  # whitespace or a partial "<thi": wait for more
                    return out
                else:
                    self.state = ANSWER
            elif self.state == REASONING:
                end = self.pending.find(THINK_CLOSE)
                if end >= 0:
                    out.append((REASONING, self.pending[:end]))
                    self.pending, self.state = self.pending[end + len(THINK_CLOSE) :], ANSWER
                    continue
                keep = _partial_suffix(self.pending, THINK_CLOSE)
                cut = len(self.pending) - keep
                out.append((REASONING, self.pending[:cut]))
                self.pending = self.pending[cut:]
                return [s for s in out if s[1]]
            else:
                out.append((ANSWER, self.pending))
                self.pending = ""
                return [s for s in out if s[1]]

    def flush(self) -> list[tuple[str, str]]:
        """What is still held back at the end of the stream (a partial tag is just text then)."""
        kind = REASONING if self.state == REASONING else ANSWER
        text, self.pending = self.pending, ""
        return [(kind, text)] if text else []


def split_reasoning(text: str, prefilled: bool) -> tuple[str, str]:
    """``(reasoning, answer)`` of a whole reply, stripped; an unclosed think block is all reasoning."""
    splitter = ReasoningSplitter(prefilled)
    parts = {REASONING: "", ANSWER: ""}
    for kind, chunk in [*splitter.feed(text), *splitter.flush()]:
        parts[kind] += chunk
    return parts[REASONING].strip(), parts[ANSWER].strip()


class PlainDisplay:
    """Pipes and logs: ``thinking: `` before the reasoning, ``answer: `` before the answer, one reply per block."""

    def __init__(self, out: TextIO, show_reasoning: bool):
        self.out = out
        self.show_reasoning = show_reasoning
        self.current: str | None = None

    def write(self, kind: str, text: str) -> None:
        if kind == REASONING and not self.show_reasoning:
            return
        if kind != self.current:
            if kind == ANSWER:
                text = text.lstrip()  # the "\n\n" R1 writes after </think> is not part of the answer
                if not text:
                    return
            self.out.write(("\n" if self.current else "") + LABELS[kind])
            self.current = kind
        self.out.write(text)
        self.out.flush()

    def end(self, cut_off: bool) -> None:
        self.out.write("\n")
        self.out.flush()
        if cut_off:  # stderr: stdout stays the reply alone
            print("(reasoning cut off: raise --max-new-tokens)", file=sys.stderr)
        self.current = None


class RichDisplay(PlainDisplay):
    """Terminals: reasoning dim and italic (or a spinner with --no-think-display), the answer plain."""

    def __init__(self, out: TextIO, show_reasoning: bool):
        from rich.console import Console

        super().__init__(out, show_reasoning)
        self.console = Console(file=out, highlight=False, soft_wrap=True)
        self.status = None

    def write(self, kind: str, text: str) -> None:
        if kind == REASONING and not self.show_reasoning:
            if self.status is None:
                self.status = self.console.status("thinking…")
                self.status.start()
            return
        self._stop_status()
        if kind == ANSWER and self.current != ANSWER:
            text = text.lstrip()
            if not text:
                return
            if self.current == REASONING:
                self.console.print()
        self.current = kind
        self.console.print(text, style="dim italic" if kind == REASONING else "", end="", markup=False)

    def _stop_status(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def end(self, cut_off: bool) -> None:
        self._stop_status()
        if cut_off:
            self.console.print("\n(reasoning cut off: raise --max-new-tokens)", style="yellow", end="")
        self.console.print()
        self.current = None


class _StopFlag:
    """A stopping criterion the main thread can trip (Ctrl-C) while generate runs in its thread."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


def stream_generate(model, tokenizer, inputs: dict, generation_config) -> Iterator[str]:
    """Decoded text chunks of one greedy/sampled generation, as they are produced (generate runs in a thread)."""
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop = _StopFlag()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            model.generate(
                **inputs,
                generation_config=generation_config,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([stop]),
            )
        except BaseException as err:  # re-raised in the caller's thread; end() unblocks its iterator
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield from streamer
    finally:
        stop.event.set()  # no-op when generation is over; stops it at the next token after Ctrl-C
        thread.join()
    if errors:
        raise errors[0]


def generation_settings(base, max_new_tokens: int, temperature: float | None):
    """A copy of the model's generation config: ``temperature`` None keeps its sampling, 0 is greedy."""
    config = copy.deepcopy(base)
    config.max_new_tokens = max_new_tokens
    if temperature is None:
        return config
    if temperature < 0:
        raise AlignError(f"--temperature must be >= 0 (0 is greedy), got {temperature}")
    if temperature == 0:
        # Neutral values, not None: generate fills None from the model's own config (R1: 0.6), then warns.
        config.do_sample, config.temperature, config.top_p = False, 1.0, 1.0
    else:
        config.do_sample, config.temperature = True, temperature
    return config


class ChatSession:
    """A conversation with one model: history as chat messages, images in the order of their placeholders."""

    def __init__(self, model, processor, display: PlainDisplay, generation_config):
        self.model = model
        self.processor = processor
        self.display = display
        self.generation_config = generation_config
        self.messages: list[dict[str, str]] = []
        self.images: list[Any] = []
        self.pending_image: Any = None

    def reset(self) -> None:
        self.messages, self.images, self.pending_image = [], [], None

    def attach(self, path: str | Path) -> None:
        from align.data.config import DEFAULT_MAX_IMAGE_PIXELS
        from align.data.images import load_image

        self.pending_image = load_image(path, DEFAULT_MAX_IMAGE_PIXELS)

    def prompt(self, text: str) -> tuple[list[dict[str, str]], list[Any]]:
        """The messages and images of the next turn (the pending image goes before the text, as in training)."""
        images = list(self.images)
        if self.pending_image is not None:
            text = f"{self.processor.image_token}\n{text}"
            images.append(self.pending_image)
        return [*self.messages, {"role": "user", "content": text}], images

    def model_inputs(self, messages: list[dict[str, str]], images: list[Any]) -> dict:
        """The generate inputs of ``messages`` (``input_ids``, ``attention_mask``, ``pixel_values``)."""
        rendered = self.processor.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        # The rendered template already holds the BOS token: the tokenizer must not add another.
        inputs = self.processor(
            text=rendered, images=images or None, return_tensors="pt", add_special_tokens=False
        ).to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def ask(self, text: str) -> str:
        """Stream the reply to ``text``; return its full text (the prefill included) and add the turn to history."""
        messages, images = self.prompt(text)
        inputs = self.model_inputs(messages, images)
        prefill = generation_prefill(self.processor.tokenizer)  # R1: "<think>\n"
        prefilled = THINK_OPEN in prefill
        splitter = ReasoningSplitter(prefilled)
        generated = []
        for chunk in stream_generate(self.model, self.processor.tokenizer, inputs, self.generation_config):
            generated.append(chunk)
            for kind, part in splitter.feed(chunk):
                self.display.write(kind, part)
        for kind, part in splitter.flush():
            self.display.write(kind, part)
        self.display.end(cut_off=splitter.state == REASONING)
        reply = prefill + "".join(generated)
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        self.images, self.pending_image = images, None
        return reply


def interactive(session: ChatSession, lines: TextIO, ask_prompt: bool) -> int:
    """The multi-turn loop over ``lines`` (stdin); returns the exit code."""
    while True:
        if ask_prompt:
            print("you> ", end="", flush=True)
        line = lines.readline()
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        command, _, argument = text.partition(" ")
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            session.reset()
            print("(new conversation)", file=sys.stderr)
        elif command == "/image":
            try:
                session.attach(argument.strip())
            except AlignError as err:
                print(f"error: {err}", file=sys.stderr)
            else:
                print(f"(image {argument.strip()} attached to your next message)", file=sys.stderr)
        elif command.startswith("/"):
            print(f"unknown command {command}; {HELP}", file=sys.stderr)
        else:
            try:
                session.ask(text)
            except KeyboardInterrupt:
                session.display.end(cut_off=False)
                print("(interrupted; that turn is not kept)", file=sys.stderr)


def add_arguments(parser) -> None:
    parser.add_argument("model", help="a model folder or a stage output folder")
    parser.add_argument("prompt", nargs="?", default=None, help="one-shot message; omit for interactive mode")
    parser.add_argument("--image", default=None, help="image attached to the (first) message")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument(
        "--temperature", type=float, default=None, help="0: greedy; default: the model's generation_config"
    )
    parser.add_argument("--no-think-display", action="store_true", help="hide the reasoning, show the answer")
    _parse_intermixed(parser)


def _parse_intermixed(parser) -> None:
    """Let PROMPT come after options (``chat MODEL --image X.png "describe"``).

    Plain argparse matches all positionals in the first run of them, so an optional PROMPT after an option is
    "unrecognized"; ``parse_known_intermixed_args`` handles it. The parent parser calls ``parse_known_args``
    on this sub-parser, so that call is routed there; the intermixed parser calls ``parse_known_args`` itself,
    which must then be the plain one.
    """
    plain = parser.parse_known_args

    def intermixed(args=None, namespace=None):
        parser.parse_known_args = plain
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            parser.parse_known_args = intermixed

    parser.parse_known_args = intermixed


def run(args) -> int:
    from align.checkpoint import load_for_chat, resolve_model_folder

    if args.max_new_tokens < 1:
        raise AlignError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    folder = resolve_model_folder(args.model, expect=None)
    cuda = torch.cuda.is_available()
    model, processor = load_for_chat(folder, dtype=torch.bfloat16 if cuda else torch.float32)
    model = model.to("cuda" if cuda else "cpu").eval()
    settings = generation_settings(model.generation_config, args.max_new_tokens, args.temperature)
    display_class = RichDisplay if sys.stdout.isatty() else PlainDisplay
    session = ChatSession(model, processor, display_class(sys.stdout, not args.no_think_display), settings)
    if args.image is not None:
        session.attach(args.image)
    if args.prompt is not None:
        try:
            session.ask(args.prompt)
        except KeyboardInterrupt:
            session.display.end(cut_off=False)
            return 130  # the shell's code for "ended by Ctrl-C"
        return 0
    print(f"chatting with {folder}; {HELP}", file=sys.stderr)
    return interactive(session, sys.stdin, ask_prompt=sys.stdin.isatty())
