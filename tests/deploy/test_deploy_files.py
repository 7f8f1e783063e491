"""The deployment files, checked offline: Dockerfile (hadolint), Kubernetes manifests (schemas of
pinned Kubernetes versions, strict), docker-compose.yml, and the HAProxy configuration (haproxy -c).

Beyond the linters, the numbers that must agree across files are checked against each other and
against the service's own settings: ports, the non-root UID, body limits, and the termination
arithmetic (preStop + drain + graceful < grace period; HAProxy notices a drain inside its window).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import Settings
from app.metrics import Metrics
from tests.deploy.conftest import COMPOSE_SERVERS_CFG, HAPROXY_CFG, REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "docker-compose.yml"
K8S = REPO / "deploy" / "k8s"
DEPLOYMENTS = [K8S / "deployment.yaml", K8S / "gpu" / "deployment.yaml"]
# The oldest Kubernetes the manifests support (the preStop `sleep` action is on from 1.30) and a
# recent one: an API removed in between would fail the second.
K8S_VERSIONS = ("1.30.0", "1.33.0")
# What a pod needs after the accepted work is done: the model's shutdown, the interpreter's exit
# (about a second here) and the kubelet's own lag. The grace period must leave at least this.
EXIT_MARGIN_S = 5.0
BATCH_MARGIN_S = 5.0  # far above one batch on a CPU (tens of milliseconds)
RUNTIME_SOURCES = {"app/", "model/", "weights/"}


def dev_tool(name: str) -> str:
    """A command-line tool from the dev extras, next to this interpreter (it is a test dependency)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: install the dev extras (pip install -e '.[dev]')")
    return found


def settings_field(env_name: str) -> str:
    assert env_name.startswith("FUSION_"), env_name
    name = env_name.removeprefix("FUSION_").lower()
    assert name in Settings.model_fields, f"{env_name} is not a setting of the service"
    return name


def checked_settings(env: dict[str, str]) -> Settings:
    """The service's settings from these FUSION_* values, validated as the service validates them."""
    return Settings.model_validate({settings_field(name): value for name, value in env.items()})


def seconds(duration: str) -> float:
    """An HAProxy or compose duration: 500ms, 2s, 1m."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", duration.strip())
    assert match is not None, duration
    value, unit = float(match.group(1)), match.group(2) or "ms"  # HAProxy's unit is ms
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]


# --- Dockerfile ----------------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        result.append((keyword.upper(), rest.strip()))
        pending = ""
    return result


def runtime_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def test_dockerfile_is_clean_for_hadolint(tmp_path: Path) -> None:
    # Default rules, and every finding fails down to style and info. HOME and XDG_CONFIG_HOME point
    # to an empty folder so that no personal hadolint.yaml relaxes them.
    assert not (REPO / ".hadolint.yaml").exists() and not (REPO / ".hadolint.yml").exists()
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [dev_tool("hadolint"), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_says_why() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            reason = lines[number - 1].strip() if number > 0 else ""
            assert reason.startswith("#") and "hadolint" not in reason and len(reason) > 20, (
                f"Dockerfile:{number + 1}: an ignore needs a comment line above it that says why"
            )


def test_runtime_image_holds_only_the_service_and_runs_it_as_non_root() -> None:
    stage = runtime_stage(DOCKERFILE)
    copies = [args.split() for keyword, args in stage if keyword == "COPY" and not args.startswith("--from")]
    assert {source for *sources, _ in copies for source in sources} == RUNTIME_SOURCES
    users = [args for keyword, args in stage if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    entrypoint = [args for keyword, args in stage if keyword == "ENTRYPOINT"]
    assert len(entrypoint) == 1
    # Exec form: a JSON array, so no shell stands between the signal and the server.
    assert json.loads(entrypoint[0])[-3:] == ["python", "-m", "app"]
    healthcheck = next(args for keyword, args in stage if keyword == "HEALTHCHECK")
    assert "/readyz" in healthcheck and "CMD [" in healthcheck
    assert dockerfile_env()["FUSION_DEVICE"] == "${DEVICE}"
    assert container_settings({}).host == "0.0.0.0"


def dockerfile_env() -> dict[str, str]:
    """The FUSION_* defaults the image sets."""
    env: dict[str, str] = {}
    for keyword, args in runtime_stage(DOCKERFILE):
        if keyword == "ENV":
            for pair in args.split():
                name, _, value = pair.partition("=")
                if name.startswith("FUSION_"):
                    env[name] = value
    return env


def container_settings(overrides: dict[str, str]) -> Settings:
    """What a container runs with: the image's defaults, then the deployment's variables."""
    # The image's FUSION_DEVICE is its build argument; cpu stands for it unless overridden.
    return checked_settings({**dockerfile_env(), "FUSION_DEVICE": "cpu", **overrides})


def image_uid() -> int:
    users = [args for keyword, args in runtime_stage(DOCKERFILE) if keyword == "USER"]
    return int(users[-1].split(":")[0])


def test_build_context_is_an_allowlist_that_holds_what_the_dockerfile_copies() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    patterns = [line for line in patterns if line and not line.startswith("#")]
    assert patterns[0] == "*", "the context must start from nothing"
    allowed = {line.removeprefix("!") for line in patterns if line.startswith("!")}
    copied = set()
    for keyword, args in instructions(DOCKERFILE):
        if keyword == "COPY" and not args.startswith("--from"):
            *sources, _ = args.split()
            copied.update(sources)
    assert copied <= allowed, f"copied but not in the context: {copied - allowed}"
    assert not {"trainer/", "tests/", "bench/", ".venv/"} & allowed


def test_image_requirements_come_from_pyproject(tmp_path: Path) -> None:
    torch_txt, rest_txt = tmp_path / "torch.txt", tmp_path / "rest.txt"
    script = REPO / "deploy" / "docker" / "requirements.py"
    subprocess.run(
        [sys.executable, str(script), str(REPO / "pyproject.toml"), str(torch_txt), str(rest_txt)],
        check=True,
        timeout=60,
    )
    torch = torch_txt.read_text().split()
    rest = rest_txt.read_text().split()
    # Pinned exactly: the CPU and CUDA wheels of one version (2.14.1+cpu, 2.14.1+cu128) both match.
    assert sorted(line.split("==")[0] for line in torch) == ["torch", "torchvision"]
    assert all("==" in line for line in torch)
    assert rest and not any(line.startswith("torch") for line in rest)


# --- Kubernetes ----------------------------------------------------------------------------------


def k8s_object(kind: str) -> dict[str, Any]:
    """The one object of this kind in deploy/k8s/ (the CPU set; the GPU Deployment is in gpu/)."""
    documents = [document for path in sorted(K8S.glob("*.yaml")) for document in yaml.safe_load_all(path.read_text())]
    found: list[dict[str, Any]] = [document for document in documents if document and document["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def test_k8s_manifests_validate_offline_and_strictly() -> None:
    files = [str(path) for path in sorted(K8S.rglob("*.yaml"))]
    assert len(files) >= 5
    for version in K8S_VERSIONS:
        result = subprocess.run(
            [dev_tool("kubernetes-validate"), "--strict", "--kubernetes-version", version, *files],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_k8s_validation_rejects_an_unknown_field(tmp_path: Path) -> None:
    # The validator is really strict, and really offline: a misspelt field fails.
    broken = tmp_path / "deployment.yaml"
    broken.write_text(DEPLOYMENTS[0].read_text().replace("readinessProbe:", "readinesProbe:"))
    result = subprocess.run(
        [dev_tool("kubernetes-validate"), "--strict", "--kubernetes-version", K8S_VERSIONS[0], str(broken)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "readinesProbe" in result.stdout + result.stderr


@pytest.mark.parametrize("path", DEPLOYMENTS, ids=lambda path: path.parent.name)
def test_k8s_termination_adds_up(path: Path) -> None:
    deployment = yaml.safe_load(path.read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    for item in container["env"]:
        settings_field(item["name"])
    # The image's defaults, overridden by the manifest: what the container really runs with.
    settings = container_settings(env)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod["terminationGracePeriodSeconds"]
    needed = pre_stop + settings.drain_delay_s + settings.graceful_timeout_s
    assert needed + EXIT_MARGIN_S <= grace, f"preStop {pre_stop} + drain + graceful = {needed} s, grace {grace} s"
    # Accepted work ends within the graceful timeout: a request queued at the last moment has at
    # most its deadline left.
    assert settings.request_timeout_ms / 1000 <= settings.graceful_timeout_s
    # Rolling updates never drop below the serving capacity.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("path", DEPLOYMENTS, ids=lambda path: path.parent.name)
def test_k8s_probes_and_security(path: Path) -> None:
    deployment = yaml.safe_load(path.read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["http"] == int(dockerfile_env()["FUSION_PORT"])
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {name: probe["path"] for name, probe in probes.items()} == {
        "startupProbe": "/readyz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }
    assert all(probe["port"] == "http" for probe in probes.values())
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid()
    # A read-only root needs a writable /tmp (the image's HOME).
    assert any(mount["mountPath"] == "/tmp" for mount in container["volumeMounts"])
    resources = container["resources"]
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[bound])
    if path.parent.name == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == "1"
        assert {item["name"]: item.get("value") for item in container["env"]}["FUSION_DEVICE"] == "cuda"


def test_k8s_service_autoscaler_and_budget_select_the_deployment() -> None:
    deployment = k8s_object("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container_ports = {port["name"] for port in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    service = k8s_object("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= container_ports
    budget = k8s_object("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["spec"]["maxUnavailable"] == 1
    autoscaler = k8s_object("HorizontalPodAutoscaler")
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 2 <= autoscaler["spec"]["minReplicas"] <= autoscaler["spec"]["maxReplicas"]
    # The GPU variant replaces the same Deployment, so the same Service and budget apply; its
    # autoscaler scales the same Deployment on queue depth, from no more replicas than it starts
    # with (a floor above that would ask for GPUs the rollout arithmetic did not plan for).
    gpu = yaml.safe_load(DEPLOYMENTS[1].read_text())
    assert gpu["metadata"]["name"] == deployment["metadata"]["name"]
    assert gpu["spec"]["template"]["metadata"]["labels"].items() >= pod_labels.items()
    gpu_autoscaler = yaml.safe_load((K8S / "gpu" / "hpa.yaml").read_text())
    gpu_target = gpu_autoscaler["spec"]["scaleTargetRef"]
    assert (gpu_target["kind"], gpu_target["name"]) == ("Deployment", gpu["metadata"]["name"])
    # The autoscalers own the replica count: a count in a Deployment would be set again by every
    # `kubectl apply` of a new image, undoing a scale-up under load.
    assert "replicas" not in gpu["spec"] and "replicas" not in deployment["spec"]
    assert 2 <= gpu_autoscaler["spec"]["minReplicas"] <= gpu_autoscaler["spec"]["maxReplicas"]
    (metric,) = gpu_autoscaler["spec"]["metrics"]
    assert (metric["type"], metric["pods"]["metric"]["name"]) == ("Pods", "fusion_queue_depth")
    assert "fusion_queue_depth" in Metrics(1).render().decode()  # a gauge the service exports


# --- docker compose ------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_compose_runs_replicas_behind_the_shared_haproxy_config() -> None:
    services = compose()["services"]
    replicas = services["fusionserve"]["deploy"]["replicas"]
    default = re.fullmatch(r"\$\{\w+:-(\d+)\}", str(replicas))
    assert int(default.group(1) if default else replicas) >= 2
    haproxy = services["haproxy"]
    mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in haproxy["volumes"]}
    # The very file the load-balancer tests run, and the compose server list, in this order.
    config = mounts[f"./{HAPROXY_CFG.relative_to(REPO)}"]
    servers = mounts[f"./{COMPOSE_SERVERS_CFG.relative_to(REPO)}"]
    assert haproxy["command"] == ["-f", config, "-f", servers]
    # The server list resolves the service's name, on the image's port.
    template = re.search(r"server-template \S+ \S+ (\S+):(\d+)", COMPOSE_SERVERS_CFG.read_text())
    assert template is not None
    assert template.group(1) == "fusionserve" and template.group(2) == dockerfile_env()["FUSION_PORT"]
    assert "fusionserve" in services["fusionserve-gpu"]["networks"]["default"]["aliases"]


@pytest.mark.parametrize("name", ["fusionserve", "fusionserve-gpu"])
def test_compose_replicas_stop_within_their_grace_period(name: str) -> None:
    service = compose()["services"][name]
    settings = container_settings(service["environment"])
    needed = settings.drain_delay_s + settings.graceful_timeout_s
    assert service["stop_signal"] == "SIGTERM"
    assert needed + EXIT_MARGIN_S <= seconds(service["stop_grace_period"])
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]


def test_compose_gpu_profile_reserves_a_device() -> None:
    gpu = compose()["services"]["fusionserve-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["DEVICE"] == "cuda"
    assert gpu["environment"]["FUSION_DEVICE"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] >= 1
    assert compose()["services"]["fusionserve"]["build"]["args"]["DEVICE"] == "cpu"


# --- HAProxy -------------------------------------------------------------------------------------


def haproxy_setting(pattern: str) -> str:
    match = re.search(pattern, HAPROXY_CFG.read_text(), re.MULTILINE)
    assert match is not None, pattern
    return match.group(1)


def test_haproxy_limits_match_the_service() -> None:
    defaults = Settings()
    image = container_settings({})
    # The body limit is the service's.
    assert int(haproxy_setting(r"req\.hdr_val\(content-length\) gt (\d+)")) == defaults.max_body_bytes
    # The service answers before HAProxy gives up on it, even a request that starts on the device
    # just before the largest deadline a client may ask for and then hangs until the watchdog
    # (checked every quarter second at most) answers 500 model_timeout.
    server_timeout = seconds(haproxy_setting(r"^\s*timeout server (\S+)"))
    longest = image.max_request_timeout_ms / 1000 + image.forward_timeout_s + 0.25
    assert server_timeout > longest, f"timeout server {server_timeout} s, the service may take {longest} s"
    # And a drain lets any request the image accepts finish: one that starts on the device just
    # before the longest deadline a client may ask for, and its batch (seconds at most, on a CPU).
    assert image.max_request_timeout_ms / 1000 + BATCH_MARGIN_S <= image.graceful_timeout_s
    # The production check intervals notice a drain inside the service's drain window: the first
    # failed check comes within `inter`, the next ones every `fastinter`, each taking up to
    # `timeout check`.
    inter = seconds(haproxy_setting(r"FUSION_LB_CHECK_INTER-(\w+)"))
    fastinter = seconds(haproxy_setting(r"FUSION_LB_CHECK_FASTINTER-(\w+)"))
    fall = int(haproxy_setting(r"default-server .* fall (\d+)"))
    check_timeout = seconds(haproxy_setting(r"^\s*timeout check (\S+)"))
    noticed = inter + (fall - 1) * fastinter + fall * check_timeout  # a check is scheduled when the last ends
    assert noticed < defaults.drain_delay_s
    # HAProxy's own stop lets answers in flight finish (up to hard-stop-after, above timeout server)
    # before Docker's SIGKILL.
    hard_stop = seconds(haproxy_setting(r"^\s*hard-stop-after (\S+)"))
    assert server_timeout < hard_stop < seconds(compose()["services"]["haproxy"]["stop_grace_period"])
    assert noticed < float(compose()["services"]["fusionserve"]["environment"]["FUSION_DRAIN_DELAY_S"])


def test_haproxy_config_is_valid_without_warnings(haproxy_binary: str, tmp_path: Path) -> None:
    static = tmp_path / "servers.cfg"
    static.write_text("backend replicas\n    server replica1 127.0.0.1:8001 check\n")
    # The production defaults: no FUSION_LB_* variable set.
    env = {"PATH": "/usr/sbin:/usr/bin:/bin"}
    for servers in (COMPOSE_SERVERS_CFG, static):
        result = subprocess.run(
            [haproxy_binary, "-c", "-dW", "-f", str(HAPROXY_CFG), "-f", str(servers)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
