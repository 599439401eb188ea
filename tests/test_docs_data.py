"""Every example row in docs/data.md is read as the page says: written to a file with small images, it passes
the reader, the checks of the stage it is shown for and the length check with a real tokenizer (0 problems)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from align.data.check import check_sources, length_fn_for_model, stage_row_check
from align.data.config import DataSource
from align.rewards import DEFAULT_REWARD_FUNCS

DOC = Path(__file__).resolve().parents[1] / "docs" / "data.md"
EXAMPLE = re.compile(r"<!-- example: (?P<attrs>[^>]*) -->\n```json\n(?P<row>.*?)\n```", re.DOTALL)


def examples() -> list[tuple[dict[str, str], str]]:
    found = [
        (dict(a.split("=") for a in m["attrs"].split()), m["row"]) for m in EXAMPLE.finditer(DOC.read_text())
    ]
    assert len(found) == DOC.read_text().count("```json"), "every json block is marked as an example"
    return found


def _image_paths(value) -> list[str]:
    """Every string under an image key of a row (``image``, ``images``, an image part's ``image``/``path``)."""
    if isinstance(value, dict):
        found = []
        for key, item in value.items():
            if key in ("image", "images", "path") and isinstance(item, (str, list)):
                found += [p for p in ([item] if isinstance(item, str) else item) if isinstance(p, str)]
            else:
                found += _image_paths(item)
        return found
    if isinstance(value, list):
        return [p for item in value for p in _image_paths(item)]
    return []


def test_the_page_has_an_example_of_every_format() -> None:
    assert {attrs["format"] for attrs, _ in examples()} == {"llava", "messages", "rl", "r1_onevision", "hf"}


@pytest.fixture(scope="module")
def length_fn(siglip_qwen2: Path):
    return length_fn_for_model(str(siglip_qwen2))


@pytest.mark.parametrize(("attrs", "row"), examples(), ids=lambda v: v if isinstance(v, str) else None)
def test_example_rows_pass_the_checks(attrs: dict[str, str], row: str, length_fn, tmp_path: Path) -> None:
    record = json.loads(row)
    for path in _image_paths(record):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / path)
    data = tmp_path / "rows.jsonl"
    data.write_text(row + "\n")
    source = DataSource(
        name="example",
        path=str(data),
        format=attrs["format"],
        insert_image_placeholders=attrs.get("insert_image_placeholders") == "true",
    )
    rewards = attrs["rewards"].split(",") if "rewards" in attrs else list(DEFAULT_REWARD_FUNCS)
    report = check_sources(
        [source],
        10**8,
        length_fn=length_fn,
        max_length=4096,
        row_check=stage_row_check(attrs["stage"], rewards),
    )
    assert report.problems == [] and report.sources[0].ok == 1
