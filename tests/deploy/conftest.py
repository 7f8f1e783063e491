"""Deployment tests: the load balancer in front of real replicas, and the deployment files' checks.

HAProxy comes from the system (`apt-get install haproxy`; `.ci/run` installs it). A developer
machine without it skips the tests that need it, with the reason; in CI (CI=true) they fail
instead, so CI can never pass by skipping them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import require_tool

REPO = Path(__file__).resolve().parents[2]
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
COMPOSE_SERVERS_CFG = REPO / "deploy" / "haproxy" / "servers-compose.cfg"


@pytest.fixture(scope="session")
def haproxy_binary() -> str:
    # /usr/sbin is not on every user's PATH, and it is where Debian puts it.
    return require_tool("haproxy", path="/usr/sbin:/usr/local/sbin")
