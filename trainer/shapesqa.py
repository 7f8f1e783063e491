"""ShapesQA, the default task (SHAPESQA.md): the public API and the data-set writer.

Scenes, questions and captions live in ``trainer.shapesqa_scene``, rendering and encoding in
``trainer.shapesqa_render``; this module re-exports them and writes splits in the JSONL format that
the trainer reads for any data set (DESIGN.md, "Data set format").

Determinism: every scene's randomness comes from ``random.Random(f"{seed}:{index}:<part>")``, never
from global state, so a split is byte-identical for a seed whatever the number of worker processes,
and changing the image format does not change the scenes or the questions.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer.shapesqa_render import FORMATS, RenderStyle, encode_image, random_style, render_scene
from trainer.shapesqa_scene import (
    COLOR_ZH,
    COLORS,
    LABELS,
    LANGS,
    MIN_CANVAS,
    QTYPES,
    RELATIONAL,
    SHAPE_ZH,
    SHAPES,
    SIZE_ZH,
    SIZES,
    NotAskable,
    Question,
    Scene,
    SceneObject,
    answer,
    caption,
    make_question,
    question_text,
    sample_question,
    sample_scene,
)

__all__ = [
    "COLORS",
    "COLOR_ZH",
    "FORMATS",
    "LABELS",
    "LANGS",
    "QTYPES",
    "RELATIONAL",
    "SHAPES",
    "SHAPE_ZH",
    "SIZES",
    "SIZE_ZH",
    "SPLITS",
    "NotAskable",
    "Question",
    "RenderStyle",
    "Scene",
    "SceneObject",
    "answer",
    "caption",
    "encode_image",
    "generate_main",
    "make_question",
    "question_text",
    "random_style",
    "render_scene",
    "sample_question",
    "sample_scene",
    "split_seed",
    "write_split",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
MANIFEST = "data.jsonl"
# Retries for a question whose text the scene already has, when several are asked per scene.
_DISTINCT_TRIES = 10


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs; picklable, so it crosses into spawned processes."""

    out_dir: str
    seed: int
    sizes: tuple[int, int]
    fmt: str
    jpeg_quality: int | None
    questions_per_scene: int
    qtype_weights: tuple[tuple[str, float], ...] | None
    name_width: int


def _scene_lines(job: _Job, index: int) -> list[str]:
    key = f"{job.seed}:{index}"
    scene_rng = random.Random(f"{key}:scene")
    scene = sample_scene(scene_rng, scene_rng.randint(job.sizes[0], job.sizes[1]))
    img = render_scene(scene, random.Random(f"{key}:render"))
    data, ext = encode_image(img, random.Random(f"{key}:encode"), job.fmt, job.jpeg_quality)
    image = f"images/{index:0{job.name_width}d}.{ext}"
    (Path(job.out_dir) / image).write_bytes(data)

    weights = dict(job.qtype_weights) if job.qtype_weights is not None else None
    q_rng = random.Random(f"{key}:question")
    scene_json = scene.to_dict()
    seen: set[str] = set()
    lines = []
    for _ in range(job.questions_per_scene):
        q = sample_question(scene, q_rng, weights=weights)
        for _ in range(_DISTINCT_TRIES):
            if q.text not in seen:
                break
            q = sample_question(scene, q_rng, weights=weights)
        seen.add(q.text)
        record: dict[str, object] = {
            "image": image,
            "text": q.text,
            "label": q.label,
            "caption": caption(scene, q.lang),
            "qtype": q.qtype,
            "lang": q.lang,
            "scene": scene_json,
        }
        if q.margin is not None:
            record["margin"] = round(q.margin, 4)
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return lines


def _run_chunk(args: tuple[_Job, int, int]) -> list[str]:
    job, start, stop = args
    lines: list[str] = []
    for index in range(start, stop):
        lines.extend(_scene_lines(job, index))
    return lines


def write_split(
    out_dir: Path,
    n: int,
    seed: int,
    *,
    sizes: tuple[int, int] = (64, 512),
    fmt: str = "mixed",
    jpeg_quality: int | None = None,
    questions_per_scene: int = 1,
    qtype_weights: Mapping[str, float] | None = None,
    workers: int | None = None,
) -> Path:
    """Write ``n`` scenes to ``out_dir/images/`` and their records to ``out_dir/data.jsonl``.

    There are ``n * questions_per_scene`` records; a scene's records share its image. The canvas
    side of each scene is uniform in ``sizes`` (inclusive). ``qtype_weights`` maps question types to
    relative weights (missing types get 0); None is uniform. ``workers`` defaults to the CPU count.
    Returns the path of data.jsonl, which is written to a temporary name and renamed, so a reader
    never sees a half-written manifest.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    lo, hi = sizes
    if not MIN_CANVAS <= lo <= hi:
        raise ValueError(f"sizes must satisfy {MIN_CANVAS} <= min <= max, got {sizes}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}")
    if questions_per_scene < 1:
        raise ValueError("questions_per_scene must be >= 1")
    weights: tuple[tuple[str, float], ...] | None = None
    if qtype_weights is not None:
        unknown = set(qtype_weights) - set(QTYPES)
        if unknown or not any(w > 0 for w in qtype_weights.values()):
            raise ValueError(f"bad qtype weights {dict(qtype_weights)}")
        weights = tuple((q, float(qtype_weights.get(q, 0.0))) for q in QTYPES)
    workers = (os.cpu_count() or 1) if workers is None else workers

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    job = _Job(
        out_dir=str(out_dir),
        seed=seed,
        sizes=(lo, hi),
        fmt=fmt,
        jpeg_quality=jpeg_quality,
        questions_per_scene=questions_per_scene,
        qtype_weights=weights,
        name_width=max(6, len(str(max(n - 1, 0)))),
    )
    # Several chunks per worker balance the load (canvas sizes vary 64x in area); bounded so that
    # results stream to the file in order without piling up in memory.
    chunk = max(1, min(64, math.ceil(n / (max(workers, 1) * 4))))
    chunks = [(job, start, min(start + chunk, n)) for start in range(0, n, chunk)]
    manifest = out_dir / MANIFEST
    tmp = out_dir / f".{MANIFEST}.tmp"
    with tmp.open("w", encoding="utf-8", newline="\n") as fh:
        if workers <= 1 or len(chunks) <= 1:
            for c in chunks:
                fh.writelines(_run_chunk(c))
        else:
            # spawn, not fork: the caller may be a training process with torch/OpenMP threads,
            # which fork can deadlock.
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(processes=min(workers, len(chunks))) as pool:
                for lines in pool.imap(_run_chunk, chunks):
                    fh.writelines(lines)
    os.replace(tmp, manifest)
    return manifest


def split_seed(seed: int, split: str) -> int:
    """Per-split seed: a bijection from (seed, split), so no two splits of any seeds share scenes."""
    return seed * len(SPLITS) + SPLITS.index(split)


def _parse_weights(text: str) -> dict[str, float]:
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in QTYPES:
            raise argparse.ArgumentTypeError(f"expected TYPE=WEIGHT,... with TYPE in {', '.join(QTYPES)}; got {part!r}")
        try:
            weights[name] = float(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"bad weight {value!r}") from exc
    return weights


def generate_main(argv: Sequence[str]) -> int:
    """CLI: ``python -m trainer data shapesqa --out DIR --train N --val N --test N --seed S ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer data shapesqa",
        description="Generate ShapesQA splits as DIR/{train,val,test}/data.jsonl + images/.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder; one subfolder per split")
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=int, default=0, metavar="N", help=f"{split} scenes (0 skips it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=64, help="smallest canvas side in pixels")
    parser.add_argument("--max-size", type=int, default=512, help="largest canvas side in pixels")
    parser.add_argument("--format", choices=FORMATS, default="mixed", help="image encoding")
    parser.add_argument(
        "--jpeg-quality", type=int, default=None, metavar="Q", help="fixed JPEG quality (default: uniform 60..100)"
    )
    parser.add_argument("--questions-per-scene", type=int, default=1, metavar="K")
    parser.add_argument(
        "--qtype-weights",
        type=_parse_weights,
        default=None,
        metavar="TYPE=W,...",
        help="relative question-type weights, e.g. nearest=2,farthest=2 (unlisted types get 0)",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(list(argv))
    counts = {split: int(getattr(args, split)) for split in SPLITS}
    if any(c < 0 for c in counts.values()) or not any(counts.values()):
        parser.error("give at least one of --train/--val/--test with N > 0 (and none negative)")
    if not MIN_CANVAS <= args.min_size <= args.max_size:
        parser.error(f"need {MIN_CANVAS} <= --min-size <= --max-size")
    if args.jpeg_quality is not None and not 1 <= args.jpeg_quality <= 100:
        parser.error("--jpeg-quality must be in 1..100")
    if args.questions_per_scene < 1:
        parser.error("--questions-per-scene must be >= 1")
    if args.qtype_weights is not None:
        weights: dict[str, float] = args.qtype_weights
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            parser.error("--qtype-weights needs non-negative weights, at least one positive")
    for split, n in counts.items():
        if n == 0:
            continue
        t0 = time.perf_counter()
        manifest = write_split(
            args.out / split,
            n,
            split_seed(args.seed, split),
            sizes=(args.min_size, args.max_size),
            fmt=args.format,
            jpeg_quality=args.jpeg_quality,
            questions_per_scene=args.questions_per_scene,
            qtype_weights=args.qtype_weights,
            workers=args.workers,
        )
        dt = time.perf_counter() - t0
        print(
            f"{split}: {n} scenes, {n * args.questions_per_scene} records in {dt:.1f} s "
            f"({n / max(dt, 1e-9):.0f} scenes/s) -> {manifest}",
            flush=True,
        )
    return 0
