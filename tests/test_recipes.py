"""Every recipe shipped under recipes/ parses and validates against its schema (kind chosen by `kind:`).

Files named ``_*.yaml`` are partials: settings only read through another recipe's ``extends:``."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.config import load_any

ALL = sorted((Path(__file__).parent.parent / "recipes").rglob("*.y*ml"))
RECIPES = [p for p in ALL if not p.name.startswith("_")]
PARTIALS = [p for p in ALL if p.name.startswith("_")]


def test_there_are_recipes() -> None:
    kinds = {p.parent.name for p in RECIPES}
    assert {"tiny", "real"} <= kinds


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_recipe_validates(path: Path) -> None:
    load_any(path)


@pytest.mark.parametrize("partial", PARTIALS, ids=lambda p: p.name)
def test_every_partial_is_extended_by_a_recipe_in_its_folder(partial: Path) -> None:
    users = [p for p in RECIPES if p.parent == partial.parent and partial.name in p.read_text()]
    assert users, f"{partial} is extended by no recipe"
