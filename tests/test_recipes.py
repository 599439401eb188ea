"""Every recipe shipped under recipes/ parses and validates against its schema (kind chosen by `kind:`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.config import load_any

RECIPES = sorted(p for p in (Path(__file__).parent.parent / "recipes").rglob("*.y*ml"))


def test_there_are_recipes() -> None:
    kinds = {p.parent.name for p in RECIPES}
    assert {"tiny", "real"} <= kinds


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_recipe_validates(path: Path) -> None:
    load_any(path)
