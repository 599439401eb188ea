"""Question families over a synth scene, each with a verifiable answer and a step-by-step derivation.

Families (the ``family`` tag of every SFT and RL row):

* ``count``: all objects, by colour, by shape, or by colour and shape;
* ``colour``: the colour of the only object of some shape;
* ``compare``: "Are there more A than B?" (yes / no), A and B two colours or two shapes;
* ``arithmetic``: the number of one colour's objects plus the number of another colour's shape;
* ``grounding``: the box ``[x1, y1, x2, y2]`` (image pixels) of a uniquely described object.

The reasoning lists the objects in reading order, then counts or looks up exactly what the question
asks, so an SFT model can learn a derivation that is true of the picture.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from align.data.synth_scenes import COLOURS, SHAPES, Scene, plural

FAMILIES = ("count", "colour", "compare", "arithmetic", "grounding")


@dataclass(frozen=True)
class Group:
    """Objects of a colour and/or shape (both None: every object)."""

    colour: str | None = None
    shape: str | None = None

    def noun(self, n: int) -> str:
        words = [w for w in (self.colour, self.shape or "object") if w]
        return " ".join([*words[:-1], plural(words[-1], n)])


@dataclass(frozen=True)
class Task:
    family: str
    question: str
    answer: str
    reasoning: str
    box: tuple[int, int, int, int] | None = None


def _listing(scene: Scene) -> str:
    lines = [f"{i + 1}. a {o.name} {o.where}" for i, o in enumerate(scene.objects)]
    return "I list the objects in the image row by row, from the top left:\n" + "\n".join(lines)


def _count(scene: Scene, group: Group) -> tuple[int, str]:
    """The count of ``group`` and the sentences that derive it from the listing."""
    idx = scene.matching(group.colour, group.shape)
    n = len(idx)
    if group == Group():
        return (
            n,
            f"Counting them: {', '.join(str(i + 1) for i in range(n))}. There {_are(n)} {n} {group.noun(n)}.",
        )
    if not idx:
        return 0, f"None of them is a {group.noun(1)}, so there are 0 {group.noun(0)}."
    members = ", ".join(f"{i + 1} ({scene.objects[i].name})" for i in idx)
    tally = ", ".join(str(k + 1) for k in range(n))
    return n, (
        f"The {group.noun(2)} in the list: {plural('object', n)} {members}. "
        f"Counting them: {tally}. There {_are(n)} {n} {group.noun(n)}."
    )


def _are(n: int) -> str:
    return "is" if n == 1 else "are"


def _pick_present(
    rng: random.Random, present: list[str], every: tuple[str, ...], p_present: float = 0.8
) -> str:
    """Mostly something in the picture, sometimes anything (so that 0 is a possible answer)."""
    return rng.choice(present) if present and rng.random() < p_present else rng.choice(every)


def count_task(scene: Scene, rng: random.Random) -> Task:
    colours = sorted({o.colour for o in scene.objects})
    shapes = sorted({o.shape for o in scene.objects})
    variant = rng.choice(("all", "colour", "shape", "both"))
    if variant == "all":
        group = Group()
    elif variant == "colour":
        group = Group(colour=_pick_present(rng, colours, tuple(COLOURS)))
    elif variant == "shape":
        group = Group(shape=_pick_present(rng, shapes, SHAPES))
    else:
        o = rng.choice(scene.objects)
        group = (
            Group(o.colour, o.shape)
            if rng.random() < 0.8
            else Group(rng.choice(tuple(COLOURS)), rng.choice(SHAPES))
        )
    n, derivation = _count(scene, group)
    question = f"How many {group.noun(2)} are there in the image?"
    return Task("count", question, str(n), f"{_listing(scene)}\n{derivation}")


def colour_task(scene: Scene, rng: random.Random) -> Task | None:
    unique = [s for s in SHAPES if scene.count(shape=s) == 1]
    if not unique:
        return None
    shape = rng.choice(unique)
    (i,) = scene.matching(shape=shape)
    o = scene.objects[i]
    reasoning = (
        f"{_listing(scene)}\nThe only {shape} is object {i + 1}, {o.where}, and it is {o.colour}. "
        f"So the {shape} is {o.colour}."
    )
    return Task("colour", f"What colour is the {shape}?", o.colour, reasoning)


def compare_task(scene: Scene, rng: random.Random) -> Task:
    attr = rng.choice(("colour", "shape"))
    every = tuple(COLOURS) if attr == "colour" else SHAPES
    present = sorted({getattr(o, attr) for o in scene.objects})
    if len(present) >= 2:
        a, b = rng.sample(present, 2)
    else:
        a = _pick_present(rng, present, every)
        b = rng.choice([v for v in every if v != a])
    ga, gb = Group(**{attr: a}), Group(**{attr: b})
    na, da = _count(scene, ga)
    nb, db = _count(scene, gb)
    verdict = f"{na} is more than {nb}, so yes." if na > nb else f"{na} is not more than {nb}, so no."
    question = f"Are there more {ga.noun(2)} than {gb.noun(2)} in the image? Answer yes or no."
    return Task("compare", question, "yes" if na > nb else "no", f"{_listing(scene)}\n{da}\n{db}\n{verdict}")


def arithmetic_task(scene: Scene, rng: random.Random) -> Task:
    ga = Group(colour=_pick_present(rng, sorted({o.colour for o in scene.objects}), tuple(COLOURS)))
    others = [o for o in scene.objects if o.colour != ga.colour]
    if others and rng.random() < 0.8:
        o = rng.choice(others)
        gb = Group(o.colour, o.shape)
    else:
        gb = Group(rng.choice([c for c in COLOURS if c != ga.colour]), rng.choice(SHAPES))
    na, da = _count(scene, ga)
    nb, db = _count(scene, gb)
    question = f"What is the number of {ga.noun(2)} plus the number of {gb.noun(2)}?"
    reasoning = f"{_listing(scene)}\n{da}\n{db}\nAdding the two counts: {na} + {nb} = {na + nb}."
    return Task("arithmetic", question, str(na + nb), reasoning)


def grounding_task(scene: Scene, rng: random.Random) -> Task | None:
    by_shape = [(Group(shape=s), scene.matching(shape=s)[0]) for s in SHAPES if scene.count(shape=s) == 1]
    by_both = [
        (Group(o.colour, o.shape), i)
        for i, o in enumerate(scene.objects)
        if scene.count(o.colour, o.shape) == 1
    ]
    candidates = by_shape or by_both
    if not candidates:
        return None
    group, i = rng.choice(candidates)
    o = scene.objects[i]
    x1, y1, x2, y2 = o.box
    desc = group.noun(1)
    question = (
        f"What is the bounding box of the {desc}? Answer with [x1, y1, x2, y2] in pixels of this "
        f"{scene.size}x{scene.size} image."
    )
    reasoning = (
        f"{_listing(scene)}\nThe {desc} is object {i + 1}, {o.where}. Its left edge is at x = {x1}, its top edge "
        f"at y = {y1}, its right edge at x = {x2} and its bottom edge at y = {y2}. "
        f"So its box is [{x1}, {y1}, {x2}, {y2}]."
    )
    return Task("grounding", question, f"[{x1}, {y1}, {x2}, {y2}]", reasoning, box=o.box)


_MAKERS = {
    "count": count_task,
    "colour": colour_task,
    "compare": compare_task,
    "arithmetic": arithmetic_task,
    "grounding": grounding_task,
}


def make_task(scene: Scene, family_index: int, rng: random.Random) -> Task:
    """The task of family ``FAMILIES[family_index % 5]``, or the next family that fits the scene."""
    for k in range(len(FAMILIES)):
        task = _MAKERS[FAMILIES[(family_index + k) % len(FAMILIES)]](scene, rng)
        if task is not None:
            return task
    raise AssertionError("count_task always fits")  # unreachable: count applies to every scene


def sft_reply(task: Task) -> str:
    return f"<think>\n{task.reasoning}\n</think>\n<answer>{task.answer}</answer>"
