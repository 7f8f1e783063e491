"""Deployment tests: the load balancer in front of real replicas, and the deployment files' checks.

HAProxy comes from the system (`apt-get install haproxy`; `.ci/run` installs it). A developer
machine without it skips the tests that need it, with the reason; in CI (CI=true) they fail
instead, so CI can never pass by skipping them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
COMPOSE_SERVERS_CFG = REPO / "deploy" / "haproxy" / "servers-compose.cfg"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def find_haproxy() -> str | None:
    # /usr/sbin is not on every user's PATH, and it is where Debian puts it.
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


@pytest.fixture(scope="session")
def haproxy_binary() -> str:
    found = find_haproxy()
    if found is None:
        reason = "haproxy is not installed (apt-get install haproxy)"
        if in_ci():
            pytest.fail(f"{reason}: CI must run the load-balancer tests, not skip them")
        pytest.skip(reason)
    return found
