"""Scenes for ``align data synth``: 1-6 coloured shapes on a plain canvas, with exact ground truth.

A scene is a 3x3 grid of cells; each object sits inside its own cell, so objects never overlap and
"above" / "to the left of" / "at the top left" are true by construction. Boxes are ``[x1, y1, x2, y2]`` in
image pixels, ``x2``/``y2`` exclusive. Everything is drawn from a ``random.Random`` the caller seeds.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections import Counter
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
}
BACKGROUND = (245, 245, 245)
GRID = 3
MAX_OBJECTS = 6
MIN_IMAGE_SIZE = 24  # cells of 8 pixels: the smallest shape still has a recognisable outline
_POSITIONS = (
    ("top left", "top", "top right"),
    ("left", "centre", "right"),
    ("bottom left", "bottom", "bottom right"),
)
ATTRIBUTES = ("colour", "shape", "position")  # what :func:`distractor` can change
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six")


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    row: int  # grid cell, 0 = top
    col: int  # grid cell, 0 = left
    box: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def where(self) -> str:
        """'at the top left', 'in the centre', 'on the left'."""
        position = _POSITIONS[self.row][self.col]
        if position == "centre":
            return "in the centre"
        if position in ("left", "right"):
            return f"on the {position}"
        return f"at the {position}"


@dataclass(frozen=True)
class Scene:
    size: int
    objects: tuple[Obj, ...]  # reading order: top row first, left to right

    def count(self, colour: str | None = None, shape: str | None = None) -> int:
        return len(self.matching(colour, shape))

    def matching(self, colour: str | None = None, shape: str | None = None) -> list[int]:
        """0-based indices of the objects with this colour and/or shape."""
        return [
            i
            for i, o in enumerate(self.objects)
            if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)
        ]


def _cell_bounds(size: int, index: int) -> tuple[int, int]:
    return round(index * size / GRID), round((index + 1) * size / GRID)


def generate_scene(rng: random.Random, size: int) -> Scene:
    """A random scene of 1-6 non-overlapping objects on a ``size`` x ``size`` canvas."""
    n = rng.randint(1, MAX_OBJECTS)
    cells = sorted(rng.sample(range(GRID * GRID), n))
    objects = []
    for cell in cells:
        row, col = divmod(cell, GRID)
        x0, x1 = _cell_bounds(size, col)
        y0, y1 = _cell_bounds(size, row)
        room = min(x1 - x0, y1 - y0) - 2  # keep a pixel of background between neighbours
        side = rng.randint(max(4, room // 2), room)
        left = x0 + 1 + rng.randint(0, (x1 - x0 - 2) - side)
        top = y0 + 1 + rng.randint(0, (y1 - y0 - 2) - side)
        shape = rng.choice(SHAPES)
        colour = rng.choice(list(COLOURS))
        objects.append(Obj(shape, colour, row, col, (left, top, left + side, top + side)))
    return Scene(size, tuple(objects))


def draw_scene(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        x1, y1, x2, y2 = o.box
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
        else:
            draw.polygon([(x1, y2 - 1), ((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1)], fill=fill)
    return image


def plural(word: str, n: int) -> str:
    return word if n == 1 else f"{word}s"


def number(n: int) -> str:
    return _NUMBERS[n] if n < len(_NUMBERS) else str(n)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _tally(counter: Counter, pluralise: bool) -> list[str]:
    return [f"{number(n)} {plural(k, n) if pluralise else k}" for k, n in counter.most_common()]


def caption(scene: Scene, style: int) -> str:
    """One of three phrasings (``style`` 0-2): object list, spatial relations, counts."""
    objs = scene.objects
    n = len(objs)
    if style == 0:
        listed = _join([f"a {o.name} {o.where}" for o in objs])
        return f"{number(n).capitalize()} {plural('object', n)}: {listed}."
    if style == 1:
        if n == 1:
            return f"A single {objs[0].name} {objs[0].where}."
        pairs = []
        for i, (a, b) in enumerate(itertools.pairwise(objs)):
            relation = "above" if a.row < b.row else "to the left of"
            subject = f"a {a.name}" if i == 0 else f"the {a.name}"
            pairs.append(f"{subject} {relation} a {b.name}")
        text = ", and ".join(pairs)
        return f"{text[0].upper()}{text[1:]}."
    shapes = _join(_tally(Counter(o.shape for o in objs), pluralise=True))
    colours = _join(_tally(Counter(o.colour for o in objs), pluralise=False))
    return f"{number(n).capitalize()} {plural('object', n)} on a plain background: {shapes}; {colours}."


def distractor(scene: Scene, attribute: str, rng: random.Random) -> Scene:
    """``scene`` with one object's ``attribute`` changed (a position change moves it to an empty cell)."""
    objects = list(scene.objects)
    j = rng.randrange(len(objects))
    o = objects[j]
    if attribute == "colour":
        objects[j] = dataclasses.replace(o, colour=rng.choice([c for c in COLOURS if c != o.colour]))
    elif attribute == "shape":
        objects[j] = dataclasses.replace(o, shape=rng.choice([s for s in SHAPES if s != o.shape]))
    elif attribute == "position":
        taken = {(x.row, x.col) for x in objects}
        free = [divmod(c, GRID) for c in range(GRID * GRID) if divmod(c, GRID) not in taken]
        row, col = rng.choice(free)  # a scene has at most 6 of the 9 cells
        objects[j] = dataclasses.replace(o, row=row, col=col)
        objects.sort(key=lambda x: (x.row, x.col))  # captions list objects in reading order
    else:
        raise ValueError(f"attribute must be one of {', '.join(ATTRIBUTES)}, got {attribute!r}")
    return Scene(scene.size, tuple(objects))
