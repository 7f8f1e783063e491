"""Startup faults: whatever is wrong with the package, the device or the settings, `python -m app`
says why in one line and exits non-zero; no replica with a bad model ever reports ready.

`app.__main__.main` runs here in the test process (a real uvicorn server on a free port, the real
lifespan), so that each case costs a fraction of a second rather than a process start;
test_e2e runs one case of each path as a real process.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import app.engine as engine_module
from app.__main__ import main
from app.items import Kind
from tests.app.servers import broken_copy

FAST = ["--port", "0", "--max-batch-size", "2", "--threads", "1", "--drain-delay-s", "0", "--log-level", "info"]


@pytest.fixture(autouse=True)
def restore_process_settings() -> Iterator[None]:
    """main() configures the root logger and the switch interval for the process; put the test
    session's back."""
    root = logging.getLogger()
    handlers, level, interval = list(root.handlers), root.level, sys.getswitchinterval()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    sys.setswitchinterval(interval)


def truncate_archive(package: Path) -> None:
    archive = package / "model.pt"
    archive.write_bytes(archive.read_bytes()[:-16] + b"\0" * 16)


def wrong_golden_label(package: Path) -> None:
    manifest = json.loads((package / "manifest.json").read_text())
    label = manifest["golden"][0]["label"]
    manifest["golden"][0]["label"] = "yes" if label != "yes" else "no"
    (package / "manifest.json").write_text(json.dumps(manifest))


Breakage = Callable[[Path, Path], object]  # (the copied package, the tiny package) -> anything

# name: (what to break, extra flags, exit code, what the one line must say)
CASES: dict[str, tuple[Breakage | None, list[str], int, str]] = {
    "no package": (None, [], 1, "manifest not found"),
    "manifest not JSON": (lambda p, _: (p / "manifest.json").write_text("{not json"), [], 1, "not valid JSON"),
    "manifest does not match": (
        lambda p, _: (p / "manifest.json").write_text(
            json.dumps({**json.loads((p / "manifest.json").read_text()), "embedding_dim": 32})
        ),
        [],
        1,
        "golden case 0 does not match embedding_dim",
    ),
    "no archive": (lambda p, _: (p / "model.pt").unlink(), [], 1, "archive not found"),
    "empty archive": (lambda p, _: (p / "model.pt").write_bytes(b""), [], 1, "archive is empty"),
    "corrupt archive": (lambda p, _: truncate_archive(p), [], 1, "does not match the manifest's"),
    "swapped archive": (
        lambda p, tiny: shutil.copy(tiny / "model.pt", p / "model.pt"),
        [],
        1,
        "(corrupt, truncated or swapped archive)",
    ),
    "golden label wrong": (lambda p, _: wrong_golden_label(p), [], 1, "the package was shipped predicting"),
    "API key file missing": (None, ["--api-keys-file", "/nonexistent/keys"], 1, "cannot read the API key file"),
    "API key too short": (None, ["--api-keys", "short"], 1, "API key 1 is not usable"),
    "invalid setting": (None, ["--max-batch-size", "0"], 2, "invalid settings"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_startup_fault_is_one_clear_line_and_a_non_zero_exit(
    name: str, probe_package: Path, tiny_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    breakage, flags, code, reason = CASES[name]
    package = tmp_path / "missing" if name == "no package" else broken_copy(probe_package, tmp_path / "package")
    if breakage is not None:
        breakage(package, tiny_package)
    assert main(["--model", str(package), *FAST, *flags]) == code
    output = capsys.readouterr().err
    assert reason in output, output
    assert "Traceback" not in output and "ready in" not in output


def test_a_swapped_archive_with_its_sha256_updated_fails_the_golden_check(
    probe_package: Path, tiny_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The archive is intact and matches the manifest, but it is another model: only the golden
    check can tell, after loading and warming up."""
    tiny_sha = json.loads((tiny_package / "manifest.json").read_text())["archive_sha256"]
    package = broken_copy(probe_package, tmp_path / "package", archive_sha256=tiny_sha)
    shutil.copy(tiny_package / "model.pt", package / "model.pt")
    assert main(["--model", str(package), *FAST]) == 1
    output = capsys.readouterr().err
    assert "startup failed, this replica will not serve" in output
    assert "golden case 0" in output and "differs from the shipped output" in output


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_a_requested_gpu_that_is_absent(probe_package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(probe_package), *FAST, "--device", "cuda"]) == 1
    output = capsys.readouterr().err
    assert "cannot serve: device 'cuda' was requested but this machine has no usable CUDA device" in output


def test_fp16_on_the_cpu_is_refused_before_serving(probe_package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(probe_package), *FAST, "--device", "cpu", "--precision", "fp16"]) == 1
    assert "--precision fp16 needs a CUDA device; on the CPU use bf16" in capsys.readouterr().err


def test_a_precision_that_moves_a_golden_output_past_its_tolerance_is_refused(
    tiny_package: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 moves every embedding a little; with no tolerance at all, the check must refuse it."""
    monkeypatch.setattr(engine_module, "REDUCED_PRECISION_ATOL", 0.0)
    assert main(["--model", str(tiny_package), *FAST, "--precision", "bf16"]) == 1
    output = capsys.readouterr().err
    assert "startup failed, this replica will not serve: golden case 0: forward image_embedding" in output
    assert "in the serving path at bf16 differs from the shipped output by" in output
    assert "(at most 0 allowed)" in output


def test_a_cpu_warms_the_powers_of_two_and_the_largest_batch_a_gpu_every_size(tiny_package: Path) -> None:
    assert engine_module.warm_up_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert engine_module.warm_up_sizes(12) == [1, 2, 4, 8, 12]
    assert engine_module.warm_up_sizes(1) == [1]
    engine = engine_module.Engine.load(tiny_package, torch.device("cpu"))
    kinds = list(Kind)

    def shapes(plan: list[engine_module.WarmUp], kind: Kind) -> list[tuple[int, int]]:
        return [(step.size, step.length) for step in plan if step.kind is kind]

    plan = engine.warm_up_plan(kinds, 12, [4, 9, 20])
    # Every text length at the smallest and largest batch, one in between, in turn by position.
    expected = [(1, 4), (1, 9), (1, 20), (2, 9), (4, 20), (8, 4), (12, 4), (12, 9), (12, 20)]
    assert shapes(plan, Kind.TEXT) == shapes(plan, Kind.FUSE) == expected
    assert shapes(plan, Kind.IMAGE) == [(1, 4), (2, 9), (4, 20), (8, 4), (12, 4)]
    every = engine.warm_up_plan(kinds, 12, [4, 9, 20], every_size=True)
    assert [size for size, _ in shapes(every, Kind.IMAGE)] == list(range(1, 13))


def test_a_taken_port_with_front_ends_is_one_clear_line(
    probe_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        flags = ["--host", "127.0.0.1", "--port", str(port), "--frontends", "2"]
        assert main(["--model", str(probe_package), *FAST, *flags]) == 3  # uvicorn's own code for it
    output = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1 port {port}: [Errno 98] Address already in use" in output, output
    assert "Traceback" not in output and "front-end 1 started" not in output
