"""docs/outputs.md lists exactly the metric keys the stages log: one tiny SFT run and one tiny GRPO run (the golden
runs' settings, a few steps) are compared with the page's tables. Keys a table marks with a "when" other than
"always" may be absent; every logged key must be listed (``<name>`` / ``<component>`` stand for any name)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import golden_runs
import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "outputs.md"
TABLE = re.compile(r"<!-- metrics: (?P<stage>\w+) -->\n(?P<table>.*?)<!-- end metrics -->", re.DOTALL)
ROW = re.compile(r"^\| `(?P<key>[^`]+)` \| (?P<when>[^|]+?) \|", re.MULTILINE)

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def documented(stage: str) -> dict[str, str]:
    """key pattern -> when it is logged, from the page's table for ``stage``."""
    table = next(m["table"] for m in TABLE.finditer(DOC.read_text()) if m["stage"] == stage)
    return {m["key"]: m["when"] for m in ROW.finditer(table)}


def _pattern(key: str) -> re.Pattern:
    return re.compile(re.sub(r"<\w+>", "[^/]+", re.escape(key)) + "$")


@pytest.fixture(scope="module")
def work(siglip_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return golden_runs.prepare_inputs(tmp_path_factory.mktemp("outputs") / "work", siglip_qwen2)


@pytest.mark.parametrize(("stage", "run"), [("sft", "sft_padded"), ("grpo", "grpo")])
def test_documented_metric_keys_are_the_logged_ones(stage: str, run: str, work: Path, tmp_path: Path) -> None:
    out = tmp_path / run
    golden_runs.execute(run, work, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    logged = {k for row in rows for k in row}
    keys = documented(stage)
    patterns = {key: _pattern(key) for key in keys}
    undocumented = sorted(k for k in logged if not any(p.match(k) for p in patterns.values()))
    assert not undocumented, f"logged but not in docs/outputs.md: {undocumented}"
    missing = sorted(
        key for key, when in keys.items() if when == "always" and not any(map(patterns[key].match, logged))
    )
    assert not missing, f"in docs/outputs.md as always logged, but not logged: {missing}"
    listed = [line.split("`")[1] for line in DOC.read_text().splitlines() if line.startswith("| `")]
    for name in ("model", "metrics.jsonl", "summary.json", "recipe.resolved.yaml", "plots", ".align.lock"):
        assert (out / name).exists() and any(entry.rstrip("/").startswith(name) for entry in listed), name
