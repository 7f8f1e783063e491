"""Settings: one validated object from flags, keyword arguments and FUSION_* variables."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp

from app.config import Settings, available_cores, cgroup_cpu_quota


def test_defaults() -> None:
    settings = Settings()
    assert settings.model == Path("weights/shapesqa")
    assert (settings.host, settings.port, settings.device) == ("127.0.0.1", 8000, "auto")
    assert (settings.max_batch_size, settings.max_wait_ms, settings.max_queue) == (32, 0.0, 256)
    assert settings.intra_op_threads(on_cuda=False) == max(1, available_cores() // 2)
    assert settings.intra_op_threads(on_cuda=True) == 1
    assert settings.decode_threads() == min(available_cores(), 4)
    # Cheap requests decode on the event loop under load where the model runs on the CPU only, and
    # there the next batch is handed over 2 ms early, so that the device does not wait on the loop.
    assert (settings.decodes_inline_under_load(on_cuda=False), settings.decodes_inline_under_load(on_cuda=True)) == (
        True,
        False,
    )
    assert (settings.lookahead_s(on_cuda=False), settings.lookahead_s(on_cuda=True)) == (0.002, 0.0)


@pytest.mark.parametrize(
    ("flag", "expected"), [("--inline-decode-under-load", True), ("--no-inline-decode-under-load", False)]
)
def test_inline_decode_under_load_as_set_holds_on_either_device(flag: str, expected: bool) -> None:
    settings = CliApp.run(Settings, cli_args=[flag])
    assert [settings.decodes_inline_under_load(on_cuda=cuda) for cuda in (False, True)] == [expected, expected]
    assert [settings.lookahead_s(on_cuda=cuda) for cuda in (False, True)] == [0.002 if expected else 0.0, 0.0]
    assert CliApp.run(Settings, cli_args=[flag, "--lookahead-ms", "0"]).lookahead_s(on_cuda=False) == 0.0


def test_robustness_defaults() -> None:
    settings = Settings()
    assert (settings.max_header_bytes, settings.header_timeout_s, settings.body_timeout_s) == (32768, 10.0, 10.0)
    assert (settings.forward_timeout_s, settings.max_failed_batches) == (30.0, 3)
    assert (settings.api_keys, settings.api_keys_file, settings.metrics_require_key, settings.docs) == (
        [],
        None,
        True,
        True,
    )


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUSION_MODEL", "/packages/mine")
    monkeypatch.setenv("FUSION_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("FUSION_MAX_WAIT_MS", "2.5")
    monkeypatch.setenv("FUSION_DEVICE", "cuda:1")
    monkeypatch.setenv("FUSION_THREADS", "3")
    settings = Settings()
    assert settings.model == Path("/packages/mine")
    assert (settings.max_batch_size, settings.max_wait_ms, settings.device) == (4, 2.5, "cuda:1")
    assert settings.intra_op_threads(on_cuda=False) == 3


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUSION_PORT", "9001")
    monkeypatch.setenv("FUSION_MAX_QUEUE", "7")
    settings = CliApp.run(Settings, cli_args=["--port", "9002", "--drain-delay-s", "0.5", "--access-log"])
    assert (settings.port, settings.max_queue, settings.drain_delay_s, settings.access_log) == (9002, 7, 0.5, True)


@pytest.mark.parametrize(
    "overrides",
    [
        {"device": "gpu"},
        {"device": "cuda:x"},
        {"max_batch_size": 0},
        {"port": 70000},
        {"max_wait_ms": -1},
        {"request_timeout_ms": 5000, "max_request_timeout_ms": 1000},
        {"max_image_bytes": 100, "max_body_bytes": 10},
        {"body_memory_mb": 1, "max_body_bytes": 2 * 1024 * 1024, "max_image_bytes": 1024},
        {"decode_memory_mb": 0},
        {"log_level": "loud"},
        {"max_header_bytes": 1023},
        {"header_timeout_s": 0},
        {"body_timeout_s": 0},
        {"forward_timeout_s": 0},
        {"max_failed_batches": 0},
    ],
)
def test_invalid_settings_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**overrides)  # type: ignore[arg-type]


def test_image_limits_come_from_settings() -> None:
    limits = Settings(max_image_pixels=100, max_image_side=20, max_image_aspect=2.0).image_limits()
    assert (limits.max_pixels, limits.max_side, limits.max_aspect) == (100, 20, 2.0)


def test_cgroup_v2_cpu_quota_caps_the_core_count(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None


def test_cgroup_v1_cpu_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) == 2.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path) is None


def test_no_cgroup_files_means_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path) is None
