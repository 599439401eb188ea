"""Tiny, locally trained stand-ins for the DeepSeek-R1-Distill tokenizers (part of the offline zoo).

This module owns the tokenizers of the zoo's ``qwen2-r1`` and ``llama-r1`` language models: a byte-level BPE
trained here, in code, on a small generated corpus of the words the synthetic visual tasks use (shapes,
colours, counting, positions, step-by-step reasoning, LaTeX-ish maths), so typical task text tokenizes
compactly and, being byte-level, any text still encodes. What is real about them:

* the DeepSeek-R1-Distill chat template, read from ``align/templates/deepseek_r1_distill_chat_template.jinja``;
* the special tokens: bos ``<｜begin▁of▁sentence｜>``, eos ``<｜end▁of▁sentence｜>``, ``<｜User｜>``,
  ``<｜Assistant｜>``; pad ``<｜▁pad▁｜>`` on the Qwen flavour only (the Llama distill has no pad token);
* ``<think>``/``</think>`` (and the template's tool-call markers) are ordinary added tokens, so they survive
  ``decode(skip_special_tokens=True)``;
* encoding adds bos, like the real ones (``add_bos_token``; transformers 5 keeps this in ``tokenizer.json``'s
  post-processor and reports ``add_bos_token`` False after loading); the chat template writes bos itself and
  ``apply_chat_template`` tokenizes with ``add_special_tokens=False``, so a rendered chat has one bos;
* a ``qwen2`` folder loads through ``AutoTokenizer`` as ``Qwen2Tokenizer`` (transformers 5 forces that class
  for the model type), which rebuilds the same NFC + split + byte-level pipeline; ``unk_token`` is saved as
  null so it does not add ``<|endoftext|>``;
* the pre-tokenizer split regexes: Qwen2 splits numbers into single digits, Llama-3 into runs of up to 3.

Only tests, the demo and ``align zoo`` use this (through :mod:`align.zoo`). Build one with
``build_r1_tokenizer("qwen2")``.
"""

from __future__ import annotations

import random
from importlib import resources
from typing import Literal

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

Flavour = Literal["qwen2", "llama"]

VOCAB_SIZE = 1024  # including the added tokens below
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
PAD = "<｜▁pad▁｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# Markers the chat template writes for tool calls; added (not special) so they stay single tokens.
TOOL_MARKERS = (
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    "<｜tool▁sep｜>",
)
# The pre-tokenizer regexes of the real Qwen2 and Llama-3 tokenizers (they differ in how digits group).
SPLIT_PATTERNS: dict[str, str] = {
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "llama": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}
MODEL_MAX_LENGTH = 16384

SHAPES = (
    "circle square triangle rectangle star hexagon pentagon diamond oval dot line arrow cross heart cell grid"
)
COLOURS = "red green blue yellow purple orange black white gray grey pink brown cyan"
POSITIONS = (
    "left right above below top bottom middle center centre next between inside outside corner row column"
)
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
)
WORDS = (
    "how many there are is the a an of in on at to and or not no yes what which where who count total number "
    "answer think let me first then so therefore because wait check again sum difference more less than equal "
    "image picture shows see look shape shapes colour color size largest smallest biggest biggest each every "
    "all only object objects same different other question solution step final result correct compare add "
    "subtract multiply divide half third quarter times plus minus equals area side sides corners angle "
    "hmm okay now next also this that these those it its with from by for as be was were has have can do "
    "does I we you so need find give my our small large big tiny medium long short wide tall empty full "
    "photo scene background foreground contains containing filled outlined striped dotted solid colored "
    "coloured bright dark light touching overlapping near far closest farthest highest lowest first second "
    "third fourth last horizontal vertical diagonal clockwise counterclockwise rotate rotated mirror "
    "reflect pattern sequence missing odd even double triple remaining altogether together separate group "
    "groups pair pairs rows columns units length width height perimeter radius diameter circumference "
    "probability fraction percent ratio value values calculate compute determine verify recount carefully "
    "actually hold correct incorrect mistake sure certain maybe perhaps seems looks appears notice described "
    "question asks asking user assistant reasoning conclusion hence thus since means gives makes"
)
MATH = (
    r"\frac{1}{2}",
    r"\frac{3}{4}",
    r"\frac{a}{b}",
    r"\boxed{",
    r"\times",
    r"\div",
    r"\cdot",
    r"\sqrt{",
    r"\pi",
    r"\leq",
    r"\geq",
    r"\neq",
    "x^2",
    "2^3",
    "(a+b)",
    "$",
    "$$",
    "=",
    "+",
    "-",
    "*",
    "/",
    "<",
    ">",
)
PUNCTUATION = (".", ",", "?", "!", ":", ";", "(", ")", "'", '"', "\n", "\n\n")


def chat_template() -> str:
    """The real DeepSeek-R1-Distill chat template shipped in ``align/templates``."""
    return (resources.files("align") / "templates" / "deepseek_r1_distill_chat_template.jinja").read_text(
        encoding="utf-8"
    )


def training_corpus(seed: int = 0, n_lines: int = 4000) -> list[str]:
    """Deterministic lines of task-like text: questions, reasoning steps, captions, maths and answers.

    Numbers stay mostly small (counts, simple sums) so that digit groups do not crowd words out of the
    vocabulary; every vocabulary word appears both sentence-initially and after a space.
    """
    rng = random.Random(seed)
    shapes, colours, positions = SHAPES.split(), COLOURS.split(), POSITIONS.split()
    numbers, words = NUMBER_WORDS.split(), WORDS.split()
    vocabulary = shapes + colours + positions + numbers + words

    def n(high: int = 20) -> int:
        return rng.randint(0, high)

    def thing() -> str:
        return f"{rng.choice(colours)} {rng.choice(shapes)}{rng.choice(('', 's'))}"

    def words_line() -> str:
        line = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(4, 12)))
        return line[0].upper() + line[1:] + rng.choice(PUNCTUATION)

    templates = (
        lambda: f"How many {thing()} are there in the image?",
        lambda: f"What colour is the {rng.choice(shapes)} {rng.choice(positions)} the {rng.choice(shapes)}?",
        lambda: f"Okay, so I need to find how many {thing()} there are. Let me look at the image carefully.",
        lambda: f"I see a {thing()} at the {rng.choice(positions)}. Next to it there is a {thing()}.",
        lambda: f"Let me count: {', '.join(str(n()) for _ in range(rng.randint(2, 6)))}.",
        lambda: f"So there are {n()} {thing()} in total. Therefore, the answer is {n()}.",
        lambda: (
            f"Wait, let me check again. There are {rng.choice(numbers)} {thing()}, not {rng.choice(numbers)}."
        ),
        lambda: f"The answer is \\boxed{{{n()}}}.",
        lambda: f"{n()} + {n()} = {n(40)}, and {n()} - {n()} = {n()}. Hmm, {n()} \\times {n(9)} = {n(99)}.",
        lambda: f"$\\frac{{{n(9)}}}{{{n(9)}}} + {rng.choice(MATH)} {n(9)}$",
        lambda: f"The {thing()} is {rng.choice(positions)} the {thing()}.",
        lambda: f"A {thing()} {rng.choice(positions)} a {thing()} on a {rng.choice(colours)} background.",
        words_line,
    )
    lines = [" ".join(vocabulary), " ".join(MATH)]
    lines += [rng.choice(templates)() for _ in range(n_lines)]
    return lines


def _backend(flavour: Flavour, corpus: list[str]) -> Tokenizer:
    """Train the byte-level BPE (vocabulary only; added tokens come after, as in the real tokenizers)."""
    tokenizer = Tokenizer(models.BPE())
    if flavour == "qwen2":  # Qwen2's tokenizer normalises to NFC; Llama-3's has no normalizer
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERNS[flavour]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    n_added = len(_added_tokens(flavour))
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - n_added,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def _added_tokens(flavour: Flavour) -> list[AddedToken]:
    specials = [BOS, EOS, USER, ASSISTANT] + ([PAD] if flavour == "qwen2" else [])
    ordinary = [THINK_OPEN, THINK_CLOSE, *TOOL_MARKERS]
    return [AddedToken(t, special=True, normalized=False) for t in specials] + [
        AddedToken(t, special=False, normalized=False) for t in ordinary
    ]


def build_r1_tokenizer(flavour: Flavour, seed: int = 0) -> PreTrainedTokenizerFast:
    """A :data:`VOCAB_SIZE`-token R1-distill-style tokenizer; identical for identical ``(flavour, seed)``."""
    backend = _backend(flavour, training_corpus(seed))
    backend.add_tokens(_added_tokens(flavour))
    if backend.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(
            f"zoo tokenizer {flavour}: trained {backend.get_vocab_size()} tokens, expected {VOCAB_SIZE}; "
            "the generated corpus is too small for the vocabulary"
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD if flavour == "qwen2" else None,
        unk_token=None,  # byte-level BPE has no unknowns; also stops Qwen2Tokenizer adding "<|endoftext|>"
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chat_template()
    return tokenizer
