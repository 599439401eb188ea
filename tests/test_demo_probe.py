"""The demo's attribute probe: distractors change exactly one attribute, pairs score by likelihood, and a model
folder is probed end to end (scores per scene, in [0, 1], the same on a second run)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from align.data.synth_scenes import ATTRIBUTES, Obj, Scene, caption, distractor
from align.demo_probe import attribute_probe, pair_score

SCENE = Scene(
    64,
    (
        Obj("circle", "red", 0, 0, (1, 1, 15, 15)),
        Obj("square", "blue", 1, 1, (22, 22, 38, 38)),
        Obj("triangle", "red", 2, 2, (45, 45, 60, 60)),
    ),
)


def _attrs(scene: Scene) -> list[tuple]:
    return [(o.colour, o.shape, o.row, o.col) for o in scene.objects]


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_a_distractor_changes_one_attribute_of_one_object(attribute: str, seed: int) -> None:
    other = distractor(SCENE, attribute, random.Random(seed))
    assert caption(other, 0) != caption(SCENE, 0)
    if attribute == "position":
        moved = set(_attrs(other)) - set(_attrs(SCENE))
        assert len(moved) == 1 and len({(o.row, o.col) for o in other.objects}) == 3
        assert [(o.row, o.col) for o in other.objects] == sorted((o.row, o.col) for o in other.objects)
        assert sorted(a[:2] for a in _attrs(other)) == sorted(a[:2] for a in _attrs(SCENE))
    else:
        field = 0 if attribute == "colour" else 1
        changed = [(a, b) for a, b in zip(_attrs(SCENE), _attrs(other), strict=True) if a != b]
        assert len(changed) == 1
        ((a, b),) = changed
        assert a[field] != b[field] and a[:field] + a[field + 1 :] == b[:field] + b[field + 1 :]


def test_unknown_attribute_is_refused() -> None:
    with pytest.raises(ValueError, match="attribute must be one of colour, shape, position"):
        distractor(SCENE, "size", random.Random(0))


@pytest.mark.parametrize(
    "true_logp, other_logp, score", [(-1.0, -2.0, 1.0), (-2.0, -1.0, 0.0), (-1.5, -1.5, 0.5)]
)
def test_pair_score(true_logp: float, other_logp: float, score: float) -> None:
    assert pair_score(true_logp, other_logp) == score


def test_probe_scores_every_scene_of_a_model_folder(tmp_path: Path, siglip_qwen2: Path) -> None:
    from align.data.synth import synthesize

    synthesize(tmp_path / "synth", train=0, test=5, image_size=64, seed=0)
    scores = attribute_probe(siglip_qwen2, tmp_path / "synth" / "test")
    assert set(scores) == {*ATTRIBUTES, "all"} and all(len(v) == 5 for v in scores.values())
    assert all(v in (0.0, 0.5, 1.0) for a in ATTRIBUTES for v in scores[a])
    assert scores["all"] == [sum(scores[a][i] for a in ATTRIBUTES) / 3 for i in range(5)]
    assert attribute_probe(siglip_qwen2, tmp_path / "synth" / "test") == scores
