"""Quick serving check: the served latency and throughput against the in-process ceilings.

    python bench/quick_serve.py [--package DIR] [--threads N] [--seconds S]

Without --package, a randomly initialized model with the default FusionConfig is exported once
(to a temp folder) and served: same cost as the shipped model, answers meaningless.

Measured in one run, with the same thread settings on both sides:
- in-process: preprocessing (decode + tokenize) of the request's own image and text, and the
  forward pass at batch sizes 1..max, no HTTP;
- served: `python -m app` on 127.0.0.1, driven by a raw-socket asyncio client with a pre-built
  multipart request (so the load generator costs next to nothing), closed loop at concurrency 1
  and 32.
Reported: concurrency 1 median latency minus (preprocessing + batch-1 forward), and concurrency 32
throughput / (the best of 1 / (preprocessing + forward(B) / B) over batch sizes B).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import Settings  # noqa: E402
from bench.inprocess import load, median_time  # noqa: E402
from model.config import FusionConfig  # noqa: E402
from model.export import export_random_package  # noqa: E402
from model.preprocess import decode_image, pad_tokens, tokenize  # noqa: E402

QUESTION = "What colour is the object closest to the large red circle?"


def request_image() -> bytes:
    """A ShapesQA-like scene: a 256x256 JPEG with a few shapes."""
    picture = Image.new("RGB", (256, 256), (235, 235, 235))
    draw = ImageDraw.Draw(picture)
    draw.ellipse([20, 30, 110, 120], fill=(220, 40, 40))
    draw.rectangle([140, 40, 220, 120], fill=(40, 80, 220))
    draw.polygon([(60, 230), (120, 230), (90, 160)], fill=(40, 170, 60))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def multipart_request(image: bytes, text: str, port: int) -> bytes:
    request = httpx.Request(
        "POST",
        f"http://127.0.0.1:{port}/predict",
        files={"image": ("scene.jpg", image, "image/jpeg")},
        data={"text": text},
    )
    body = request.read()
    head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items() if k.lower() != "host")
    return f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode("latin-1") + body


def in_process(package: Path, threads: int, max_batch: int, image: bytes) -> dict[str, float]:
    # The module the served process runs on this CPU: frozen and optimized (app.graph_optimization).
    loaded, _ = load(package, threads, optimize_graph=True)
    size, max_length = loaded.manifest.image_size, loaded.manifest.max_text_length
    module = loaded.module

    def preprocess() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(decode_image(image, size)), torch.from_numpy(tokenize(QUESTION, max_length).ids)

    pixels, ids = preprocess()
    results = {"preprocess": median_time(preprocess, 200)}
    with torch.inference_mode():
        for batch in sorted({1, 2, 4, 8, 16, max_batch}):
            images = pixels.unsqueeze(0).expand(batch, -1, -1, -1).contiguous()
            tokens = torch.from_numpy(pad_tokens([ids.numpy()] * batch))
            for _ in range(3):
                module(images, tokens)
            results[f"forward_{batch}"] = median_time(lambda: module(images, tokens), max(5, 64 // batch))  # noqa: B023
    return results


async def closed_loop(port: int, request: bytes, concurrency: int, seconds: float) -> list[float]:
    """Each of `concurrency` connections sends the request, reads the answer, repeats."""
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < end:
                began = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head[:200]
                length = int(
                    next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")).split(
                        b":"
                    )[1]
                )
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - began)
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return latencies


def serve(package: Path, port: int, threads: int, extra: list[str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "app", "--model", str(package), "--port", str(port), "--threads", str(threads)]
    process = subprocess.Popen([*command, *extra], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stderr.read().decode() if process.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("server not ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the server's default)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("server_args", nargs="*", help="extra `python -m app` flags, after --")
    args = parser.parse_args()
    package = args.package
    if package is None:
        package = Path(tempfile.gettempdir()) / "fusionserve-bench-default"
        if not (package / "manifest.json").is_file():
            labels = [f"label{i}" for i in range(22)]
            export_random_package(package, FusionConfig(num_labels=22), labels, seed=0, name="default-random")
    settings = Settings()
    threads = args.threads or settings.intra_op_threads(on_cuda=False)
    image = request_image()

    ceilings = in_process(package, threads, settings.max_batch_size, image)
    preprocess = ceilings["preprocess"]
    c1_cost = preprocess + ceilings["forward_1"]
    per_item = {
        int(k.split("_")[1]): preprocess + v / int(k.split("_")[1]) for k, v in ceilings.items() if k != "preprocess"
    }
    best_batch = min(per_item, key=per_item.__getitem__)
    ceiling = 1 / per_item[best_batch]

    process = serve(package, args.port, threads, args.server_args)
    try:
        request = multipart_request(image, QUESTION, args.port)
        asyncio.run(closed_loop(args.port, request, 1, 2.0))  # warm the connection path
        c1 = asyncio.run(closed_loop(args.port, request, 1, args.seconds))
        asyncio.run(closed_loop(args.port, request, 32, 2.0))
        began = time.perf_counter()
        c32 = asyncio.run(closed_loop(args.port, request, 32, args.seconds))
        elapsed = time.perf_counter() - began
        metrics = httpx.get(f"http://127.0.0.1:{args.port}/metrics", timeout=10).text
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)

    c1_median = statistics.median(c1)
    throughput = len(c32) / elapsed
    sizes = [line for line in metrics.splitlines() if line.startswith("fusion_batch_size_") and 'kind="fuse"' in line]
    print(f"package {package} | threads {threads} | cores {os.cpu_count()} | torch {torch.__version__}")
    print("in-process: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in ceilings.items()))
    print(f"in-process batch-1 cost (preprocess + forward): {c1_cost * 1e3:.2f} ms")
    print(f"in-process ceiling: {ceiling:.1f} req/s at batch {best_batch}")
    print(f"served c=1: median {c1_median * 1e3:.2f} ms over {len(c1)} requests")
    print(
        f"served c=32: {throughput:.1f} req/s, p50 {statistics.median(c32) * 1e3:.1f} ms, "
        f"p99 {sorted(c32)[int(len(c32) * 0.99)] * 1e3:.1f} ms over {len(c32)} requests"
    )
    print(
        "batch sizes: "
        + " ".join(
            line.split("{")[0][len("fusion_batch_size_") :] + "=" + line.split()[-1]
            for line in sizes
            if "_sum" in line or "_count" in line
        )
    )
    startup = [line for line in metrics.splitlines() if line.startswith("fusion_startup_seconds{")]
    print("time to ready: " + " ".join(f"{line.split(chr(34))[1]}={float(line.split()[-1]):.2f}s" for line in startup))
    print(
        f"RESULT c1 overhead {(c1_median - c1_cost) * 1e3:+.2f} ms (ratio {c1_median / c1_cost:.3f}); "
        f"c32 throughput ratio {throughput / ceiling:.3f}"
    )


if __name__ == "__main__":
    main()
