"""The published systems' rewards (align/rewards/detection.py) and VLM-R1's per-row accuracy method: tables whose
expected numbers are worked out by hand here, the exact gold forms the systems publish among them."""

from __future__ import annotations

import pytest

from align.rewards import (
    REWARDS,
    RewardSetupError,
    accuracy,
    boxed_format_score,
    gold_self_check,
    load_reward,
    perfect_completion,
    unscorable_gold,
)
from align.rewards.answers import gold_problem
from align.rewards.detection import (
    classification,
    detection_confidence,
    detection_iou,
    generalized_iou,
    giou,
    parse_corner_box,
    parse_detections,
    rec_format,
)


def said(answer: str) -> str:
    return f"<think>\nI look.</think>\n<answer>{answer}</answer>"


# Visual-RFT's detection gold, as its datasets write it (single quotes, Confidence 1)
GOLD_TWO = "<answer>[{'Position': [0, 0, 10, 10], 'Confidence': 1}, {'Position': [20, 20, 30, 30], 'Confidence': 1}]</answer>"
BOX_A, BOX_B = (
    "{'Position': [0, 0, 10, 10], 'Confidence': %s}",
    "{'Position': [20, 20, 30, 30], 'Confidence': %s}",
)
# IoU of [0,0,10,10] with [0,0,10,8] = 80/100; with [5,0,15,10] = 50/150 (below the 0.5 match threshold)
NEAR_A = "{'Position': [0, 0, 10, 8], 'Confidence': %s}"
OFF_A = "{'Position': [5, 0, 15, 10], 'Confidence': %s}"


@pytest.mark.parametrize(
    ("answer", "iou", "confidence"),
    [
        (GOLD_TWO.removeprefix("<answer>").removesuffix("</answer>"), 1.0, 1.0),  # the gold itself
        (f"[{BOX_A % 0.9}, {BOX_B % 0.6}]", 1.0, (0.9 + 0.6) / 2),
        (f"[{BOX_A % 1}]", 1.0 / 2, 1.0),  # one of two found: sum IoU / max(2 gold, 1 predicted)
        (f"[{NEAR_A % 0.8}, {BOX_B % 0.4}]", (0.8 + 1.0) / 2, (0.8 + 0.4) / 2),
        (f"[{OFF_A % 0.7}]", 0.0, 1 - 0.7),  # no match above 0.5: its confidence counts against it
        # three predicted, two gold: divided by 3; the false one at 0.2 earns 1 - 0.2
        (
            f"[{BOX_A % 1}, {BOX_B % 1}, {{'Position': [50, 50, 60, 60], 'Confidence': 0.2}}]",
            2 / 3,
            (1 + 1 + 0.8) / 3,
        ),
        # the more confident of two boxes on the same gold takes it; the other matches nothing
        (f"[{NEAR_A % 0.3}, {BOX_A % 0.9}]", 1.0 / 2, (0.9 + (1 - 0.3)) / 2),
        (f"[{BOX_A % 1}, {BOX_A % 1}]", 1.0 / 2, 1.0),  # a duplicate box counts once
        (
            '[{"bbox_2d": [0, 0, 10, 10]}, {"bbox_2d": [20, 20, 30, 30]}]',
            1.0,
            1.0,
        ),  # Qwen2.5-VL keys, no score
        (f"[{BOX_A % 1}, {BOX_B % 1}, {{'Position': [1, 2", 1.0, 1.0),  # cut off: the complete objects count
        ("[]", 0.0, 0.0),
        ("two boxes", 0.0, 0.0),
        ("[{'Position': [0, 0, 10]}]", 0.0, 0.0),  # a box of 3 numbers: the list is invalid
        (f"[{BOX_A % 1}, 'x']", 0.0, 0.0),
        ("[{'Position': [0, 0, 10, 10], 'Confidence': nan}]", 0.0, 0.0),
    ],
)
def test_detection_rewards_table(answer: str, iou: float, confidence: float) -> None:
    assert detection_iou(said(answer), GOLD_TWO) == pytest.approx(iou)
    assert detection_confidence(said(answer), GOLD_TWO) == pytest.approx(confidence)


def test_detection_rewards_empty_gold_and_unreadable_gold() -> None:
    assert detection_iou(said("[]"), "<answer>[]</answer>") == 1.0
    assert detection_confidence(said("[]"), "<answer>[]</answer>") == 1.0
    assert detection_iou(said(f"[{BOX_A % 0.9}]"), "[]") == 0.0
    assert detection_confidence(said(f"[{BOX_A % 0.9}]"), "[]") == pytest.approx(0.1)
    for gold in ("<answer>3</answer>", "[1, 2, 3, 4]", None, "[{'Position': 'left'}]"):
        assert detection_iou(said("[]"), gold) is None
        assert detection_confidence(said("[]"), gold) is None
    assert detection_iou("no answer at all", GOLD_TWO) == 0.0


def test_parse_detections_reads_both_quotes_and_refuses_what_is_not_a_list() -> None:
    assert parse_detections('[{"Position": [1, 2, 3, 4], "Confidence": 0.5}]') == [
        ((1.0, 2.0, 3.0, 4.0), 0.5)
    ]
    assert parse_detections("[{'bbox': [1, 2, 3, 4], 'score': 2}]") == [
        ((1.0, 2.0, 3.0, 4.0), 1.0)
    ]  # clamped
    assert parse_detections("[{'bbox': [1, 2, 3, 4], 'score': True}]") is None
    assert parse_detections("{'bbox': [1, 2, 3, 4]}") is None
    assert parse_detections(None) is None
    assert parse_detections("[" * 5000) is None  # nesting beyond the parser's depth is not a crash


@pytest.mark.parametrize(
    ("answer", "gold", "expected"),
    [
        ("pink primrose", "<answer>pink primrose</answer>", 1.0),
        ("Pink_Primrose", "pink primrose", 1.0),  # spaces and underscores dropped, case folded
        ("a pink primrose flower", "pink primrose", 1.0),  # the gold inside the answer
        ("primrose", "pink primrose", 1.0),  # the answer inside the gold (Visual-RFT's two-way test)
        ("rose", "pink primrose", 1.0),
        ("tulip", "pink primrose", 0.0),
        ("", "pink primrose", 0.0),  # empty: in every gold, but not an answer
        ("  ", "pink primrose", 0.0),
    ],
)
def test_classification_table(answer: str, gold: str, expected: float) -> None:
    assert classification(said(answer), gold) == expected


def test_classification_without_an_answer_or_gold() -> None:
    assert classification("<think>pink primrose", "pink primrose") == 0.0  # cut off in its reasoning
    assert classification(said("x"), "  ") is None


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ('<think>r</think><answer>{"bbox_2d": [10, 20, 30, 40], "label": "dog"}</answer>', 1.0),
        ("<think>r</think>\n<answer>the box {[10,20,30,40]}</answer>", 1.0),
        ("<think>r</think><answer>[10, 20, 30, 40]</answer>", 0.0),  # no JSON object
        ('<think>r</think><answer>{"bbox_2d": [10.5, 20, 30, 40]}</answer>', 0.0),  # whole numbers only
        ('<answer>{"bbox_2d": [10, 20, 30, 40]}</answer>', 0.0),  # no reasoning
        ('<think>r</think><answer>{"bbox_2d": [10, 20, 30, 40]}', 0.0),  # unclosed
    ],
)
def test_rec_format_table(completion: str, expected: float) -> None:
    assert rec_format(completion) == expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((0, 0, 2, 2), (0, 0, 2, 2), 1.0),
        ((0, 0, 2, 2), (1, 0, 3, 2), 2 / 6 - 0.0),  # IoU 2/6, the enclosing box is the union
        ((0, 0, 1, 1), (2, 0, 3, 1), 0.0 - (3 - 2) / 3),  # apart: -(empty part of the 3 x 1 enclosure)
        ((0, 0, 1, 1), (9, 9, 10, 10), -(100 - 2) / 100),
    ],
)
def test_generalized_iou_table(a, b, expected: float) -> None:
    assert generalized_iou(a, b) == pytest.approx(expected)
    assert generalized_iou(b, a) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("answer", "box", "image_size", "coordinates", "expected"),
    [
        ("[0, 0, 2, 2]", [0, 0, 2, 2], None, "pixels", 1.0),
        ("(0,0),(2,2)", [0, 0, 2, 2], None, "pixels", 1.0),  # Qwen2-VL's two corners
        ("(1, 0), (3, 2)", [0, 0, 2, 2], None, "pixels", (1 + 1 / 3) / 2),
        ("[2, 0, 3, 1]", [0, 0, 1, 1], None, "pixels", (1 - 1 / 3) / 2),
        # 0-1000 of a 200 x 100 image: (100,100),(600,500) -> (20,10),(120,50) pixels
        ("(100,100),(600,500)", [20, 10, 120, 50], [200, 100], "norm1000", 1.0),
        ("[0.1, 0.1, 0.6, 0.5]", [20, 10, 120, 50], [200, 100], "norm1", 1.0),
        ("(100,100),(600,500)", [20, 10, 120, 50], None, "norm1000", None),  # no size: not applicable
        (
            "(100,100),(600,500)",
            "(20,10),(120,50)",
            None,
            "pixels",
            pytest.approx((1 + generalized_iou((100, 100, 600, 500), (20, 10, 120, 50))) / 2),
        ),
        ("no box", [0, 0, 2, 2], None, "pixels", 0.0),  # malformed: 0, below any real box
        ("[2, 2, 0, 0]", [0, 0, 2, 2], None, "pixels", 0.0),
        ("[0, 0, 2, 2]", [2, 2, 0, 0], None, "pixels", None),  # an invalid gold
    ],
)
def test_giou_table(answer, box, image_size, coordinates, expected) -> None:
    assert giou(said(answer), box, image_size, coordinates) == expected


def test_giou_scale_is_checked() -> None:
    with pytest.raises(ValueError, match="coordinates must be one of pixels, norm1000, norm1"):
        giou(said("[0, 0, 1, 1]"), [0, 0, 1, 1], None, "percent")
    with pytest.raises(Exception, match=r"reward 'giou' coordinates: .* got 'percent'"):
        load_reward("giou", {"coordinates": "percent"})
    assert parse_corner_box("(1.5, 2) (3, 4.25)") == (1.5, 2.0, 3.0, 4.25)
    assert parse_corner_box("[1, 2, 3, 4]") == (1.0, 2.0, 3.0, 4.0)


def test_detection_list_bounds() -> None:
    """Texts up to 100,000 characters and lists up to 1000 objects are read; beyond, refused unread. A cut-off
    list keeps its complete objects even when they hold JSON words (true) Python's literals lack."""
    item = "{'Position': [0, 0, 10, 10]}"
    padded = lambda n: "[" + item + " " * (n - len(item) - 2) + "]"  # noqa: E731
    assert parse_detections(padded(100_000)) == [((0.0, 0.0, 10.0, 10.0), 1.0)]
    assert parse_detections(padded(100_001)) is None
    assert parse_detections(" " * 100_001 + "x") is None
    many = "[" + ", ".join(f"{{'bbox': [{i}, 0, {i + 1}, 1]}}" for i in range(1000)) + "]"
    assert len(parse_detections(many)) == 1000
    assert parse_detections(many[:-1] + ", " + item + "]") is None  # 1001 objects
    cut = '[{"bbox": [1, 2, 3, 4], "kept": true}, {"bbox": [5, 6'
    assert parse_detections(cut) == [((1.0, 2.0, 3.0, 4.0), 1.0)]
    assert parse_detections("[{'label': 'dog'}]") is None  # an object without a box


def test_a_match_needs_more_than_half_overlap() -> None:
    """IoU exactly 0.5 ([0,0,10,5] inside [0,0,10,10]) is not a match, as in Visual-RFT (> 0.5)."""
    gold = "[{'Position': [0, 0, 10, 10], 'Confidence': 1}]"
    assert detection_iou(said("[{'Position': [0, 0, 10, 5], 'Confidence': 1}]"), gold) == 0.0
    assert detection_iou(said("[{'Position': [0, 0, 10, 5.1], 'Confidence': 1}]"), gold) == pytest.approx(
        0.51
    )


def test_giou_defaults_to_pixels_and_a_missing_normalised_box_scores_0() -> None:
    assert giou(said("[0, 0, 2, 2]"), [0, 0, 2, 2]) == 1.0
    assert giou(said("no box"), [20, 10, 120, 50], [200, 100], "norm1000") == 0.0


# ------------------------------------------------------------------------- VLM-R1's per-row accuracy method


@pytest.mark.parametrize(
    ("answer", "gold", "method", "expected"),
    [
        ("B", "B", "mcq", 1.0),
        ("The answer is (B).", "(B) a cat", "mcq", 1.0),  # an mcq gold that is more than a letter
        ("C", "(B) a cat", "mcq", 0.0),
        ("yes, it is", "Yes.", "yes_no", 1.0),
        ("no", "yes", "yes_no", 0.0),
        ("3.0", "3", "default", 1.0),  # default: chosen by the gold's shape (a number)
        ("3.0", "3", "all_match", 0.0),  # exact text: "30" is not "3" once punctuation goes
        ("3", "3", "all_match", 1.0),
        ("\\frac{1}{2}", "0.5", "math", 1.0),
        ("12", "12", "number", 1.0),
        ("B", "B", None, 1.0),
    ],
)
def test_accuracy_with_a_row_method(answer: str, gold: str, method, expected: float) -> None:
    assert accuracy(said(answer), gold, method=method) == expected
    reward = REWARDS["accuracy"]
    assert reward([said(answer)], solution=[gold], accu_reward_method=[method]) == [expected]


def test_row_methods_that_cannot_read_their_gold_or_do_not_exist() -> None:
    assert (
        gold_problem("a cat", method="mcq")
        == "the gold answer 'a cat' names no option letter (accu_reward_method mcq)"
    )
    assert (
        gold_problem("maybe", method="yes_no")
        == "the gold answer 'maybe' is not yes or no (accu_reward_method yes_no)"
    )
    assert (
        gold_problem("three", method="number")
        == "the gold answer 'three' is not a number (accu_reward_method number)"
    )
    assert accuracy(said("A"), "a cat", method="mcq") is None
    with pytest.raises(RewardSetupError, match=r"accu_reward_method 'od_ap': COCO AP .* 'detection_iou'"):
        REWARDS["accuracy"]([said("x")], solution=["x"], accu_reward_method=["od_ap"])
    with pytest.raises(RewardSetupError, match=r"accu_reward_method 'fuzzy': expected one of default, mcq"):
        REWARDS["accuracy"]([said("x")], solution=["x"], accu_reward_method=["fuzzy"])
    assert "names no option letter" in unscorable_gold(["accuracy"], "a cat", None, "mcq")
    assert "'llm': an LLM judge" in unscorable_gold(["accuracy"], "a cat", None, "llm")
    assert unscorable_gold(["accuracy"], "B", None, "mcq") is None


# ------------------------------------------------------------------------------------------- the self-check


@pytest.mark.parametrize(
    ("spec", "solution", "box"),
    [
        ("detection_iou", GOLD_TWO, None),
        ("detection_confidence", GOLD_TWO, None),
        ("detection_iou", "<answer>[]</answer>", None),
        ("classification", "<answer>pink primrose</answer>", None),
        ("giou", None, [10, 20, 30, 40]),
        ("giou", None, "(10,20),(30,40)"),
        ("rec_format", "x", None),  # reads no gold: not judged
    ],
)
def test_every_published_reward_scores_its_own_gold_at_its_maximum(spec, solution, box) -> None:
    assert gold_self_check(spec, load_reward(spec), solution, box) is None
    if spec != "rec_format":
        assert unscorable_gold([spec], solution, box) is None


def test_the_self_check_follows_the_answers_scale() -> None:
    """With coordinates norm1000 the gold (pixels) is written on an image where both scales agree."""
    reward = load_reward("giou", {"coordinates": "norm1000"})
    assert gold_self_check("giou", reward, None, [10, 20, 30, 40]) is None


def test_a_gold_the_detection_rewards_cannot_read_is_named() -> None:
    reason = unscorable_gold(["detection_iou"], "<answer>[12, 30, 40, 80]</answer>")
    assert reason.startswith(
        "detection_iou reward: the gold '<answer>[12, 30, 40, 80]</answer>' is not a list"
    )
    assert unscorable_gold(["classification"], "  ") == "classification reward: the gold answer is blank"


def test_perfect_completion_of_a_visual_rft_gold_earns_both_detection_rewards() -> None:
    completion = perfect_completion(GOLD_TWO.removeprefix("<answer>").removesuffix("</answer>"))
    assert detection_iou(completion, GOLD_TWO) == detection_confidence(completion, GOLD_TWO) == 1.0


# ------------------------------------------------------------------------------ data check and a GRPO run

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def detection_rows(tmp_path_factory: pytest.TempPathFactory):
    """Visual-RFT-style rows: an image, a question, and a detection list gold in <answer> (single quotes)."""
    import json

    from align.data.synth import synthesize

    root = tmp_path_factory.mktemp("detection")
    synthesize(root / "synth", train=4, test=1)
    rows = [json.loads(line) for line in (root / "synth/train/rl.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["problem"] = "Detect every object. Output [{'Position': [x1, y1, x2, y2], 'Confidence': c}]."
        row["solution"] = f"<answer>[{{'Position': [{i}, 2, {i + 20}, 30], 'Confidence': 1}}]</answer>"
        row["accu_reward_method"] = "default"
    rows[-1]["solution"] = "<answer>a dog on the left</answer>"  # words: not a detection list
    path = root / "synth/train/detect.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(args: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    from align.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        rc = main(args)
    return rc, printed.getvalue()


DETECTION_REWARDS = "grpo.reward_funcs=[detection_iou, detection_confidence, format]"


def test_data_check_passes_detection_golds_and_names_the_one_it_cannot_read(
    detection_rows, siglip_qwen2
) -> None:
    base = ["data", "check", str(ROOT / "recipes/tiny/grpo.yaml"), f"--model={siglip_qwen2}"]
    rc, printed = _cli([*base, f"data.sources.0.path={detection_rows}", DETECTION_REWARDS])
    assert rc == 1, printed
    assert f"{detection_rows}:4: cannot be scored: detection_iou reward: the gold" in printed, printed
    assert "1 problem rows" in printed
    good = detection_rows.with_name("detect_good.jsonl")
    good.write_text("".join(detection_rows.read_text().splitlines(keepends=True)[:3]))
    rc, printed = _cli([*base, f"data.sources.0.path={good}", DETECTION_REWARDS])
    assert rc == 0 and "0 problems" in printed, printed


@pytest.mark.slow
def test_grpo_trains_two_steps_on_detection_rewards(detection_rows, siglip_qwen2, tmp_path) -> None:
    """The rewards reach the stage by name and are logged; the tiny model's boxes score what the table says."""
    import json

    good = detection_rows.with_name("detect_run.jsonl")
    good.write_text("".join(detection_rows.read_text().splitlines(keepends=True)[:3]))
    args = [
        "grpo",
        str(ROOT / "recipes/tiny/grpo.yaml"),
        f"model={siglip_qwen2}",
        f"output_dir={tmp_path / 'run'}",
        f"data.sources.0.path={good}",
        "grpo.reward_funcs=[detection_iou, detection_confidence, accuracy]",
        "run.max_steps=2",
        "run.epochs=2",  # 3 questions, 2 per step: one step an epoch
    ]
    rc, printed = _cli(args)
    assert rc == 0, printed
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/detection_iou" in r]
    assert len(steps) == 2, rows
    for r in steps:  # untrained output is no detection list: IoU 0; no predictions against a gold box: 0
        assert r["reward/detection_iou"] == 0.0 and r["reward/detection_confidence"] == 0.0
        assert r["reward_errors/detection_iou"] == r["reward_errors/detection_confidence"] == 0.0


# ------------------------------------------------- the registered wrappers: columns, parameters, defaults


def test_wrappers_score_each_completion_against_its_own_rows_column() -> None:
    done = said(f"[{BOX_A % 1}, {BOX_B % 1}]")
    half = said(f"[{BOX_A % 1}]")
    golds = [GOLD_TWO, GOLD_TWO]
    assert REWARDS["detection_iou"]([done, half], solution=golds) == [1.0, 0.5]
    assert REWARDS["detection_confidence"]([half, done], solution=golds) == [1.0, 1.0]
    assert REWARDS["classification"]([said("rose"), said("tulip")], solution=["pink rose", "pink rose"]) == [
        1.0,
        0.0,
    ]
    assert REWARDS["rec_format"]([said('{"bbox_2d": [1, 2, 3, 4]}'), said("x")]) == [1.0, 0.0]
    giou_reward = REWARDS["giou"]
    two = [said("(100,100),(600,500)"), said("[0, 0, 2, 2]")]
    assert giou_reward(two, box=[[20, 10, 120, 50], [0, 0, 2, 2]]) == [
        pytest.approx((1 + generalized_iou((100, 100, 600, 500), (20, 10, 120, 50))) / 2),
        1.0,
    ]
    assert giou_reward(two[:1], box=[[20, 10, 120, 50]], image_size=[[200, 100]], coordinates="norm1000") == [
        1.0
    ]
    iou_reward, iou_soft_reward = REWARDS["iou"], REWARDS["iou_soft"]
    near = said("[0, 0, 10, 6]")  # IoU 0.6 with [0, 0, 10, 10]
    assert iou_reward([near], box=[[0, 0, 10, 10]]) == [1.0]
    assert iou_reward([near], box=[[0, 0, 10, 10]], threshold=0.7) == [0.0]
    assert iou_soft_reward(
        [near, said("[0, 0, 5, 5]")], box=[[0, 0, 10, 10]] * 2, image_size=[[5, 5], None]
    ) == [
        pytest.approx(0.25),  # clipped to the 5 x 5 image first: [0, 0, 5, 5]
        pytest.approx(0.25),
    ]
    words = "a b c d a b c d"  # the whole completion is what the penalty reads
    assert REWARDS["repetition"]([words]) == [pytest.approx(-0.2)]
    assert REWARDS["repetition"]([words], n=5, max_penalty=2.0) == [0.0]
    assert REWARDS["repetition"](["a b a b a b"], n=2, max_penalty=2.0) == [pytest.approx(-2 * (1 - 2 / 5))]
    assert REWARDS["length"](["<think>" + "a" * 1000 + "</think>"]) == [0.5]
    assert REWARDS["length"](["<think>" + "a" * 1000 + "</think>"], target=500, scale=2.0) == [2.0]


@pytest.mark.parametrize(
    ("name", "call", "message"),
    [
        (
            "classification",
            {},
            "reward 'classification' needs a 'solution' column in the data; it is missing",
        ),
        (
            "detection_iou",
            {"solution": ["x"]},
            "reward 'detection_iou': column 'solution' has 1 values for 2 completions",
        ),
        ("giou", {}, "reward 'giou' needs a 'box' column in the data; it is missing"),
        (
            "giou",
            {"box": [[0, 0, 1, 1]] * 2, "image_size": [[4, 4]]},
            "reward 'giou': column 'image_size' has 1 values for 2 completions",
        ),
        ("iou", {"box": "[0, 0, 1, 1]"}, "reward 'iou': column 'box' has 12 values for 2 completions"),
        ("iou_soft", {"box": 7}, "reward 'iou_soft': column 'box' has int values for 2 completions"),
    ],
)
def test_a_missing_or_misshapen_column_is_a_setup_error_naming_it(
    name: str, call: dict, message: str
) -> None:
    with pytest.raises(RewardSetupError) as err:
        REWARDS[name](["a", "b"], **call)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("coordinates", "answer"),
    [("pixels", "[0, 0, 2, 1]"), ("norm1000", "[0, 0, 1000, 1000]"), ("norm1", "[0, 0, 1, 1]")],
)
def test_giou_accepts_each_scale_as_a_parameter(coordinates: str, answer: str) -> None:
    reward = load_reward("giou", {"coordinates": coordinates})
    assert reward([said(answer)], box=[[0, 0, 2, 1]], image_size=[[2, 1]]) == [1.0]


@pytest.mark.parametrize("coordinates", ["percent", None, 1000])
def test_giou_refuses_other_scales_naming_them(coordinates) -> None:
    with pytest.raises(Exception) as err:
        load_reward("giou", {"coordinates": coordinates})
    assert str(err.value) == (
        "reward 'giou' coordinates: the scale of the answer's box, one of pixels, norm1000, norm1; "
        f"got {coordinates!r}"
    )


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>x = 3</think> So the answer is \\boxed{3}.", 1.0),
        ("<think>x</think>\\boxed{\\frac{1}{2}}", 1.0),
        ("< think >x</ think > \\boxed{3}", 1.0),  # EasyR1 drops spaces around < > / first
        ("<think>\nx\n</think>\n\\boxed 3", 1.0),
        ("<think>x</think> the answer is 3", 0.0),  # no box
        ("<think>x</think> \\boxed{}", 0.0),  # a blank box
        ("<think>x</think> \\boxed{3", 0.0),  # cut off inside the box
        ("\\boxed{3} <think>x</think>", 0.0),  # the box before the reasoning
        ("<think>x \\boxed{3}</think>", 0.0),  # the box only inside the reasoning
        ("<think>a</think><think>b</think>\\boxed{3}", 0.0),  # two think blocks
        ("x</think>\\boxed{3}", 0.0),  # no opening tag
        ("", 0.0),
        (None, 0.0),
    ],
)
def test_boxed_format_table(completion, expected: float) -> None:
    assert boxed_format_score(completion) == expected
    assert load_reward("boxed_format")([completion]) == [expected]
