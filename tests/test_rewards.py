"""Rule-based rewards: tables of completions (ordinary, malformed and adversarial) and the scores they get."""

from __future__ import annotations

import math
import signal
import threading
import time

import pytest

from align.errors import AlignError
from align.rewards import (
    R1_PREFILL,
    REWARDS,
    accuracy,
    box_from_model_input,
    box_iou,
    box_to_model_input,
    clip_box,
    extract_answer,
    extract_think,
    format_score,
    gold_kind,
    iou,
    iou_soft,
    length,
    load_reward,
    normalize_text,
    parse_box,
    parse_choice,
    parse_number,
    parse_yesno,
    repetition,
    score_all,
    warm_up,
    with_prefill,
)
from align.rewards.answers import last_number
from align.rewards.mathcheck import math_equal, unsafe_reason

HUGE = 100_000


@pytest.fixture(scope="module", autouse=True)
def _math_verify_loaded() -> None:
    warm_up()  # the one-off grammar load is not what the timing assertions measure


def think_answer(answer: str, think: str = "reasoning") -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


# --------------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>r</think><answer>42</answer>", "42"),
        ("<think>r</think>\n<answer> 42 \n</answer>\n", "42"),
        ("<answer><answer>3</answer></answer>", "3"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("<answer>3", "3"),  # unclosed: to the end
        ("<think>r</think><answer>\\boxed{5}</answer>", "5"),
        ("<think>r</think>\n\nSo it is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{a{b}c}", "a{b}c"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\fbox{7}", "7"),
        ("\\boxed 7", "7"),
        ("\\boxed{unclosed", "\\boxed{unclosed"),  # no closed box: whole text (no tags at all)
        ("<think>tried \\boxed{9}</think> it is 7", "it is 7"),  # boxes inside the reasoning do not count
        ("r</think><answer>x</answer>", "x"),  # prefill not put back: still read after </think>
        ("<think>never closed 5", None),  # reasoning cut off: no answer
        ("<think>never closed <answer>5</answer>", None),
        ("plain 12", "plain 12"),  # no tags at all: the whole text
        ("<think>a</think>", None),
        ("<think>a</think><answer>   </answer>", None),
        ("", None),
        (None, None),
        (12, None),
        ([{"role": "assistant", "content": "<answer>4</answer>"}], "4"),  # TRL conversational completion
        ("<answer>４２ 🙂</answer>", "４２ 🙂"),  # extraction keeps the text; matchers fold it
    ],
)
def test_extract_answer(completion: object, expected: str | None) -> None:
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>abc</think><answer>1</answer>", "abc"),
        ("abc</think><answer>1</answer>", "abc"),
        ("<think>abc", None),
        ("no tags", None),
        ("<think></think>x", ""),
    ],
)
def test_extract_think(completion: str, expected: str | None) -> None:
    assert extract_think(completion) == expected


# ----------------------------------------------------------------------------------------------- format
@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>r</think><answer>a</answer>", 1.0),
        ("  <think>\nr\n</think>\n\n<answer>a</answer>\n", 1.0),
        ("<think></think><answer>a</answer>", 1.0),
        ("<think>r</think><answer>a</answer> extra", 0.0),
        ("<think>r</think>text<answer>a</answer>", 0.0),
        ("preamble <think>r</think><answer>a</answer>", 0.0),
        ("<think>r</think><answer> </answer>", 0.0),
        ("<think>r</think><think>s</think><answer>a</answer>", 0.0),
        ("<think>r</think><answer>a</answer><answer>b</answer>", 0.0),
        ("<think>r</think><answer><answer>a</answer></answer>", 0.0),
        ("<think>r<answer>a</answer></think>", 0.0),
        ("<answer>a</answer><think>r</think>", 0.0),
        ("<think>r</think><answer>a", 0.0),
        ("<think>r<answer>a</answer>", 0.0),
        ("r</think><answer>a</answer>", 0.0),  # the prefilled "<think>" was not put back
        ("", 0.0),
        (None, 0.0),
        ("<think>" + "x" * HUGE + "</think><answer>a</answer>", 1.0),
    ],
)
def test_format_score(completion: object, expected: float) -> None:
    assert format_score(completion) == expected


def test_with_prefill_makes_r1_generations_well_formed() -> None:
    generated = ["reasoning</think>\n<answer>4</answer>", "<think>r</think><answer>4</answer>"]
    prompts = [
        "<｜User｜>q<｜Assistant｜>" + R1_PREFILL,
        "<｜User｜>q<｜Assistant｜>",
    ]  # R1 template / no prefill
    assert [format_score(c) for c in generated] == [0.0, 1.0]
    assert with_prefill(generated, R1_PREFILL, prompts) == ["<think>\n" + generated[0], generated[1]]
    assert [format_score(c) for c in with_prefill(generated, R1_PREFILL, prompts)] == [1.0, 1.0]
    # Without prompts every completion gets it; a model repeating "<think>" then has two and fails.
    assert [format_score(c) for c in with_prefill(generated, R1_PREFILL)] == [1.0, 0.0]
    assert with_prefill(generated, "") == generated
    with pytest.raises(ValueError, match="1 prompts for 2 completions"):
        with_prefill(generated, R1_PREFILL, prompts[:1])


# ------------------------------------------------------------------------------------------- gold shapes
@pytest.mark.parametrize(
    ("gold", "kind"),
    [
        ("B", "choice"),
        ("(C)", "choice"),
        ("D.", "choice"),
        ("[a]", "choice"),
        ("$\\text{B}$", "choice"),
        ("Ｂ", "choice"),
        ("yes", "yesno"),
        ("No.", "yesno"),
        ("True", "yesno"),
        ("3", "number"),
        ("-2.5", "number"),
        ("1,000", "number"),
        ("3/4", "number"),
        ("50%", "number"),
        ("1e-3", "number"),
        ("$12$", "number"),
        ("\\boxed{7}", "number"),
        (7, "number"),
        (0.5, "number"),
        ("\\frac{1}{2}", "math"),
        ("x^2+1", "math"),
        ("\\sqrt{2}", "math"),
        ("2x", "math"),
        ("[1, 2)", "math"),
        ("blue", "text"),
        ("a red car", "text"),
        ("\\text{blue}", "text"),
        ("", None),
        ("   ", None),
        ("$$", None),
        ("...", None),
        (None, None),
        (True, None),
        (float("nan"), None),
        (["B"], None),
    ],
)
def test_gold_kind(gold: object, kind: str | None) -> None:
    assert gold_kind(gold) == kind


# ----------------------------------------------------------------------------------------------- accuracy
ACCURACY_TABLE = [
    # math via math_verify
    (think_answer("\\frac{1}{2}"), "0.5", 1.0),
    (think_answer("0.5"), "\\frac{1}{2}", 1.0),
    (think_answer("1/2"), "$\\frac{1}{2}$", 1.0),
    (think_answer("\\dfrac{3}{4}"), "\\frac34", 1.0),
    (think_answer("\\frac{1}{3}"), "\\frac{1}{2}", 0.0),
    (think_answer("\\sqrt{2}"), "\\sqrt{2}", 1.0),
    (think_answer("2^{1/2}"), "\\sqrt{2}", 1.0),
    (think_answer("1+x^2"), "x^2+1", 1.0),
    (think_answer("x^2-1"), "x^2+1", 0.0),
    (think_answer("The answer is $\\pi$"), "\\pi", 1.0),
    ("<think>r</think>\n\nThus \\boxed{\\frac{3}{4}}", "0.75", 1.0),
    (think_answer("\\boxed{\\frac{3}{4}}"), "3/4", 1.0),
    # numbers
    (think_answer("3"), "3", 1.0),
    (think_answer("3.0"), "3", 1.0),
    (think_answer("3.00001"), "3", 0.0),  # integer golds are exact
    (think_answer("1,000"), "1000", 1.0),
    (think_answer("1000"), "1,000", 1.0),
    (think_answer("1001"), "1000", 0.0),
    (think_answer("3.1416"), "3.14159", 1.0),  # within rel_tol 1e-4
    (think_answer("3.14"), "3.14159", 0.0),
    (think_answer("$-2.5$"), "-2.5", 1.0),
    (think_answer("x = 4"), "4", 1.0),
    (think_answer("There are 4 cats."), "4", 1.0),
    (think_answer("There are four cats."), "4", 1.0),
    (think_answer("3 dogs and 5 cats"), "5", 1.0),  # the last number
    (think_answer("50%"), "50", 1.0),
    (think_answer("0.5"), "50%", 0.0),
    (think_answer("１２"), "12", 1.0),  # full-width digits
    (think_answer("٣"), "3", 1.0),  # Arabic-Indic digit
    (think_answer("🙂 4 🙂"), "4", 1.0),
    (think_answer("−3"), "-3", 1.0),  # U+2212 minus sign
    (think_answer("no idea"), "4", 0.0),
    # letters
    (think_answer("B"), "B", 1.0),
    (think_answer("(B)"), "B", 1.0),
    (think_answer("b"), "(B)", 1.0),
    (think_answer("B. 42 apples"), "B", 1.0),
    (think_answer("**C**"), "C", 1.0),
    (think_answer("The answer is (C)."), "C", 1.0),
    ("the answer is b", "B", 1.0),  # untagged: whole text
    (think_answer("the correct option is d"), "D", 1.0),
    (think_answer("Ｃ"), "C", 1.0),
    (think_answer("A"), "B", 0.0),
    (think_answer("answer: a dog"), "A", 0.0),  # "a" here is an article
    (think_answer("I think so"), "A", 0.0),
    # yes / no
    (think_answer("Yes"), "yes", 1.0),
    (think_answer("yes."), "Yes", 1.0),
    (think_answer("No, there is none."), "no", 1.0),
    (think_answer("It is yes"), "yes", 1.0),
    (think_answer("True"), "yes", 1.0),
    (think_answer("yes and no"), "no", 0.0),
    (think_answer("maybe"), "no", 0.0),
    ("Yes", "yes", 1.0),
    # text
    (think_answer("Blue."), "blue", 1.0),
    (think_answer("the  Red   CAR"), "a red car", 1.0),
    (think_answer("\\text{blue}"), "blue", 1.0),
    (think_answer("green"), "blue", 0.0),
    (think_answer("ＢＬＵＥ"), "blue", 1.0),
    # extraction edge cases
    ("<answer><answer>3</answer></answer>", "3", 1.0),
    ("<answer>3", "3", 1.0),
    ("<think>computing... 3", "3", 0.0),  # reasoning never finished
    ("", "3", 0.0),
    (None, "3", 0.0),
    (think_answer("3", think="the answer is 4"), "3", 1.0),
    # unusable gold: skipped, not 0
    (think_answer("3"), "", None),
    (think_answer("3"), "\\frac{", None),
    (think_answer("3"), "\\sqrt{", None),
    (think_answer("3"), None, None),
    ("", "\\frac{", None),  # the gold is judged even when there is no answer
]


@pytest.mark.parametrize(("completion", "gold", "expected"), ACCURACY_TABLE)
def test_accuracy(completion: object, gold: object, expected: float | None) -> None:
    assert accuracy(completion, gold) == expected


ADVERSARIAL = [
    think_answer("1" * HUGE),
    think_answer("10^{10^{10^{10}}}"),
    think_answer("10^10^10"),
    think_answer("9**9**9"),
    think_answer("2^{99999999}"),
    think_answer("(10^{9})!"),
    think_answer("\\binom{10^{9}}{5}"),
    think_answer("(" * 30 + "1" + ")" * 30),
    think_answer("\\frac{" * 300 + "1" + "}{2}" * 300),
    think_answer("\\boxed{" * 50_000),
    "<answer>" * 20_000 + "9",
    "</answer>" * 20_000,
    "<think>" + "a " * (HUGE // 2) + "</think><answer>" + "4 " * (HUGE // 2) + "</answer>",
    "x" * HUGE,
    "9" * HUGE,
    "(" * HUGE,
    "[1, 2, 5, " * (HUGE // 10),
    "🙂" * HUGE,
    "\u0663" * HUGE,  # Arabic-Indic three
    " " * HUGE + "7",
]


@pytest.mark.parametrize("gold", ["3", "\\frac{1}{2}", "B", "yes", "blue", "1+x"])
@pytest.mark.parametrize("completion", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_answers_score_0_quickly(completion: str, gold: str) -> None:
    started = time.monotonic()
    score = accuracy(completion, gold)
    assert time.monotonic() - started < 2.0
    assert score == 0.0


def test_math_deadline_interrupts_slow_parsing_and_restores_the_callers_alarm() -> None:
    slow = "+".join(f"x_{{{i}}}^{{{i % 9 + 2}}}" for i in range(30))  # passes the guards, parses in ~2 s
    assert unsafe_reason(slow) is None
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    signal.setitimer(signal.ITIMER_REAL, 60.0)
    try:
        started = time.monotonic()
        assert math_equal(slow, "3", timeout=0.3) is False
        assert time.monotonic() - started < 1.0
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 55.0 < remaining <= 60.0  # the caller's alarm is re-armed with what was left
        assert not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_accuracy_works_outside_the_main_thread() -> None:
    results: list = []
    worker = threading.Thread(
        target=lambda: results.extend(accuracy(c, g) for c, g, _ in ACCURACY_TABLE[:12])
    )
    worker.start()
    worker.join(60)
    assert results == [expected for _, _, expected in ACCURACY_TABLE[:12]]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("x^2+1", None),
        ("e^{-x^2}", "a power tower"),
        ("10^{10^{10}}", "a power tower"),
        ("2^3^4", "a power tower"),
        ("2**3**4", "a power tower"),
        ("2^{100000}", "an exponent above 10000"),
        ("2^{10000}", None),
        ("(10^{6})!", "a factorial or binomial of a power or of a number >= 1000"),
        ("5000!", "a factorial or binomial of a power or of a number >= 1000"),
        ("5!", None),
        ("\\binom{2000}{3}", "a factorial or binomial of a power or of a number >= 1000"),
        ("1" * 101, "a number with more than 100 digits"),
        ("1" * 100, None),
        ("x" * 513, "longer than 512 characters"),
        ("(" * 7 + "1" + ")" * 7, "brackets nested deeper than 6"),
        ("(" * 6 + "1" + ")" * 6, None),
    ],
)
def test_unsafe_reason(text: str, reason: str | None) -> None:
    assert unsafe_reason(text) == reason


# -------------------------------------------------------------------------------------- answer matchers
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3", (3, True)),
        ("3.0", (3, False)),
        ("-2.5", (-2.5, False)),
        ("+7", (7, True)),
        (".5", (0.5, False)),
        ("1,000", (1000, True)),
        ("1,000.5", (1000.5, False)),
        ("1e-3", (0.001, False)),
        ("2E3", (2000, False)),
        ("3/4", (0.75, False)),
        ("3 / 4", (0.75, False)),
        ("50%", (50, True)),
        ("50\\%", (50, True)),
        ("$12$", (12, True)),
        ("x = 4", (4, True)),
        ("4.", (4, True)),
        ("1\\,000", (1000, True)),
        ("１２", (12, True)),
        ("1/0", None),
        ("1,00", None),
        ("1e9999", None),
        ("1" * 101, None),
        ("three", None),
        ("3 cats", None),
        ("", None),
    ],
)
def test_parse_number(text: str, expected: tuple | None) -> None:
    parsed = parse_number(text)
    assert (None if parsed is None else (float(parsed[0]), parsed[1])) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("there are 3 cats", 3),
        ("3 dogs, 12 cats", 12),
        ("total: 1,234 items", 1234),
        ("lists 1,2,3", 3),
        ("it is -4 degrees", -4),
        ("x-3", 3),
        ("about 2.5 m", 2.5),
        ("seven", 7),
        ("no numbers", None),
        ("\\frac{1}{2}", None),
        ("1/2", None),
        ("1" * 101, None),
    ],
)
def test_last_number(text: str, expected: float | None) -> None:
    found = last_number(text)
    assert (None if found is None else float(found)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("b", "B"),
        ("(b)", "B"),
        ("[C]", "C"),
        ("D.", "D"),
        ("**A**", "A"),
        ("$B$", "B"),
        ("\\text{C}", "C"),
        ("B) 42", "B"),
        ("(B) forty-two", "B"),
        ("The answer is C", "C"),
        ("the answer is c.", "C"),
        ("Answer: (d)", "D"),
        ("I choose B because it fits", "B"),
        ("option A or option B? The answer is option B", "B"),
        ("answer: a dog", None),
        ("Answer: I think it is unclear", None),
        ("forty-two", None),
        ("", None),
    ],
)
def test_parse_choice(text: str, expected: str | None) -> None:
    assert parse_choice(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("YES!", "yes"),
        ("Yeah, two of them", "yes"),
        ("No", "no"),
        ("nope", "no"),
        ("False", "no"),
        ("Correct.", "yes"),
        ("The answer is no", "no"),
        ("there is no yes", None),
        ("maybe", None),
        ("", None),
        ("是", None),
    ],
)
def test_parse_yesno(text: str, expected: str | None) -> None:
    assert parse_yesno(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Blue Car.", "blue car"),
        ("  a   red\tball ", "red ball"),
        ("U.S.A.", "usa"),
        ("Ｃａｆé", "café"),
        ("\\text{Paris}", "paris"),
        ("the", ""),
    ],
)
def test_normalize_text(text: str, expected: str) -> None:
    assert normalize_text(text) == expected


# -------------------------------------------------------------------------------------------------- boxes
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[10, 20, 30, 40]", (10, 20, 30, 40)),
        ("[10,20,30,40]", (10, 20, 30, 40)),
        ("( 10.5 , 20 , 30.25 , 40 )", (10.5, 20, 30.25, 40)),
        ("The box is [1e1, 2e1, 3e1, 4e1].", (10, 20, 30, 40)),
        ('{"bbox_2d": [10, 20, 30, 40], "label": "cat"}', (10, 20, 30, 40)),
        ('[{"bbox_2d": [10, 20, 30, 40]}, {"bbox_2d": [1, 2, 3, 4]}]', (10, 20, 30, 40)),
        ('{"x1": 10, "y1": 20, "x2": 30, "y2": 40}', (10, 20, 30, 40)),
        ("x1=10, y1=20, x2=30, y2=40", (10, 20, 30, 40)),
        ("［１０, ２０, ３０, ４０］", (10, 20, 30, 40)),
        ("[-5, -5, 10, 10]", (-5, -5, 10, 10)),
        ("[30, 20, 10, 40]", None),  # x2 < x1
        ("[10, 20, 10, 40]", None),  # zero width
        ("[10, 20, 30]", None),
        ("[10, 20, 30, 40, 50]", None),
        ("[nan, 20, 30, 40]", None),
        ("[1e999, 20, 3e999, 40]", None),  # inf
        ("[a, b, c, d]", None),
        ("no box", None),
        ("", None),
        (None, None),
        ("[" * HUGE, None),
        ("[1, " * HUGE, None),
    ],
)
def test_parse_box(text: object, expected: tuple | None) -> None:
    assert parse_box(text) == expected


BOX = [100, 100, 200, 200]


@pytest.mark.parametrize(
    ("completion", "box", "image_size", "soft", "hard"),
    [
        (think_answer("[100, 100, 200, 200]"), BOX, None, 1.0, 1.0),
        (think_answer("[100, 100, 200, 150]"), BOX, None, 0.5, 0.0),  # exactly 0.5 is not > 0.5
        (think_answer("[100, 100, 200, 160]"), BOX, None, 0.6, 1.0),
        (think_answer("[150, 100, 250, 200]"), BOX, None, 1 / 3, 0.0),
        (think_answer("[300, 300, 400, 400]"), BOX, None, 0.0, 0.0),
        (think_answer("[100, 100, 200, 200]"), "[100, 100, 200, 200]", None, 1.0, 1.0),  # gold as a string
        (think_answer("(100,100,200,200)"), (100.0, 100.0, 200.0, 200.0), None, 1.0, 1.0),
        # clipped to a 200x200 image first: the area beyond the border does not count against it
        (think_answer("[100, 100, 300, 300]"), BOX, (200, 200), 1.0, 1.0),
        (think_answer("[100, 100, 300, 300]"), BOX, None, 0.25, 0.0),
        (think_answer("[300, 300, 400, 400]"), BOX, (200, 200), 0.0, 0.0),  # entirely outside
        (think_answer("[200, 200, 100, 100]"), BOX, None, 0.0, 0.0),  # invalid prediction
        (think_answer("a cat"), BOX, None, 0.0, 0.0),
        ("<think>never closed [100, 100, 200, 200]", BOX, None, 0.0, 0.0),
        (think_answer("[100, 100, 200, 200]"), [200, 100, 100, 200], None, None, None),  # invalid gold
        (think_answer("[100, 100, 200, 200]"), [1, 2, 3], None, None, None),
        (think_answer("[100, 100, 200, 200]"), [math.nan, 1, 2, 3], None, None, None),
        (think_answer("[100, 100, 200, 200]"), None, None, None, None),
        (think_answer("[100, 100, 200, 200]"), BOX, (0, 200), None, None),  # invalid image size
    ],
)
def test_iou(
    completion: str, box: object, image_size: object, soft: float | None, hard: float | None
) -> None:
    got = iou_soft(completion, box, image_size)
    assert got == pytest.approx(soft) if soft is not None else got is None
    assert iou(completion, box, image_size) == hard


def test_box_iou_and_clip() -> None:
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 1, 1), (1, 1, 2, 2)) == 0.0
    assert clip_box((-10, -10, 50, 50), (40, 30)) == (0, 0, 40, 30)
    assert clip_box((50, 50, 60, 60), (40, 30)) is None


# Hand-computed: 640x480 -> 336: CLIP resizes to 448x336 (scale 0.7) and crops 56 px on each side;
# SigLIP scales x by 0.525 and y by 0.7; LLaVA pads to 640x640 (80 px above) and scales by 0.525.
# 300x500 -> 224: CLIP resizes to 224x373 (int(373.33)) and crops (373-224)//2 = 74 px from the top.
CONVERSIONS = [
    ((640, 480), 336, "shortest_edge_center_crop", (100, 50, 300, 250), (14, 35, 154, 175)),
    ((640, 480), 336, "squash", (100, 50, 300, 250), (52.5, 35, 157.5, 175)),
    ((640, 480), 336, "pad", (100, 50, 300, 250), (52.5, 68.25, 157.5, 173.25)),
    ((300, 500), 224, "shortest_edge_center_crop", (30, 100, 150, 400), (22.4, 0.6, 112, 224.4)),
    ((300, 500), 224, "squash", (30, 100, 150, 400), (22.4, 44.8, 112, 179.2)),
    ((300, 500), 224, "pad", (30, 100, 150, 400), (58.24, 44.8, 112, 179.2)),
    ((301, 500), 500, "pad", (0, 0, 301, 500), (99, 0, 400, 500)),  # (500 - 301) // 2 = 99
    ((640, 480), (320, 240), "squash", (100, 50, 300, 250), (50, 25, 150, 125)),
    ((224, 224), 224, "shortest_edge_center_crop", (1, 2, 3, 4), (1, 2, 3, 4)),
]


@pytest.mark.parametrize(("image_size", "target", "resize", "box", "expected"), CONVERSIONS)
def test_box_to_and_from_model_input(image_size, target, resize, box, expected) -> None:
    mapped = box_to_model_input(box, image_size, target, resize)
    assert mapped == pytest.approx(expected)
    assert box_from_model_input(mapped, image_size, target, resize) == pytest.approx(box)


@pytest.mark.parametrize(
    ("image_size", "target", "resize", "message"),
    [
        ((0, 480), 336, "squash", "image_size"),
        ((640,), 336, "squash", "image_size"),
        ((640, 480), 0, "squash", "target_size"),
        ((640, 480), 336, "stretch", "resize must be one of"),
    ],
)
def test_box_conversion_rejects_bad_sizes(image_size, target, resize, message) -> None:
    with pytest.raises(ValueError, match=message):
        box_to_model_input((1, 2, 3, 4), image_size, target, resize)


def _bright_box(pixels) -> tuple[int, int, int, int]:
    ys, xs = (pixels[0, 0] > 0.75).nonzero(as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("image_size", [(640, 480), (300, 500)])
@pytest.mark.parametrize("resize", ["shortest_edge_center_crop", "squash", "pad"])
def test_box_mapping_agrees_with_the_transformers_processors(image_size, resize) -> None:
    from PIL import Image, ImageDraw
    from transformers import CLIPImageProcessor, LlavaImageProcessor, SiglipImageProcessor

    side = 224
    processor = {
        "shortest_edge_center_crop": CLIPImageProcessor(size={"shortest_edge": side}, crop_size=side),
        "squash": SiglipImageProcessor(size={"height": side, "width": side}),
        "pad": LlavaImageProcessor(size={"shortest_edge": side}, crop_size=side, do_pad=True),
    }[resize]
    box = (image_size[0] * 0.3, image_size[1] * 0.35, image_size[0] * 0.6, image_size[1] * 0.7)
    image = Image.new("RGB", image_size)
    ImageDraw.Draw(image).rectangle(
        [round(v) for v in box[:2]] + [round(v) - 1 for v in box[2:]], fill="white"
    )
    pixels = processor(image, do_normalize=False, return_tensors="pt")["pixel_values"]
    expected = box_to_model_input(box, image_size, side, resize)
    assert _bright_box(pixels) == pytest.approx(expected, abs=1.5)


# -------------------------------------------------------------------------------------- length, repetition
@pytest.mark.parametrize(
    ("completion", "kwargs", "expected"),
    [
        (think_answer("1", think="x" * 500), {"target": 1000}, 0.5),
        (think_answer("1", think="  " + "x" * 500 + "\n"), {"target": 1000}, 0.5),  # stripped
        (think_answer("1", think="x" * 5000), {"target": 1000}, 1.0),  # capped
        (think_answer("1", think="x" * 500), {"target": 1000, "scale": 0.2}, 0.1),
        (think_answer("1", think=""), {"target": 1000}, 0.0),
        ("<think>" + "x" * 5000, {"target": 1000}, 0.0),  # never closed: no reward for running out
        ("no think", {"target": 1000}, 0.0),
        (None, {}, 0.0),
    ],
)
def test_length(completion: object, kwargs: dict, expected: float) -> None:
    assert length(completion, **kwargs) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "kwargs", "expected"),
    [
        ("one two three four five six seven eight", {"n": 4}, 0.0),
        ("a b c d a b c d", {"n": 4}, -(1 - 4 / 5)),  # 5 n-grams, 4 distinct
        ("x " * 1000, {"n": 4}, -(1 - 1 / 997)),
        ("x " * 1000, {"n": 4, "max_penalty": 0.5}, -0.5 * (1 - 1 / 997)),
        ("too short", {"n": 4}, 0.0),
        ("", {}, 0.0),
        ("a" * 1000, {"n": 4}, -(1 - 1 / 985)),  # no spaces: 16-character n-grams
        ("天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏闰余成岁律吕调阳", {"n": 1}, 0.0),
    ],
)
def test_repetition(text: str, kwargs: dict, expected: float) -> None:
    assert repetition(text, **kwargs) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["the cat sat " * (HUGE // 12), "a" * HUGE, "🙂" * HUGE, "x"])
def test_shaping_rewards_are_fast_and_bounded_on_huge_text(text: str) -> None:
    started = time.monotonic()
    penalty = repetition(text)
    bonus = length(f"<think>{text}</think><answer>1</answer>")
    assert time.monotonic() - started < 2.0
    assert -1.0 <= penalty <= 0.0
    assert 0.0 <= bonus <= 1.0
    if len(text) > 1:
        assert penalty < -0.9


# -------------------------------------------------------------------------- registry and batch signature
def test_registry_functions_take_trl_style_batches() -> None:
    completions = [
        think_answer("4"),
        think_answer("[0, 0, 10, 10]"),
        [{"role": "assistant", "content": think_answer("4")}],
    ]
    trl_extras = {"prompts": ["p"] * 3, "trainer_state": object(), "completion_ids": [[1]] * 3}
    solution = ["4", "5", None]
    assert REWARDS["accuracy"](completions, solution=solution, **trl_extras) == [1.0, 0.0, None]
    assert REWARDS["accuracy"](completions, answer=["4", "4", "4"], **trl_extras) == [1.0, 0.0, 1.0]
    assert REWARDS["format"](completions, **trl_extras) == [1.0, 1.0, 1.0]
    boxes = [[0, 0, 10, 10]] * 3
    assert REWARDS["iou"](completions, box=boxes, **trl_extras) == [0.0, 1.0, 0.0]
    assert REWARDS["iou_soft"](completions, box=boxes, image_size=[(8, 8)] * 3) == [0.0, 0.64, 0.0]
    assert REWARDS["length"](completions, **trl_extras) == [len("reasoning") / 2000] * 3
    assert REWARDS["repetition"](completions, family=["count"] * 3) == [0.0] * 3


@pytest.mark.parametrize(
    ("name", "columns", "message"),
    [
        ("accuracy", {}, "needs a 'solution' column"),
        ("accuracy", {"solution": ["4"]}, "column 'solution' has 1 values for 2 completions"),
        ("iou", {}, "needs a 'box' column"),
        ("iou_soft", {"box": [BOX, BOX], "image_size": [(1, 1)]}, "column 'image_size' has 1 values"),
    ],
)
def test_missing_or_short_columns_are_setup_errors(name: str, columns: dict, message: str) -> None:
    with pytest.raises(AlignError, match=message):
        REWARDS[name](["a", "b"], **columns)


# ------------------------------------------------------------------------------------------- load_reward
CUSTOM = """
def shouty(completions, **columns):
    return [float(c.isupper()) for c in completions]

def scaled(completions, factor=1.0, **columns):
    return [factor * len(c) for c in completions]

NOT_CALLABLE = 3

raise_on_import = False
"""


def test_load_reward_by_name_module_and_file(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_rewards.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("format") is REWARDS["format"]
    assert load_reward("my_rewards:shouty")(["ABC", "abc"]) == [1.0, 0.0]
    assert load_reward(f"{tmp_path / 'my_rewards.py'}:shouty")(["ABC"]) == [1.0]
    bound = load_reward("my_rewards:scaled", {"factor": 2.0})
    assert bound(["abc"], factor=[9]) == [6.0]  # bound parameters win over same-named columns
    assert load_reward("length", {"target": 10})([think_answer("1", think="x" * 5)]) == [0.5]


@pytest.mark.parametrize(
    ("spec", "params", "message"),
    [
        ("acuracy", None, "unknown reward 'acuracy': did you mean 'accuracy'"),
        ("nothing_like_it", None, "built-in rewards are accuracy, format"),
        ("no_such_module_xyz:fn", None, "cannot import 'no_such_module_xyz': ModuleNotFoundError"),
        ("my_rewards:missing", None, "'my_rewards' has no 'missing' \\(callables: scaled, shouty\\)"),
        ("my_rewards:NOT_CALLABLE", None, "is a int, not a function"),
        ("missing/file.py:fn", None, "file missing/file.py not found"),
        ("length", {"tgt": 5}, "reward 'length' has no parameter 'tgt' \\(parameters: target, scale\\)"),
    ],
)
def test_load_reward_errors_name_what_is_wrong(tmp_path, monkeypatch, spec, params, message) -> None:
    (tmp_path / "my_rewards.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AlignError, match=message):
        load_reward(spec, params)


def test_load_reward_reports_a_module_that_fails_to_import(tmp_path, monkeypatch) -> None:
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AlignError, match="cannot import 'broken_rewards': RuntimeError: boom"):
        load_reward("broken_rewards:fn")


# --------------------------------------------------------------------------------------------- score_all
def _fails_on_bad_rows(completions, **columns):
    if any("bad" in c for c in completions):
        raise ValueError("cannot score 'bad'")
    return [1.0] * len(completions)


def _wrong_length(completions, **columns):
    return [1.0]


def _nan_and_none(completions, **columns):
    return [math.nan, None][: len(completions)]


def _infinite(completions, **columns):
    return [math.inf] * len(completions)


def test_score_all_counts_failures_and_skips_their_scores(caplog) -> None:
    funcs = {
        "format": REWARDS["format"],
        "custom": _fails_on_bad_rows,
        "short": _wrong_length,
        "nan": _nan_and_none,
        "inf": _infinite,
    }
    completions = [think_answer("ok"), "bad"]
    matrix, errors = score_all(funcs, completions, {"solution": ["ok", "ok"]})
    assert matrix == [[1.0, 1.0, 1.0, None, None], [0.0, None, 1.0, None, None]]
    # "short" returns one score: wrong for the batch, right for each completion alone
    assert errors == {"format": 0, "custom": 1, "short": 0, "nan": 0, "inf": 2}
    assert "reward 'custom' failed (ValueError: cannot score 'bad'); 1 of 2 scores set to None" in caplog.text


@pytest.mark.parametrize(
    ("func", "error", "message"),
    [
        (_fails_on_bad_rows, ValueError, "cannot score 'bad'"),
        (_wrong_length, AlignError, "reward 'f' returned 1 scores for 2 completions"),
        (_infinite, AlignError, "reward 'f' returned inf for completion 0"),
    ],
)
def test_score_all_raise_policy(func, error, message) -> None:
    with pytest.raises(error, match=message):
        score_all({"f": func}, ["ok", "bad"], {}, on_error="raise")


def test_score_all_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError, match="on_error must be"):
        score_all({}, [], {}, on_error="ignore")  # type: ignore[arg-type]


FUZZ_PIECES = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "\\boxed{",
    "\\fbox ",
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    ",",
    "3",
    "-",
    ".",
    "/",
    "^",
    "**",
    "!",
    "1e999",
    "9" * 120,
    "\\frac",
    "\\sqrt",
    "x",
    "B",
    "yes",
    "no",
    " ",
    "\n",
    "$",
    "%",
    "１",
    "٣",
    "🙂",
    "é",
    "\\text{",
    "answer is ",
    "x1=",
    "nan",
    "\x00",
]


def test_fuzzed_completions_never_raise_and_stay_in_range() -> None:
    import random

    rng = random.Random(0)
    golds = ["3", "0.5", "\\frac{1}{2}", "B", "yes", "blue", "x^2+1", "\\frac{"]
    for _ in range(150):
        completion = "".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(0, 40)))
        for gold in golds:
            assert accuracy(completion, gold, timeout=0.2) in (0.0, 1.0, None)
        assert format_score(completion) in (0.0, 1.0)
        assert iou(completion, BOX) in (0.0, 1.0)
        assert 0.0 <= iou_soft(completion, BOX, (150, 150)) <= 1.0
        assert 0.0 <= length(completion) <= 1.0
        assert -1.0 <= repetition(completion) <= 0.0


def test_score_all_raises_a_missing_column_even_when_skipping() -> None:
    from align.rewards import RewardSetupError

    with pytest.raises(RewardSetupError, match="needs a 'solution' column"):
        score_all({"accuracy": REWARDS["accuracy"]}, ["<answer>1</answer>"], {}, on_error="skip")


# ------------------------------------------------------------------------- edge cases: several think blocks,
# golds compared one way only (intervals, sets, relations), empty and malformed answers

# (completion, extracted answer, format score, accuracy against gold "3"): the answer is read after the LAST
# </think>; a second think block or any repeated tag costs the format reward, never the accuracy of what follows.
# extract_think reads the first block.
SEVERAL_THINKS = [
    ("<think>a</think>\n<think>b</think><answer>3</answer>", "3", 0.0, 1.0),
    ("<think>a</think><answer>4</answer></think><answer>3</answer>", "3", 0.0, 1.0),  # the last answer counts
    ("<think>a</think><answer>3</answer></think><answer>5</answer>", "5", 0.0, 0.0),
    ("<think>a</think>The answer is 3.</think>", None, 0.0, 0.0),  # nothing after the last </think>
    ("<think>a</think>b</think><answer>3</answer>", "3", 0.0, 1.0),
    ("<think>a<answer>3</answer></think>", None, 0.0, 0.0),  # an answer inside the reasoning does not count
    ("<think>a</think><answer>3</answer><think>wait, maybe 4", "3", 0.0, 1.0),  # a closed answer stands
    pytest.param(
        "<think>a</think>\n<think>\nI count 1, 2, 3",
        None,
        0.0,
        0.0,
        marks=pytest.mark.xfail(
            strict=True,
            reason="a second <think> cut off before </think> is read as the answer ('I count 1, 2, 3', "
            "accuracy 1.0), although the module says reasoning that never closes has no answer",
        ),
    ),
]


@pytest.mark.parametrize(("completion", "answer", "fmt", "acc"), SEVERAL_THINKS)
def test_several_think_blocks(completion: str, answer: str | None, fmt: float, acc: float) -> None:
    assert extract_think(completion) == completion[len("<think>") :].split("</think>")[0]
    assert extract_answer(completion) == answer
    assert format_score(completion) == fmt
    assert accuracy(completion, "3") == acc


# (completion, gold, expected): math_verify compares an answer with a gold; both orders are listed where the
# comparison could be one-sided
ONE_WAY_GOLDS = [
    # intervals: open and closed ends differ, and neither contains the other
    (think_answer("[1, 3)"), "[1,3)", 1.0),
    (think_answer("(1, 3]"), "[1,3)", 0.0),
    (think_answer("(1,3)"), "[1,3]", 0.0),
    (think_answer("[1,3]"), "(1,3)", 0.0),
    (think_answer("(2, \\infty) \\cup (-\\infty, 1)"), "(-\\infty,1)\\cup(2,\\infty)", 1.0),
    # an interval answer to a relation gold, and the same set as a relation inside
    (think_answer("[2, \\infty)"), "x \\geq 2", 1.0),
    (think_answer("(1,3)"), "1 < x < 3", 1.0),
    (think_answer("x \\in [2, \\infty)"), "[2, \\infty)", 1.0),
    # sets: order and repeats do not matter, a subset or superset is wrong either way round
    (think_answer("\\{2, 1\\}"), "\\{1, 2\\}", 1.0),
    (think_answer("\\{1,2\\}"), "\\{1,2,2\\}", 1.0),
    (think_answer("\\{1, 2, 3\\}"), "\\{1, 2\\}", 0.0),
    (think_answer("\\{1, 2\\}"), "\\{1, 2, 3\\}", 0.0),
    (think_answer("1, 2"), "2, 1", 1.0),  # a bare list is a set
    (think_answer("(1, 2)"), "(2, 1)", 0.0),  # a tuple is ordered
    # relations: the same relation written the other way round, a strict vs non-strict one
    (think_answer("x > 2"), "2 < x", 1.0),
    (think_answer("2 < x"), "x > 2", 1.0),
    (think_answer("x \\leq 2"), "2 \\geq x", 1.0),
    (think_answer("x \\geq 2"), "x > 2", 0.0),
    (think_answer("x > 2"), "x \\geq 2", 0.0),
    (think_answer("x < 2"), "x > 2", 0.0),
    (think_answer("2x + 1 = y"), "y = 2x + 1", 1.0),
    (think_answer("x = 2"), "2", 1.0),
    (think_answer("2"), "x = 2", 1.0),
    # percentages are numbers of percent both ways (50% is 50, not 0.5)
    (think_answer("0.5"), "50%", 0.0),
    (think_answer("50%"), "0.5", 0.0),
    pytest.param(
        think_answer("x \\geq 2"),
        "[2, \\infty)",
        1.0,
        marks=pytest.mark.xfail(
            strict=True, reason="math_verify does not match a relation answer against an interval gold (0.0)"
        ),
    ),
    pytest.param(
        think_answer("1 < x < 3"),
        "(1,3)",
        1.0,
        marks=pytest.mark.xfail(
            strict=True, reason="math_verify does not match a relation answer against an interval gold (0.0)"
        ),
    ),
]


@pytest.mark.parametrize(("completion", "gold", "expected"), ONE_WAY_GOLDS)
def test_golds_compared_one_way(completion: str, gold: str, expected: float) -> None:
    assert accuracy(completion, gold) == expected


# (completion, extracted answer, format score): an empty or malformed answer scores 0 on accuracy, never raises
EMPTY_OR_MALFORMED = [
    ("<think>a</think><answer></answer>", None, 0.0),
    ("<think>a</think><answer> \n </answer>", None, 0.0),
    ("<think>a</think><answer>", None, 0.0),
    ("<think>a</think></answer>", None, 0.0),
    (
        "<think>a</think><answer>\\boxed{}</answer>",
        None,
        1.0,
    ),  # the tags are right; the boxed answer is empty
    ("<think>a</think><answer>\\boxed{</answer>", "\\boxed{", 1.0),  # an unclosed box is read as text
    ("<think>a</think>\\boxed{", "\\boxed{", 0.0),
    ("<think>a</think><answer>=</answer>", "=", 1.0),
    ("<think>a</think><answer>)(</answer>", ")(", 1.0),
    ("<think>a</think><answer>\\frac{1}{0}</answer>", "\\frac{1}{0}", 1.0),
]


@pytest.mark.parametrize(("completion", "answer", "fmt"), EMPTY_OR_MALFORMED)
@pytest.mark.parametrize("gold", ["3", "(1,3)", "B", "yes", "blue"])
def test_empty_or_malformed_answers_score_0(
    completion: str, answer: str | None, fmt: float, gold: str
) -> None:
    assert extract_answer(completion) == answer
    assert format_score(completion) == fmt
    assert accuracy(completion, gold) == 0.0
