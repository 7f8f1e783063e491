"""What a reduced precision (`python -m app --precision bf16|fp16`) costs in answers and gains in speed.

    python -m bench.precision --model weights/shapesqa --data EVAL/test/data.jsonl [--precision bf16]

Both sides run the service's own engine (`app.engine.Engine.execute`, the serving path) on the
same inputs, read from a data set in the DESIGN.md JSONL format through the shared preprocessing.
Reported: the answers that change, accuracy both ways where the rows have labels, the largest
embedding difference, and the forward time per batch size (median of repeats, the two precisions
interleaved so that a noisy machine slows both alike).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from app.engine import Engine
from app.items import Kind, Row
from bench.inprocess import median_time
from model.package import load_package
from model.preprocess import TokenIds, decode_image, pad_tokens, tokenize


def read_rows(path: Path, limit: int) -> list[dict[str, object]]:
    rows = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == limit:
                break
    return rows


def inputs(rows: Sequence[dict[str, object]], folder: Path, engine: Engine) -> tuple[np.ndarray, list[TokenIds]]:
    """Images [N,3,H,W] and each row's token ids (padded per batch, as the service pads them)."""
    manifest = engine.manifest
    images = [
        decode_image((folder / str(row.get("image", row.get("img")))).read_bytes(), manifest.image_size) for row in rows
    ]
    tokens = [tokenize(str(row["text"]), manifest.max_text_length).ids for row in rows]
    return np.stack(images), tokens


def run_all(engine: Engine, images: np.ndarray, tokens: list[TokenIds], batch: int) -> list[Row]:
    rows: list[Row] = []
    for start in range(0, len(images), batch):
        chunk = pad_tokens(tokens[start : start + batch])
        for result in engine.execute(Kind.FUSE, np.ascontiguousarray(images[start : start + batch]), chunk):
            if not isinstance(result, Row):
                raise SystemExit(f"a row failed: {result}")
            rows.append(result)
    return rows


def answer(row: Row, labels: Sequence[str]) -> str:
    assert row.probs is not None
    return labels[int(np.argmax(row.probs))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("weights/shapesqa"))
    parser.add_argument(
        "--data", type=Path, required=True, help="a JSONL data set (the trainer's format: image, text, label per line)"
    )
    parser.add_argument("--precision", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (the server's default here: 1)")
    parser.add_argument("--limit", type=int, default=2000, help="rows of the data set to compare on")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)

    if args.precision == "fp16" and args.device == "cpu":
        parser.error("fp16 runs on CUDA only (--device cuda); on the CPU compare bf16")
    torch.set_num_threads(args.threads)
    package = load_package(args.model, args.device, check_golden=False)
    # fp32 as loaded, like the reduced precision, which serves the module as loaded: only the
    # precision differs (app.graph_optimization rewrites the fp32 graph alone).
    full, reduced = Engine(package, optimize_graph=False), Engine(package, precision=args.precision)
    rows = read_rows(args.data, args.limit)
    if not rows:
        parser.error(f"{args.data} has no rows")
    images, tokens = inputs(rows, args.data.parent, full)
    exact, approx = run_all(full, images, tokens, 32), run_all(reduced, images, tokens, 32)

    labels = full.manifest.labels
    answers = [(answer(a, labels), answer(b, labels)) for a, b in zip(exact, approx, strict=True)]
    changed = sum(a != b for a, b in answers)
    drift = max(
        float(np.abs(getattr(a, name) - getattr(b, name)).max())
        for a, b in zip(exact, approx, strict=True)
        for name in ("image_embedding", "text_embedding")
    )
    print(f"{args.model} on {args.device}, {args.threads} thread(s), {len(rows)} rows of {args.data}")
    print(f"answers changed by {args.precision}: {changed} of {len(rows)} ({100 * changed / len(rows):.2f}%)")
    if all("label" in row for row in rows):
        truth = [str(row["label"]) for row in rows]
        for name, picked in (("fp32", [a for a, _ in answers]), (args.precision, [b for _, b in answers])):
            print(f"accuracy at {name}: {100 * np.mean([p == t for p, t in zip(picked, truth, strict=True)]):.2f}%")
    print(f"largest embedding difference: {drift:.3g}")

    print(f"\n| batch | fp32 ms | {args.precision} ms | speed-up |\n|---|---|---|---|")
    for size in (int(b) for b in args.batch_sizes.split(",")):
        batch_images, batch_tokens = np.ascontiguousarray(images[:size]), pad_tokens(tokens[:size])
        times: dict[str, list[float]] = {"fp32": [], args.precision: []}
        for engine in (full, reduced):  # the first calls at a new shape profile and optimize the graph
            for _ in range(3):
                engine.execute(Kind.FUSE, batch_images, batch_tokens)
        for _ in range(3):  # interleaved rounds
            for name, engine in (("fp32", full), (args.precision, reduced)):
                call = partial(engine.execute, Kind.FUSE, batch_images, batch_tokens)
                times[name].append(median_time(call, args.repeats))
        slow, fast = float(np.median(times["fp32"])), float(np.median(times[args.precision]))
        print(f"| {size} | {1000 * slow:.2f} | {1000 * fast:.2f} | {slow / fast:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
