"""ShapesQA generator against SHAPESQA.md.

The expected values here are restated from SHAPESQA.md (numbers, templates, labels), not imported
from the generator, so a drift in either shows up as a failure.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from trainer.shapesqa import (
    LABELS,
    QTYPES,
    RELATIONAL,
    NotAskable,
    RenderStyle,
    Scene,
    SceneObject,
    caption,
    encode_image,
    generate_main,
    make_question,
    render_scene,
    sample_question,
    sample_scene,
    split_seed,
    write_split,
)

SPEC_LABELS = "yes no circle square triangle red green blue yellow purple orange large small left right 0 1 2 3 4 5 6"
SPEC_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
SPEC_COLOR_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色"}
SPEC_SHAPE_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
SPEC_SIZE = {"large": 0.22, "small": 0.13}
SPEC_TEMPLATES = {
    "en": {
        "shape": "What shape is the {c} object?",
        "size": "Is the {c} object large or small?",
        "exists": "Is there a {c} {s}?",
        "count": "How many {s}s are there?",
        "side": "Is the {c} object on the left or the right?",
        "nearest": "What color is the object closest to the {c} object?",
        "farthest": "What shape is the object farthest from the {c} object?",
    },
    "zh": {
        "shape": "{c}的物体是什么形状？",
        "size": "{c}的物体是大还是小？",
        "exists": "图中有{c}的{s}吗？",
        "count": "图中有几个{s}？",
        "side": "{c}的物体在左边还是右边？",
        "nearest": "离{c}物体最近的物体是什么颜色？",
        "farthest": "离{c}物体最远的物体是什么形状？",
    },
}
RECORD_KEYS = {"image", "text", "label", "caption", "qtype", "lang", "scene"}

seeds = st.integers(min_value=0, max_value=2**32 - 1)
canvas = st.integers(min_value=64, max_value=512)
PROPERTY = settings(max_examples=80, deadline=None)


def box(o: SceneObject) -> tuple[float, float, float, float]:
    h = o.side * math.sqrt(3) / 2 if o.shape == "triangle" else o.side
    return (o.cx - o.side / 2, o.cy - h / 2, o.cx + o.side / 2, o.cy + h / 2)


def parse(text: str, lang: str, qtype: str) -> tuple[str | None, str | None]:
    """(color, shape) named by a question, read back through the spec's own template."""
    colors = {c: c for c in SPEC_RGB} if lang == "en" else {z: c for c, z in SPEC_COLOR_ZH.items()}
    shapes = {s: s for s in SPEC_SHAPE_ZH} if lang == "en" else {z: s for s, z in SPEC_SHAPE_ZH.items()}
    pattern = re.escape(SPEC_TEMPLATES[lang][qtype])
    pattern = pattern.replace(re.escape("{c}"), "(?P<c>" + "|".join(colors) + ")")
    pattern = pattern.replace(re.escape("{s}"), "(?P<s>" + "|".join(shapes) + ")")
    m = re.fullmatch(pattern, text)
    assert m is not None, f"{text!r} does not follow the {lang} {qtype} template"
    groups = m.groupdict()
    return (
        colors[groups["c"]] if groups.get("c") else None,
        shapes[groups["s"]] if groups.get("s") else None,
    )


def ranked(scene: Scene, color: str, farthest: bool) -> list[tuple[float, SceneObject]]:
    ref = next(o for o in scene.objects if o.color == color)
    d = [(math.dist((o.cx, o.cy), (ref.cx, ref.cy)), o) for o in scene.objects if o.color != color]
    return sorted(d, key=lambda t: t[0], reverse=farthest)


def expected_answer(scene: Scene, qtype: str, color: str | None, shape: str | None) -> str | None:
    if qtype == "exists":
        return "yes" if any(o.color == color and o.shape == shape for o in scene.objects) else "no"
    if qtype == "count":
        return str(sum(o.shape == shape for o in scene.objects))
    obj = next(o for o in scene.objects if o.color == color)
    if qtype == "shape":
        return obj.shape
    if qtype == "size":
        return obj.size
    if qtype == "side":
        return "left" if obj.cx < scene.size / 2 else "right"
    d = ranked(scene, obj.color, qtype == "farthest")
    if abs(d[0][0] - d[1][0]) < 0.05 * scene.size:
        return None
    return d[0][1].color if qtype == "nearest" else d[0][1].shape


# A hand-built scene (S=200), listed out of left-to-right order on purpose.
# Distances: red-blue 104.4, red-green 125.4, blue-green 130.9 (green's margin 5.5 < 0.05*200).
HAND = Scene(
    size=200,
    background=230,
    objects=(
        SceneObject("green", "triangle", "small", cx=160.0, cy=60.0, side=26.0),
        SceneObject("red", "circle", "large", cx=35.0, cy=50.0, side=44.0),
        SceneObject("blue", "square", "small", cx=65.0, cy=150.0, side=26.0),
    ),
)


def test_labels_are_the_spec_list() -> None:
    assert LABELS == tuple(SPEC_LABELS.split())
    assert set(QTYPES) == {"shape", "size", "exists", "count", "side", "nearest", "farthest"}
    assert RELATIONAL == {"nearest", "farthest"}


@PROPERTY
@given(seed=seeds, size=canvas)
def test_scenes_keep_every_placement_rule(seed: int, size: int) -> None:
    scene = sample_scene(random.Random(seed), size)
    assert scene.size == size
    assert 200 <= scene.background <= 255
    objs = scene.objects
    assert 3 <= len(objs) <= 6
    assert len({o.color for o in objs}) == len(objs)
    for o in objs:
        assert o.color in SPEC_RGB and o.shape in SPEC_SHAPE_ZH and o.size in SPEC_SIZE
        nominal = SPEC_SIZE[o.size] * size
        assert 0.9 * nominal <= o.side <= 1.1 * nominal
        x0, y0, x1, y1 = box(o)
        m = 0.02 * size
        assert x0 >= m and y0 >= m and x1 <= size - m and y1 <= size - m
        assert abs(o.cx - size / 2) > 0.05 * size
    for i, a in enumerate(objs):
        for b in objs[i + 1 :]:
            ax0, ay0, ax1, ay1 = box(a)
            bx0, by0, bx1, by1 = box(b)
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, (a, b)
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


@PROPERTY
@given(seed=seeds, size=canvas, qtype=st.sampled_from(sorted(QTYPES)), lang=st.sampled_from(["en", "zh"]))
def test_questions_follow_the_table_and_answers_recompute(seed: int, size: int, qtype: str, lang: str) -> None:
    rng = random.Random(seed)
    scene = sample_scene(rng, size)
    try:
        q = sample_question(scene, rng, lang=lang, qtype=qtype)
    except NotAskable:
        # Only a relational type may be unaskable, and then for every color of the scene.
        assert qtype in RELATIONAL
        assert all(expected_answer(scene, qtype, o.color, None) is None for o in scene.objects)
        return
    assert (q.qtype, q.lang) == (qtype, lang)
    assert q.label in LABELS
    color, shape = parse(q.text, lang, qtype)
    if qtype not in ("exists", "count"):
        assert color in {o.color for o in scene.objects}
    if qtype in RELATIONAL:
        assert color is not None
        d = ranked(scene, color, qtype == "farthest")
        assert abs(d[0][0] - d[1][0]) >= 0.05 * size
        assert q.margin == pytest.approx(abs(d[0][0] - d[1][0]) / size)
    else:
        assert q.margin is None
    assert q.label == expected_answer(scene, qtype, color, shape)


@PROPERTY
@given(seed=seeds, size=canvas)
def test_default_question_sampling_is_askable_and_correct(seed: int, size: int) -> None:
    rng = random.Random(seed)
    scene = sample_scene(rng, size)
    q = sample_question(scene, rng)
    color, shape = parse(q.text, q.lang, q.qtype)
    assert q.label in LABELS
    assert q.label == expected_answer(scene, q.qtype, color, shape)


def test_caption_exact_strings() -> None:
    assert caption(HAND, "en") == "a large red circle, a small blue square and a small green triangle"
    assert caption(HAND, "zh") == "一个大的红色圆形、一个小的蓝色正方形和一个小的绿色三角形"
    one = Scene(200, 230, HAND.objects[1:2])
    assert caption(one, "en") == "a large red circle"
    assert caption(one, "zh") == "一个大的红色圆形"
    two = Scene(200, 230, HAND.objects[1:])
    assert caption(two, "en") == "a large red circle and a small blue square"
    assert caption(two, "zh") == "一个大的红色圆形和一个小的蓝色正方形"


@pytest.mark.parametrize(
    ("qtype", "color", "shape", "en", "zh", "label"),
    [
        ("shape", "red", None, "What shape is the red object?", "红色的物体是什么形状？", "circle"),
        ("size", "blue", None, "Is the blue object large or small?", "蓝色的物体是大还是小？", "small"),
        ("exists", "green", "triangle", "Is there a green triangle?", "图中有绿色的三角形吗？", "yes"),
        ("exists", "red", "square", "Is there a red square?", "图中有红色的正方形吗？", "no"),
        ("count", None, "square", "How many squares are there?", "图中有几个正方形？", "1"),
        ("count", None, "circle", "How many circles are there?", "图中有几个圆形？", "1"),
        ("side", "red", None, "Is the red object on the left or the right?", "红色的物体在左边还是右边？", "left"),
        ("side", "green", None, "Is the green object on the left or the right?", "绿色的物体在左边还是右边？", "right"),
        (
            "nearest",
            "red",
            None,
            "What color is the object closest to the red object?",
            "离红色物体最近的物体是什么颜色？",
            "blue",
        ),
        (
            "farthest",
            "red",
            None,
            "What shape is the object farthest from the red object?",
            "离红色物体最远的物体是什么形状？",
            "triangle",
        ),
    ],
)
def test_exact_question_strings(qtype: str, color: str | None, shape: str | None, en: str, zh: str, label: str) -> None:
    rng = random.Random(0)
    assert make_question(HAND, rng, qtype, "en", color=color, shape=shape) == (en, label)
    assert make_question(HAND, rng, qtype, "zh", color=color, shape=shape) == (zh, label)


def test_relational_margin_makes_a_question_unaskable() -> None:
    rng = random.Random(0)
    # From green, red (125.4) and blue (130.9) differ by less than 0.05*200 = 10.
    for qtype in ("nearest", "farthest"):
        assert make_question(HAND, rng, qtype, "en", color="green") is None
    # Not every color is unaskable, so a sampler that retries colors always finds one here.
    for _ in range(20):
        q = sample_question(HAND, rng, qtype="nearest")
        assert "green" not in q.text and "绿色" not in q.text


def test_exists_is_balanced() -> None:
    rng = random.Random(7)
    answers: Counter[str] = Counter()
    for i in range(400):
        scene = sample_scene(random.Random(i), 64)
        made = make_question(scene, rng, "exists", "en")
        assert made is not None
        answers[made[1]] += 1
    assert 0.35 <= answers["yes"] / 400 <= 0.65


def test_type_and_language_mix_and_weights() -> None:
    rng = random.Random(3)
    scenes = [sample_scene(random.Random(i), 128) for i in range(50)]
    qs = [sample_question(scenes[i % 50], rng) for i in range(700)]
    by_type = Counter(q.qtype for q in qs)
    assert set(by_type) == set(QTYPES)
    assert all(50 <= c <= 150 for c in by_type.values()), by_type
    assert 0.4 <= sum(q.lang == "en" for q in qs) / 700 <= 0.6
    weighted = [sample_question(s, rng, weights={"nearest": 1.0, "farthest": 1.0}) for s in scenes]
    assert {q.qtype for q in weighted} <= RELATIONAL


def center_pixel(img: Image.Image, o: SceneObject) -> tuple[int, int, int]:
    px = img.getpixel((int(o.cx), int(o.cy)))
    assert isinstance(px, tuple)
    return (int(px[0]), int(px[1]), int(px[2]))


@pytest.mark.parametrize("raster", ["mask", "draw"])
@pytest.mark.parametrize("supersample", [1, 2, 4])
def test_render_colors_and_background(raster: str, supersample: int) -> None:
    img = render_scene(HAND, random.Random(1), RenderStyle(raster=raster, supersample=supersample))
    assert img.mode == "RGB" and img.size == (200, 200)
    for o in HAND.objects:
        got = center_pixel(img, o)
        assert all(abs(g - n) <= 12 + 2 for g, n in zip(got, SPEC_RGB[o.color], strict=True)), (o.color, got)
    for corner in ((0, 0), (199, 0), (0, 199), (199, 199)):
        assert img.getpixel(corner) == (230, 230, 230)
    # Where there is no object, only the background (away from any edge).
    patch = np.asarray(img)[95:125, 105:135]
    assert (patch == 230).all()


def test_render_noise_and_jitter_stay_in_contract() -> None:
    rng = random.Random(2)
    img = render_scene(HAND, rng, RenderStyle(noise_std=4.0, mono_noise=False))
    patch = np.asarray(img, dtype=np.float64)[95:125, 105:135]
    assert abs(patch.mean() - 230) < 1.0
    assert 3.0 < patch.std() < 5.0
    # The center pixels stay close: jitter (+-12) plus a few noise standard deviations.
    for o in HAND.objects:
        got = center_pixel(img, o)
        assert all(abs(g - n) <= 12 + 20 for g, n in zip(got, SPEC_RGB[o.color], strict=True))


@settings(max_examples=25, deadline=None)
@given(seed=seeds, size=st.integers(min_value=128, max_value=512))
def test_rendered_scenes_show_every_object(seed: int, size: int) -> None:
    rng = random.Random(seed)
    scene = sample_scene(rng, size)
    style = RenderStyle(
        raster=rng.choice(["mask", "draw"]),
        supersample=rng.choice([1, 2, 4]),
    )
    img = render_scene(scene, rng, style)
    assert img.size == (size, size)
    for o in scene.objects:
        got = center_pixel(img, o)
        assert all(abs(g - n) <= 12 + 3 for g, n in zip(got, SPEC_RGB[o.color], strict=True)), (o, got, style)
    g = scene.background
    px = img.getpixel((0, 0))
    assert isinstance(px, tuple) and all(abs(c - g) <= 3 for c in px)


def test_render_is_deterministic_and_random_styles_vary() -> None:
    a = render_scene(HAND, random.Random(5))
    b = render_scene(HAND, random.Random(5))
    assert a.tobytes() == b.tobytes()
    looks = {render_scene(HAND, random.Random(i)).tobytes() for i in range(8)}
    assert len(looks) == 8


def test_encode_image() -> None:
    img = render_scene(HAND, random.Random(0))
    png, ext = encode_image(img, random.Random(0), "png")
    assert ext == "png" and png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png)) as decoded:
        assert decoded.tobytes() == img.tobytes()
    jpg, ext = encode_image(img, random.Random(0), "jpeg")
    assert ext == "jpg" and jpg.startswith(b"\xff\xd8")
    exts = Counter(encode_image(img, random.Random(i), "mixed")[1] for i in range(40))
    assert set(exts) == {"png", "jpg"}
    with pytest.raises(ValueError):
        encode_image(img, random.Random(0), "webp")


def read_records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_write_split_is_deterministic_across_workers(tmp_path: Path) -> None:
    one = write_split(tmp_path / "w1", 12, seed=11, sizes=(64, 96), workers=1)
    two = write_split(tmp_path / "w2", 12, seed=11, sizes=(64, 96), workers=2)
    assert one == tmp_path / "w1" / "data.jsonl"
    assert one.read_bytes() == two.read_bytes()
    records = read_records(one)
    assert len(records) == 12
    for r in records:
        assert set(r) - {"margin"} == RECORD_KEYS
        image = str(r["image"])
        assert (one.parent / image).read_bytes() == (two.parent / image).read_bytes()
        with Image.open(one.parent / image) as im:
            scene_json = r["scene"]
            assert isinstance(scene_json, dict)
            assert im.size == (scene_json["size"], scene_json["size"]) and 64 <= im.size[0] <= 96
        scene = Scene.from_dict(scene_json)
        assert r["label"] in LABELS and r["qtype"] in QTYPES and r["lang"] in ("en", "zh")
        assert r["caption"] == caption(scene, str(r["lang"]))
        color, shape = parse(str(r["text"]), str(r["lang"]), str(r["qtype"]))
        assert r["label"] == expected_answer(scene, str(r["qtype"]), color, shape)
        if r["qtype"] in RELATIONAL:
            assert color is not None
            d = ranked(scene, color, r["qtype"] == "farthest")
            assert r["margin"] == round(abs(d[0][0] - d[1][0]) / scene.size, 4)
        else:
            assert "margin" not in r
    # Chinese is written as characters, not \\u escapes.
    text = one.read_text(encoding="utf-8")
    assert "\\u" not in text
    assert write_split(tmp_path / "w3", 12, seed=12, sizes=(64, 96), workers=1).read_bytes() != one.read_bytes()


def test_write_split_questions_per_scene_and_format(tmp_path: Path) -> None:
    path = write_split(tmp_path, 4, seed=0, sizes=(64, 64), fmt="jpeg", questions_per_scene=3, workers=1)
    records = read_records(path)
    assert len(records) == 12
    images = [r["image"] for r in records]
    assert images == [f"images/{i:06d}.jpg" for i in range(4) for _ in range(3)]
    for i in range(4):
        group = records[3 * i : 3 * i + 3]
        assert len({json.dumps(r["scene"]) for r in group}) == 1
        assert len({r["text"] for r in group}) == 3


def test_generate_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--out", str(tmp_path), "--train", "3", "--val", "2", "--seed", "4", "--max-size", "80", "--workers", "1"]
    assert generate_main(argv) == 0
    assert not (tmp_path / "test").exists()
    train = read_records(tmp_path / "train" / "data.jsonl")
    val = read_records(tmp_path / "val" / "data.jsonl")
    assert (len(train), len(val)) == (3, 2)
    assert not {json.dumps(r["scene"]) for r in train} & {json.dumps(r["scene"]) for r in val}
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("train: 3 scenes") and out[1].startswith("val: 2 scenes")
    with pytest.raises(SystemExit):
        generate_main(["--out", str(tmp_path)])


def test_split_seeds_never_collide() -> None:
    seen = {split_seed(s, split) for s in range(-50, 50) for split in ("train", "val", "test")}
    assert len(seen) == 300
