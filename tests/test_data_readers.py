"""Data layer: recipe schema, readers for every format, images, mixing. Fixtures: tests/fixtures/data/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from align.config import RecipeError, from_dict
from align.data.config import DataConfig, DataSource, Sampling, parse_sampling
from align.data.images import ImageTooLarge, ImageUnreadable, image_size, load_image, resolve_image
from align.data.mixing import apply_sampling, build_mix, mix_sizes, take
from align.data.readers import FilteredRow, RowProblem, judge_verdict, read_source
from align.data.rows import parse_box
from align.data.sample import Sample
from align.errors import AlignError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
RED = str(FIXTURES / "images" / "red.png")
BLUE = str(FIXTURES / "images" / "blue.png")
RGBA = str(FIXTURES / "images" / "rgba.png")


def source(path: str | Path, fmt: str, **kw) -> DataSource:
    """A DataSource validated exactly as a recipe would be."""
    return from_dict(DataSource, {"name": kw.pop("name", "s"), "path": str(path), "format": fmt, **kw})


def rows(src: DataSource) -> list:
    return list(read_source(src))


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


# ---------------------------------------------------------------- fixtures


def test_committed_binary_fixtures_match_their_script(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write(tmp_path)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert made, "script wrote nothing"
    for rel in made:
        assert (FIXTURES / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


# ---------------------------------------------------------------- schema


@pytest.mark.parametrize(
    "text, expected",
    [
        ("all", Sampling("all")),
        ("first:3", Sampling("first", 3)),
        ("end:10", Sampling("end", 10)),
        ("random:7", Sampling("random", 7)),
    ],
)
def test_parse_sampling(text, expected):
    assert parse_sampling(text) == expected


@pytest.mark.parametrize(
    "text", ["", "some", "first", "first:", "first:0", "random:-1", "last:3", "first:2.5"]
)
def test_parse_sampling_rejects(text):
    with pytest.raises(ValueError, match="first:N"):
        parse_sampling(text)


@pytest.mark.parametrize(
    "override, key, message",
    [
        ({"sampling": "random:x"}, "sampling", "random:N"),
        ({"repeat": 0}, "repeat", ">= 1"),
        ({"weight": 1.5}, "weight", r"must be in \(0, 1\] \(a fraction of the mix\), got 1.5"),
        ({"weight": 0.5, "repeat": 2}, "weight", "not both"),
        ({"columns": {"image": "img"}}, "columns", "'hf' sources only"),
        ({"split": "train"}, "split", "'hf' sources only"),
        ({"question_template": "Q: {q}"}, "question_template", "must contain"),
        ({"format": "rl", "question_template": "no placeholder"}, "question_template", "must contain"),
        (
            {"format": "rl", "question_template": "{question} {other}"},
            "question_template",
            "only '{question}'",
        ),
        ({"format": "hf", "columns": {"picture": "img"}}, "columns.picture", "unknown name"),
    ],
)
def test_source_check_names_key(override, key, message):
    data = {"name": "a", "path": "x.jsonl", "format": "llava", **override}
    with pytest.raises(RecipeError, match=message) as err:
        from_dict(DataSource, data, file="r.yaml")
    assert err.value.key == key
    assert str(err.value).startswith("r.yaml: ")


@pytest.mark.parametrize(
    "sources, message",
    [
        ([], "at least one"),
        ([{"name": "a"}, {"name": "a"}], "already the name of sources\\[0\\]"),
        ([{"name": "a", "weight": 0.5}, {"name": "b", "weight": 0.4}], "must sum to 1; got 0.9"),
        ([{"name": "a", "weight": 0.6}, {"name": "b", "weight": 0.4}, {"name": "c"}], "keep the sum below 1"),
    ],
)
def test_data_config_check(sources, message):
    full = [{"path": "x.jsonl", "format": "llava", **s} for s in sources]
    with pytest.raises(RecipeError, match=message):
        from_dict(DataConfig, {"sources": full})


def test_data_config_defaults():
    config = from_dict(DataConfig, {"sources": [{"name": "a", "path": "x.jsonl", "format": "rl"}]})
    assert (config.max_length, config.overlong, config.strict, config.max_image_pixels) == (
        2048,
        "drop",
        True,
        89_478_485,
    )


# ---------------------------------------------------------------- readers, one format at a time


def test_llava_json_array_and_lines():
    array = rows(source(FIXTURES / "llava.json", "llava"))
    assert [s.origin for s in array] == [f"{FIXTURES}/llava.json:[0]", f"{FIXTURES}/llava.json:[1]"]
    assert array[0].messages == [
        {"role": "user", "content": "<image>\nWhat colour is this?"},
        {"role": "assistant", "content": "Red."},
    ]
    assert array[0].images == [RED] and array[0].meta == {"id": "a1"}
    assert array[1].images == [RED, BLUE]
    assert [m["role"] for m in array[1].messages] == ["system", "user", "assistant", "user", "assistant"]

    lines = rows(source(FIXTURES / "llava.jsonl", "llava", system_prompt="You see images."))
    assert [s.origin.rsplit(":", 1)[1] for s in lines] == ["1", "3"]  # line 2 is blank
    assert lines[0].messages[0] == {"role": "system", "content": "You see images."}
    assert lines[1].images == [] and lines[1].n_placeholders == 0  # text-only rows are fine


def test_messages_parts_become_placeholders():
    samples = rows(source(FIXTURES / "messages.jsonl", "messages"))
    assert all(isinstance(s, Sample) for s in samples)
    assert samples[0].messages[0]["content"] == "<image>\nWhat colour is it?"
    assert samples[0].images == [BLUE]
    assert samples[1].images == [RED, RGBA] and samples[1].n_placeholders == 2
    assert samples[1].messages[2]["content"] == "<think>red vs green</think>\n<answer>no</answer>"
    assert samples[2].images == []


def test_messages_inline_image_paths(tmp_path):
    (tmp_path / "i.png").write_bytes(Path(RED).read_bytes())
    row = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Look: "}, {"type": "image", "image": "i.png"}],
            },
            {"role": "assistant", "content": "red"},
        ]
    }
    (sample,) = rows(source(write(tmp_path / "m.jsonl", json.dumps(row)), "messages"))
    assert sample.messages[0]["content"] == "Look: <image>"
    assert sample.images == [str(tmp_path / "i.png")]


def test_rl_rows():
    template = "{question} Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
    samples = rows(source(FIXTURES / "rl.jsonl", "rl", question_template=template))
    r1, r2, r3, r4 = samples
    assert r1.messages == [
        {
            "role": "user",
            "content": "<image>\n" + template.format(question="How many red rectangles are there?"),
        }
    ]
    assert r1.answer == "<answer> 1 </answer>"  # raw gold: rewards extract it
    assert r1.meta == {"id": "r1", "family": "count"} and "box" not in r1.meta
    assert r2.messages[0]["content"].startswith("<image>\nWhere is")  # "question" works like "problem"
    assert r2.meta["box"] == [0, 0, 8, 6]
    assert r3.messages[0]["content"].count("<image>") == 1  # the question had one: none prepended
    assert (r3.answer, r3.meta["box"]) == ("[1, 1, 5, 7]", [1, 1, 5, 7])
    assert (r4.images, r4.answer, r4.messages[0]["content"].startswith("What is 3 + 4?")) == ([], "7", True)


def test_r1_onevision_keeps_only_judged_valid_rows():
    out = rows(source(FIXTURES / "r1_onevision.jsonl", "r1_onevision"))
    kinds = [type(r).__name__ for r in out]
    assert kinds == ["Sample", "FilteredRow", "FilteredRow", "Sample", "FilteredRow"]
    assert (out[0].answer, out[3].answer) == ("red", "4")
    assert out[0].meta == {"id": "o1"}  # verdict fields are not carried along
    assert (
        "incorrect" in out[1].reason and "filter False" in out[2].reason and "not recognised" in out[4].reason
    )


@pytest.mark.parametrize(
    "value, verdict",
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        ("valid", True),
        ("Yes. The reasoning is correct.", True),
        ("No, the answer is incorrect.", False),
        ("The answer is not correct", False),
        ("[[Correct]]", True),
        ("Maybe.", None),
        (None, None),
    ],
)
def test_judge_verdict(value, verdict):
    assert judge_verdict(value) is verdict


@pytest.mark.parametrize(
    "value, box",
    [
        ([1, 2, 3, 4], [1, 2, 3, 4]),
        ("[1, 2, 3, 4]", [1, 2, 3, 4]),
        ("<answer> [1.5, 2, 3, 4] </answer>", [1.5, 2, 3, 4]),
        ("[1, 2, 3]", None),
        ("3", None),
        ("[1, 2, 3, true]", None),
        ("[a, b]", None),
        ([1, 2, 3, float("nan")], None),
    ],
)
def test_parse_box(value, box):
    assert parse_box(value) == box


def test_hf_parquet_with_column_mapping():
    src = source(
        FIXTURES / "hf" / "rl.parquet",
        "hf",
        image_root=str(FIXTURES),
        columns={"image": "img", "answer": "gold"},
    )
    out = rows(src)
    assert [s.origin for s in out] == [f"{FIXTURES}/hf/rl.parquet[{i}]" for i in range(3)]
    assert [s.images for s in out] == [[RED], [BLUE], []]
    assert [s.answer for s in out] == ["1", "blue", "7"]
    assert out[0].messages[0]["content"] == "<image>\nHow many red squares?"
    assert out[0].meta == {"family": "count"}


def test_hf_missing_answer_column_is_a_file_problem():
    (problem,) = rows(source(FIXTURES / "hf" / "rl.parquet", "hf", columns={"answer": "solution"}))
    assert isinstance(problem, RowProblem) and problem.kind == "file"
    assert (
        "columns.answer is 'solution', which is not a column" in problem.reason and "gold" in problem.reason
    )


def test_hf_load_from_disk_with_decoded_images_and_splits(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        }
    )
    data = {
        "image": [Image.open(RED), Image.open(BLUE)],
        "messages": [
            [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "red"}],
            [
                {"role": "user", "content": "Colour?"},
                {"role": "assistant", "content": "blue"},
            ],  # no placeholder
        ],
    }
    ds = datasets.Dataset.from_dict(data, features=features)
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    train = rows(source(tmp_path / "dd", "hf"))
    assert isinstance(train[0], Sample) and isinstance(train[0].images[0], Image.Image)
    assert train[0].images[0].size == (8, 6) and train[0].origin == f"{tmp_path}/dd[0]"
    assert isinstance(train[1], RowProblem)
    assert train[1].reason.startswith(
        "0 <image> placeholders but 1 image (rows written without placeholders: "
    )
    assert "set insert_image_placeholders: true on the source" in train[1].reason
    assert len(rows(source(tmp_path / "dd", "hf", split="test"))) == 1
    (missing,) = rows(source(tmp_path / "dd", "hf", split="validation"))
    assert "no split 'validation' (splits: train, test)" in missing.reason


@pytest.mark.parametrize(
    "content, origin, kind, reason",
    [
        (b'[{"conversations": []}, 3]', ":[0]", "row", "'conversations' must be a non-empty list"),
        (b'[{"conversations": []}, 3]', ":[1]", "row", "expected a JSON object, got int"),
        (b'[\n{"a": 1},\n{"a": \n]', ":4", "json", "the whole array is unreadable"),
        (b'[\n{"a": "\xff"}]', ":2", "utf8", "byte 0xff"),
        (b'["x"]\n', ":[0]", "row", "expected a JSON object, got str"),
        (b'{"conversations": [{"from": "robot", "value": "hi"}]}\n', ":1", "row", "role 'robot'"),
        (b'{"conversations": [{"from": "gpt", "value": "hi"}]}\n', ":1", "row", "no user turn"),
        (
            b'{"image": 5, "conversations": [{"from": "human", "value": "hi"}]}\n',
            ":1",
            "row",
            "must be a path",
        ),
        (b'{"conversations": [{"from": "human", "value": 5}]}\n', ":1", "row", "must be a string or a list"),
    ],
)
def test_llava_row_problems(tmp_path, content, origin, kind, reason):
    path = write(tmp_path / "d.json", content)
    found = [
        r for r in rows(source(path, "llava")) if isinstance(r, RowProblem) and r.origin == f"{path}{origin}"
    ]
    assert len(found) == 1, rows(source(path, "llava"))
    assert found[0].kind == kind and reason in found[0].reason


def test_missing_file_is_one_problem(tmp_path):
    (problem,) = rows(source(tmp_path / "nope.jsonl", "rl"))
    assert (problem.origin, problem.kind, problem.reason) == (
        str(tmp_path / "nope.jsonl"),
        "file",
        "data file not found",
    )


def test_image_root_and_outside_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    row = {"image": "../a.png", "problem": "q", "solution": "s"}
    path = write(tmp_path / "d.jsonl", json.dumps(row))
    (problem,) = rows(source(path, "rl", image_root=str(tmp_path / "imgs")))
    assert problem.kind == "image-path" and "escapes image_root" in problem.reason
    (sample,) = rows(source(path, "rl", image_root=str(tmp_path / "imgs"), allow_outside_root=True))
    assert sample.images == [str(tmp_path / "a.png")]


# ---------------------------------------------------------------- images


@pytest.mark.parametrize(
    "ref, allowed, expected",
    [
        ("a.png", False, "ROOT/a.png"),
        ("sub/../a.png", False, "ROOT/a.png"),
        ("../a.png", False, "escapes image_root"),
        ("sub/../../a.png", False, "escapes image_root"),
        ("/etc/passwd", False, "is absolute"),
        ("/etc/passwd", True, "/etc/passwd"),
        ("../a.png", True, "PARENT/a.png"),
        ("", False, "non-empty path"),
    ],
)
def test_resolve_image(tmp_path, ref, allowed, expected):
    root = tmp_path / "root"
    if expected.startswith(("ROOT", "PARENT", "/")):
        out = resolve_image(ref, root, allowed)
        assert str(out) == expected.replace("ROOT", str(root)).replace("PARENT", str(tmp_path))
    else:
        with pytest.raises(AlignError, match=expected):
            resolve_image(ref, root, allowed)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK", "I;16", "LA"])
def test_load_image_converts_every_mode_to_rgb(tmp_path, mode):
    path = tmp_path / f"img.{'tiff' if mode == 'CMYK' else 'png'}"
    Image.new("RGB", (5, 3), (200, 100, 50)).convert(mode).save(path)
    image = load_image(path, max_pixels=100)
    assert image.mode == "RGB" and image.size == (5, 3)


def test_transparency_becomes_white():
    image = load_image(RGBA, max_pixels=100)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent half
    assert image.getpixel((3, 0)) == (0, 200, 0)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait (rotate 90 degrees clockwise)
    Image.new("RGB", (20, 10), (0, 0, 255)).save(path, exif=exif)
    assert load_image(path, max_pixels=1000).size == (10, 20)
    assert image_size(path, max_pixels=1000) == (10, 20)


def test_pixel_limit_names_file_and_pixels():
    with pytest.raises(ImageTooLarge, match=r"red.png: 8x6 = 48 pixels exceeds max_image_pixels 47"):
        load_image(RED, max_pixels=47)
    with pytest.raises(ImageTooLarge, match="48 pixels"):
        image_size(RED, max_pixels=47)
    assert load_image(RED, max_pixels=48).size == (8, 6)


def test_the_recipe_pixel_limit_is_the_only_one(tmp_path, monkeypatch):
    # PIL refuses images over 2x its global limit; data.max_image_pixels must be able to raise it past that
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    assert load_image(RED, max_pixels=10_000).size == (8, 6)
    assert Image.MAX_IMAGE_PIXELS == 10  # put back
    with pytest.raises(ImageTooLarge, match=r"red.png: 8x6 = 48 pixels exceeds max_image_pixels 47"):
        load_image(RED, max_pixels=47)


def test_corrupt_and_truncated_images(tmp_path):
    with pytest.raises(ImageUnreadable, match=r"corrupt.png: not an image file PIL can read \(23 bytes\)"):
        load_image(FIXTURES / "images" / "corrupt.png", max_pixels=100)
    big = tmp_path / "big.png"
    Image.effect_noise((64, 64), 50).save(big)
    truncated = write(tmp_path / "truncated.png", big.read_bytes()[:300])
    assert image_size(truncated, max_pixels=10_000) == (64, 64)  # the header is intact
    with pytest.raises(ImageUnreadable, match=r"truncated\.png: corrupt or truncated"):
        load_image(truncated, max_pixels=10_000)


# ---------------------------------------------------------------- mixing


@pytest.mark.parametrize(
    "spec, expected",
    [("all", list(range(10))), ("first:3", [0, 1, 2]), ("end:2", [8, 9]), ("first:30", list(range(10)))],
)
def test_apply_sampling(spec, expected):
    assert apply_sampling(list(range(10)), parse_sampling(spec), seed=0, name="a") == expected


def test_random_sampling_is_seeded_and_in_file_order():
    items = list(range(100))
    a = apply_sampling(items, parse_sampling("random:10"), seed=1, name="x")
    assert a == apply_sampling(items, parse_sampling("random:10"), seed=1, name="x")
    assert a == sorted(a) and len(set(a)) == 10
    assert a != apply_sampling(items, parse_sampling("random:10"), seed=2, name="x")
    assert a != apply_sampling(items, parse_sampling("random:10"), seed=1, name="y")


@pytest.mark.parametrize(
    "sampled, repeats, weights, sizes",
    [
        ([10, 20], [1, 3], [None, None], [10, 60]),
        ([100, 10], [1, 1], [None, 0.5], [100, 100]),  # 10 rows fill half the mix: 10 passes
        ([100, 10, 40], [1, 1, 1], [None, 0.2, 0.3], [100, 40, 60]),
        ([30, 10], [1, 1], [0.25, 0.75], [10, 30]),  # all weighted: T = 40 sampled rows
    ],
)
def test_mix_sizes(sampled, repeats, weights, sizes):
    assert mix_sizes(sampled, repeats, weights) == sizes


def test_take_whole_passes_then_seeded_remainder():
    out = take(list("abcd"), 10, seed=0, name="s")
    assert out[:8] == list("abcdabcd") and len(out) == 10 and set(out[8:]) <= set("abcd")
    assert out == take(list("abcd"), 10, seed=0, name="s")


def test_build_mix_counts_and_order(tmp_path):
    sources = [
        source(FIXTURES / "llava.json", "llava", name="captions", repeat=2),
        source(FIXTURES / "r1_onevision.jsonl", "r1_onevision", name="onevision", sampling="end:1"),
        source(FIXTURES / "rl.jsonl", "rl", name="rl", sampling="random:2"),
    ]
    mix, report = build_mix(sources, seed=0)
    assert [s.source for s in mix] == ["captions"] * 4 + ["onevision"] + ["rl"] * 2
    assert [s.origin.rsplit("/", 1)[1] for s in mix[:4]] == ["llava.json:[0]", "llava.json:[1]"] * 2
    assert mix[4].meta["id"] == "o4"  # end:1 of the two valid rows
    counts = {c.name: (c.read, c.problems, c.filtered, c.kept, c.sampled, c.mixed) for c in report.sources}
    assert counts == {
        "captions": (2, 0, 0, 2, 2, 4),
        "onevision": (5, 0, 3, 2, 1, 1),
        "rl": (4, 0, 0, 4, 2, 2),
    }
    table = report.table().splitlines()
    assert table[0].split() == ["source", "read", "problems", "filtered", "kept", "sampled", "mixed"]
    assert table[3].split() == ["onevision", "5", "0", "3", "2", "1", "1"]
    assert table[-1].split() == ["total", "7"]
    again, _ = build_mix(sources, seed=0)
    assert [s.origin for s in again] == [s.origin for s in mix]


def test_build_mix_strict_refuses_problems_and_lenient_skips_them():
    sources = [source(FIXTURES / "broken_rl.jsonl", "rl", name="broken")]
    with pytest.raises(AlignError, match=r"4 bad data rows \(first: .*broken_rl.jsonl:3: malformed box"):
        build_mix(sources, seed=0)
    mix, report = build_mix(sources, seed=0, strict=False)
    assert (
        len(mix) == 2 and report.sources[0].problems == 4
    )  # box-outside needs the image: `data check` finds it
    assert [p.origin.rsplit(":", 1)[1] for p in report.problems] == ["3", "4", "5", "6"]


def test_weighted_source_without_rows_is_an_error(tmp_path):
    empty = write(tmp_path / "empty.jsonl", "")
    sources = [source(FIXTURES / "rl.jsonl", "rl", name="a"), source(empty, "rl", name="b", weight=0.5)]
    with pytest.raises(AlignError, match=r"data source 'b' \(.*empty.jsonl\): the file has no rows"):
        build_mix(sources, seed=0)


def test_filtered_rows_are_not_problems():
    out = rows(source(FIXTURES / "r1_onevision.jsonl", "r1_onevision"))
    assert not any(isinstance(r, RowProblem) for r in out)
    assert sum(isinstance(r, FilteredRow) for r in out) == 3


@pytest.mark.parametrize(
    "body", [b'{"problem": "q", "solution": "a"}\n', b'[{"problem": "q", "solution": "a"}]']
)
def test_utf8_bom_is_accepted(tmp_path, body):
    (sample,) = rows(source(write(tmp_path / "bom.json", b"\xef\xbb\xbf" + body), "rl"))
    assert isinstance(sample, Sample) and sample.answer == "a"


# ------------------------------------------------ published layouts: no placeholders, golds in conversations


def _jsonl(path: Path, records: list[dict]) -> Path:
    Image.new("RGB", (8, 6), (1, 2, 3)).save(path.parent / "a.png")
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def test_conversations_without_placeholders_are_refused_naming_the_key_or_get_them_when_asked(
    tmp_path,
) -> None:
    """ms-swift and R1-Onevision's RL rows name their images beside messages with no <image> in them."""
    record = {
        "images": ["a.png"],
        "messages": [
            {"role": "system", "content": "Think first."},
            {"role": "user", "content": "How many?"},
            {"role": "assistant", "content": "<answer>2</answer>"},
        ],
    }
    path = _jsonl(tmp_path / "swift.jsonl", [record])
    (refused,) = rows(source(path, "messages"))
    assert isinstance(refused, RowProblem) and "insert_image_placeholders: true" in refused.reason
    (sample,) = rows(source(path, "messages", insert_image_placeholders=True))
    assert [m["content"] for m in sample.messages] == [
        "Think first.",
        "<image>\nHow many?",
        "<answer>2</answer>",
    ]
    two = _jsonl(tmp_path / "two.jsonl", [{**record, "images": ["a.png", "a.png"]}])
    (sample,) = rows(source(two, "messages", insert_image_placeholders=True))
    assert sample.messages[1]["content"] == "<image>\n<image>\nHow many?"
    # a row that has placeholders is read as written, a wrong count still refused
    wrong = _jsonl(
        tmp_path / "wrong.jsonl",
        [
            {
                **record,
                "images": ["a.png", "a.png"],
                "messages": [
                    {"role": "user", "content": "<image>\nHow many?"},
                    {"role": "assistant", "content": "2"},
                ],
            }
        ],
    )
    (refused,) = rows(source(wrong, "messages", insert_image_placeholders=True))
    assert refused.reason == "1 <image> placeholder but 2 images"


@pytest.mark.parametrize(
    ("last", "gold"),
    [
        ("<answer>3</answer>", "3"),  # VLM-R1 grpo_jsonl: the gpt turn, its <answer> content
        ("<think>count</think><answer>B</answer>", "B"),
        ("left", "left"),  # VisualThinker SAT: the answer as written
    ],
)
def test_the_gold_of_a_conversation_row_is_its_last_assistant_turn(tmp_path, last: str, gold: str) -> None:
    record = {
        "id": 1,
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>How many?"}, {"from": "gpt", "value": last}],
        "accu_reward_method": "default",
    }
    (sample,) = rows(source(_jsonl(tmp_path / "vlmr1.jsonl", [record]), "llava"))
    assert sample.answer is None and sample.gold == gold
    assert sample.meta["accu_reward_method"] == "default"
    question = Sample("s", "x:1", [{"role": "user", "content": "q"}], answer="7")
    assert question.gold == "7"
    assert Sample("s", "x:1", [{"role": "user", "content": "q"}]).gold is None
