"""ShapesQA scenes, questions and captions (the geometry and language half of SHAPESQA.md).

SHAPESQA.md is the contract, and evaluation sets are made by independent renderers that follow only
that page, so this module keeps its rules literally: question templates word for word, the 22 labels
in their order, the placement rules exactly. Import the public API from ``trainer.shapesqa``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

LABELS: tuple[str, ...] = (
    "yes",
    "no",
    "circle",
    "square",
    "triangle",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "large",
    "small",
    "left",
    "right",
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("large", "small")

COLOR_ZH: dict[str, str] = {
    "red": "红色",
    "green": "绿色",
    "blue": "蓝色",
    "yellow": "黄色",
    "purple": "紫色",
    "orange": "橙色",
}
SHAPE_ZH: dict[str, str] = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
SIZE_ZH: dict[str, str] = {"large": "大", "small": "小"}

QTYPES: tuple[str, ...] = ("shape", "size", "exists", "count", "side", "nearest", "farthest")
RELATIONAL: frozenset[str] = frozenset({"nearest", "farthest"})
LANGS: tuple[str, ...] = ("en", "zh")

# Bounding-box side as a fraction of the canvas side, before the +-10% jitter.
SIZE_FRACTION: dict[str, float] = {"large": 0.22, "small": 0.13}
SIZE_JITTER = 0.10
MARGIN_FRACTION = 0.02
MIDLINE_FRACTION = 0.05
RELATIONAL_MARGIN_FRACTION = 0.05
# The contract only forbids overlapping boxes; a small gap keeps neighbours visually separate after
# anti-aliasing, LANCZOS ringing and JPEG, so that every object stays countable in the pixels.
GAP_FRACTION = 0.01
MIN_GAP_PX = 1.0
# Coordinates are rounded so that a Scene and its JSON form are exactly the same numbers: every rule
# checked on the Scene then also holds for a reader of data.jsonl.
COORD_DECIMALS = 3
MIN_CANVAS = 32
SQRT3_2 = math.sqrt(3.0) / 2.0

EN_TEMPLATES: dict[str, str] = {
    "shape": "What shape is the {c} object?",
    "size": "Is the {c} object large or small?",
    "exists": "Is there a {c} {s}?",
    "count": "How many {s}s are there?",
    "side": "Is the {c} object on the left or the right?",
    "nearest": "What color is the object closest to the {c} object?",
    "farthest": "What shape is the object farthest from the {c} object?",
}
ZH_TEMPLATES: dict[str, str] = {
    "shape": "{c}的物体是什么形状？",
    "size": "{c}的物体是大还是小？",
    "exists": "图中有{c}的{s}吗？",
    "count": "图中有几个{s}？",
    "side": "{c}的物体在左边还是右边？",
    "nearest": "离{c}物体最近的物体是什么颜色？",
    "farthest": "离{c}物体最远的物体是什么形状？",
}


class NotAskable(ValueError):
    """A question of the requested type cannot be asked about this scene (relational margin rule)."""


@dataclass(frozen=True)
class SceneObject:
    """One object. ``(cx, cy)`` is the center of its bounding box; ``side`` is the box width in pixels."""

    color: str
    shape: str
    size: str
    cx: float
    cy: float
    side: float

    @property
    def width(self) -> float:
        return self.side

    @property
    def height(self) -> float:
        # An equilateral triangle with side s is s*sqrt(3)/2 high; circles and squares are s high.
        return self.side * SQRT3_2 if self.shape == "triangle" else self.side

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in continuous pixel coordinates (pixel i spans [i, i+1))."""
        hw, hh = self.width / 2.0, self.height / 2.0
        return (self.cx - hw, self.cy - hh, self.cx + hw, self.cy + hh)

    def to_dict(self) -> dict[str, Any]:
        return {
            "color": self.color,
            "shape": self.shape,
            "size": self.size,
            "cx": self.cx,
            "cy": self.cy,
            "side": self.side,
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> SceneObject:
        return SceneObject(
            color=str(d["color"]),
            shape=str(d["shape"]),
            size=str(d["size"]),
            cx=float(d["cx"]),
            cy=float(d["cy"]),
            side=float(d["side"]),
        )


@dataclass(frozen=True)
class Scene:
    """A canvas of ``size`` x ``size`` pixels, background gray level ``background``, and its objects."""

    size: int
    background: int
    objects: tuple[SceneObject, ...]

    def bboxes(self) -> list[tuple[float, float, float, float]]:
        return [o.bbox for o in self.objects]

    def by_color(self, color: str) -> SceneObject | None:
        for o in self.objects:
            if o.color == color:
                return o
        return None

    def left_to_right(self) -> list[SceneObject]:
        # cy breaks (measure-zero) ties so the order never depends on the tuple order.
        return sorted(self.objects, key=lambda o: (o.cx, o.cy))

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "background": self.background,
            "objects": [o.to_dict() for o in self.objects],
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Scene:
        return Scene(
            size=int(d["size"]),
            background=int(d.get("background", 255)),
            objects=tuple(SceneObject.from_dict(o) for o in d["objects"]),
        )


@dataclass(frozen=True)
class Question:
    text: str
    label: str
    qtype: str
    lang: str
    # Relational questions only: how far apart the best and the second-best distances are, as a
    # fraction of the canvas (at least RELATIONAL_MARGIN_FRACTION): how hard the question is.
    margin: float | None = None


# --------------------------------------------------------------------------------------------------
# Scenes


def _gap(size: int) -> float:
    return max(MIN_GAP_PX, GAP_FRACTION * size)


def _boxes_clear(a: tuple[float, float, float, float], b: tuple[float, float, float, float], gap: float) -> bool:
    """True when the boxes are at least ``gap`` apart along x or along y (so they do not overlap)."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _place(
    rng: random.Random,
    size: int,
    specs: Sequence[tuple[str, str, str, float]],
    tries_per_object: int,
) -> list[SceneObject] | None:
    """Random sequential placement; None when some object found no free spot (caller restarts)."""
    margin = MARGIN_FRACTION * size
    mid = size / 2.0
    mid_gap = MIDLINE_FRACTION * size
    gap = _gap(size)
    eps = 10.0**-COORD_DECIMALS  # keeps rounded coordinates inside the sampling range
    placed: list[SceneObject] = []
    for color, shape, sz, side in specs:
        h = side * SQRT3_2 if shape == "triangle" else side
        x_lo, x_hi = margin + side / 2.0 + eps, size - margin - side / 2.0 - eps
        y_lo, y_hi = margin + h / 2.0 + eps, size - margin - h / 2.0 - eps
        for _ in range(tries_per_object):
            cx = round(rng.uniform(x_lo, x_hi), COORD_DECIMALS)
            cy = round(rng.uniform(y_lo, y_hi), COORD_DECIMALS)
            if abs(cx - mid) <= mid_gap:
                continue
            obj = SceneObject(color=color, shape=shape, size=sz, cx=cx, cy=cy, side=side)
            box = obj.bbox
            if all(_boxes_clear(box, p.bbox, gap) for p in placed):
                placed.append(obj)
                break
        else:
            return None
    return placed


def sample_scene(rng: random.Random, size: int) -> Scene:
    """Sample a scene on an S x S canvas that keeps every placement rule of SHAPESQA.md.

    The object count, colors, shapes and sizes are drawn first and kept; only the placement is
    retried, so the content distribution is not biased towards easy-to-pack scenes. Large objects
    are placed first, which makes six large objects at S=64 pack in a handful of attempts.
    """
    if size < MIN_CANVAS:
        raise ValueError(f"canvas size {size} is below {MIN_CANVAS}")
    n = rng.randint(3, 6)
    colors = rng.sample(list(COLORS), n)
    specs: list[tuple[str, str, str, float]] = []
    # Shrunk by far more than the rounding step relative to the smallest side, so rounded sides stay
    # within +-10% of nominal.
    lo_f, hi_f = 1.0 - SIZE_JITTER + 2e-4, 1.0 + SIZE_JITTER - 2e-4
    for color in colors:
        shape = rng.choice(SHAPES)
        sz = rng.choice(SIZES)
        side = round(SIZE_FRACTION[sz] * size * rng.uniform(lo_f, hi_f), COORD_DECIMALS)
        specs.append((color, shape, sz, side))
    background = rng.randint(200, 255)
    order = sorted(range(n), key=lambda i: -specs[i][3])
    for _ in range(1000):
        placed = _place(rng, size, [specs[i] for i in order], tries_per_object=200)
        if placed is not None:
            by_index = dict(zip(order, placed, strict=True))
            return Scene(size=size, background=background, objects=tuple(by_index[i] for i in range(n)))
    raise RuntimeError(f"could not place {n} objects on a {size}px canvas")  # pragma: no cover


# --------------------------------------------------------------------------------------------------
# Questions


def _ranked(scene: Scene, ref: SceneObject, qtype: str) -> list[tuple[float, SceneObject]]:
    """(distance, object) of every other object, best first: nearest first for ``nearest``,
    farthest first for ``farthest``."""
    ranked = sorted(
        ((math.hypot(o.cx - ref.cx, o.cy - ref.cy), o) for o in scene.objects if o is not ref),
        key=lambda t: t[0],
    )
    if qtype == "farthest":
        ranked.reverse()
    return ranked


def _runner_up_gap(ranked: list[tuple[float, SceneObject]]) -> float | None:
    """How far apart the best and the second-best distances are; None with a single candidate."""
    return abs(ranked[0][0] - ranked[1][0]) if len(ranked) > 1 else None


def relational_margin(scene: Scene, qtype: str, color: str) -> float | None:
    """|best - second-best distance| / S of a nearest / farthest question about ``color``; None
    when the object has a single other object to compare with (or is not in the scene)."""
    obj = scene.by_color(color)
    if qtype not in RELATIONAL or obj is None:
        return None
    gap = _runner_up_gap(_ranked(scene, obj, qtype))
    return gap / scene.size if gap is not None else None


def answer(scene: Scene, qtype: str, *, color: str | None = None, shape: str | None = None) -> str | None:
    """The label that answers ``qtype`` about ``color`` / ``shape``; None when it must not be asked.

    None means: the color is not in the scene (for every type but ``exists`` and ``count``), or a
    relational question's best and second-best distances differ by less than 0.05*S.
    """
    if qtype == "exists":
        if color is None or shape is None:
            raise ValueError("exists needs a color and a shape")
        return "yes" if any(o.color == color and o.shape == shape for o in scene.objects) else "no"
    if qtype == "count":
        if shape is None:
            raise ValueError("count needs a shape")
        return str(sum(o.shape == shape for o in scene.objects))
    if qtype not in QTYPES:
        raise ValueError(f"unknown question type {qtype!r}")
    if color is None:
        raise ValueError(f"{qtype} needs a color")
    obj = scene.by_color(color)
    if obj is None:
        return None
    if qtype == "shape":
        return obj.shape
    if qtype == "size":
        return obj.size
    if qtype == "side":
        return "left" if obj.cx < scene.size / 2.0 else "right"
    ranked = _ranked(scene, obj, qtype)
    gap = _runner_up_gap(ranked)
    if gap is not None and gap < RELATIONAL_MARGIN_FRACTION * scene.size:
        return None
    best = ranked[0][1]
    return best.color if qtype == "nearest" else best.shape


def question_text(qtype: str, lang: str, *, color: str | None = None, shape: str | None = None) -> str:
    """The question string, word for word from the SHAPESQA.md table."""
    if lang == "en":
        return EN_TEMPLATES[qtype].format(c=color or "", s=shape or "")
    if lang == "zh":
        return ZH_TEMPLATES[qtype].format(c=COLOR_ZH[color] if color else "", s=SHAPE_ZH[shape] if shape else "")
    raise ValueError(f"unknown language {lang!r}")


def make_question(
    scene: Scene,
    rng: random.Random,
    qtype: str,
    lang: str,
    *,
    color: str | None = None,
    shape: str | None = None,
) -> tuple[str, str] | None:
    """(question text, answer label), or None when the drawn question is not askable.

    Unpinned, ``color`` is drawn from the scene's objects, except for ``exists``, which draws yes or no
    with equal odds first and then a matching (present) or non-matching (absent) color/shape pair, so
    that the label stays balanced. ``count`` draws any of the three shapes.
    """
    if qtype == "exists":
        if color is None and shape is None:
            if rng.random() < 0.5:
                obj = rng.choice(scene.objects)
                color, shape = obj.color, obj.shape
            else:
                present = {(o.color, o.shape) for o in scene.objects}
                absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
                color, shape = rng.choice(absent)
        else:
            color = color if color is not None else rng.choice(list(COLORS))
            shape = shape if shape is not None else rng.choice(SHAPES)
    elif qtype == "count":
        shape = shape if shape is not None else rng.choice(SHAPES)
        color = None
    else:
        color = color if color is not None else rng.choice(scene.objects).color
        shape = None
    label = answer(scene, qtype, color=color, shape=shape)
    if label is None:
        return None
    return question_text(qtype, lang, color=color, shape=shape), label


def _pick_weighted(rng: random.Random, weights: Mapping[str, float]) -> str:
    names = [q for q in QTYPES if weights.get(q, 0.0) > 0.0]
    if not names:
        raise ValueError("qtype weights select no question type")
    unknown = set(weights) - set(QTYPES)
    if unknown:
        raise ValueError(f"unknown question types in weights: {sorted(unknown)}")
    return rng.choices(names, weights=[weights[q] for q in names])[0]


def sample_question(
    scene: Scene,
    rng: random.Random,
    lang: str | None = None,
    qtype: str | None = None,
    *,
    weights: Mapping[str, float] | None = None,
) -> Question:
    """Draw an askable question: type uniform over QTYPES (or by ``weights``), language about half each.

    For a relational type every color of the scene is tried (in random order) before giving up on
    the type, so that relational questions are not under-represented. If none is askable, a new type
    is drawn, unless ``qtype`` was fixed, in which case NotAskable is raised.
    """
    lang = lang if lang is not None else ("en" if rng.random() < 0.5 else "zh")
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}")
    if qtype is not None and qtype not in QTYPES:
        raise ValueError(f"unknown question type {qtype!r}")
    for _ in range(100):
        qt = qtype or (_pick_weighted(rng, weights) if weights is not None else rng.choice(QTYPES))
        if qt in RELATIONAL:
            colors = [o.color for o in scene.objects]
            rng.shuffle(colors)
            for c in colors:
                made = make_question(scene, rng, qt, lang, color=c)
                if made is not None:
                    return Question(made[0], made[1], qt, lang, relational_margin(scene, qt, c))
        else:
            made = make_question(scene, rng, qt, lang)
            if made is not None:
                return Question(made[0], made[1], qt, lang)
        if qtype is not None:
            raise NotAskable(f"no {qtype} question is askable about this scene")
    raise NotAskable("no askable question found")  # pragma: no cover - non-relational types always are


# --------------------------------------------------------------------------------------------------
# Captions


def _join(items: Sequence[str], sep: str, last: str) -> str:
    if len(items) <= 1:
        return "".join(items)
    return sep.join(items[:-1]) + last + items[-1]


def caption(scene: Scene, lang: str) -> str:
    """The objects from left to right, as size, color, shape (SHAPESQA.md, "Captions")."""
    objs = scene.left_to_right()
    if lang == "en":
        return _join([f"a {o.size} {o.color} {o.shape}" for o in objs], ", ", " and ")
    if lang == "zh":
        return _join([f"一个{SIZE_ZH[o.size]}的{COLOR_ZH[o.color]}{SHAPE_ZH[o.shape]}" for o in objs], "、", "和")
    raise ValueError(f"unknown language {lang!r}")
