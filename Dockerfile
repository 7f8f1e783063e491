# fusionserve: one Dockerfile, two images.
#
#   docker build --build-arg DEVICE=cpu  -t fusionserve:cpu  .
#   docker build --build-arg DEVICE=cuda -t fusionserve:cuda .
#
# Both variants share the base (Debian bookworm + CPython 3.11), the entry point and the layout;
# they differ only in the torch build installed. The CUDA variant takes PyTorch's CUDA 12 wheels
# (CUDA_CHANNEL) rather than an nvidia/cuda base image: those wheels carry their own CUDA runtime,
# cuBLAS and cuDNN as pip packages, so an nvidia/cuda base would ship a second copy of the same
# libraries (gigabytes) and a second Python to keep in step. Only the driver comes from the host,
# injected by the NVIDIA container toolkit. A CUDA 12 build runs on any driver from the 525 series
# on (CUDA minor-version compatibility), which most GPU fleets have; a CUDA 13 build would need 580+.
#
# Only app/, model/ and weights/ reach the runtime image; the dependencies are installed from
# pyproject.toml's list into a virtual environment in a builder stage and copied over.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG DEVICE=cpu

# --- builder: a virtual environment with the runtime dependencies ------------------------------
FROM ${PYTHON_IMAGE} AS builder-base
# Wheels only: the slim base has no compiler, and a source build would not be reproducible.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ONLY_BINARY=:all:
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY pyproject.toml deploy/docker/requirements.py ./
RUN python requirements.py pyproject.toml torch.txt rest.txt

# BuildKit (Docker's default builder since 23.0) builds only the stage that DEVICE selects below.
# torch and torchvision from PyTorch's index for the variant (never the PyPI build, which is a CUDA
# one on Linux: a CPU image would carry gigabytes of unused CUDA libraries).
FROM builder-base AS torch-cpu
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu -r torch.txt

FROM builder-base AS torch-cuda
ARG CUDA_CHANNEL=cu128
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${CUDA_CHANNEL}" -r torch.txt

# The rest from PyPI; the pinned torch already installed satisfies the project's torch pin.
# DL3006 (tag every image) does not apply: torch-${DEVICE} is one of the two stages above, chosen
# by the build argument, not an image from a registry.
# hadolint ignore=DL3006
FROM torch-${DEVICE} AS builder
RUN pip install --no-cache-dir -r rest.txt

# --- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG DEVICE

# tini as PID 1: it forwards SIGTERM to the server and reaps zombies. Python as PID 1 would ignore
# a SIGTERM that arrives before uvicorn installs its handlers (the kernel drops signals without a
# handler for PID 1), so a container stopped while importing torch would hang until SIGKILL.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric UID, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --system --gid 10001 fusion \
    && useradd --system --uid 10001 --gid fusion --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin fusion

COPY --from=builder /opt/venv /opt/venv
WORKDIR /srv/fusionserve
# Owned by root and read-only to the service: it can neither change its code nor its weights.
COPY app/ app/
COPY model/ model/
COPY weights/ weights/
# Byte-code compiled now: the root filesystem is read-only at run time.
RUN /opt/venv/bin/python -m compileall -q app model

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    # Anything a library caches under $HOME goes to /tmp, the one writable place (a tmpfs or an
    # emptyDir when the root filesystem is read-only).
    HOME=/tmp \
    # Read by the NVIDIA container toolkit when a GPU is requested; ignored otherwise.
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    # Where GKE's device plugin mounts the driver (libcuda), without running ldconfig; the toolkit
    # and the GPU Operator put it on the default path instead. Nothing there on a CPU node.
    LD_LIBRARY_PATH=/usr/local/nvidia/lib64 \
    FUSION_MODEL=/srv/fusionserve/weights/shapesqa \
    FUSION_HOST=0.0.0.0 \
    FUSION_PORT=8000 \
    # cpu or cuda, never auto: a CUDA image on a node without a GPU exits with a clear message
    # instead of silently serving from the CPU.
    FUSION_DEVICE=${DEVICE} \
    # Below the orchestrator's grace periods (README, "Deployment": the arithmetic).
    FUSION_DRAIN_DELAY_S=5 \
    FUSION_GRACEFUL_TIMEOUT_S=25 \
    # A client may ask for no longer than a drain lets a request finish; longer gets 422 at once,
    # where it would have been cut by the drain, or by the load balancer's server timeout.
    FUSION_MAX_REQUEST_TIMEOUT_MS=20000

USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM

# Ready, not merely alive: Docker reports the container healthy once the model is loaded, warmed
# up and self-checked. The slim image has no curl; urlopen raises on a 503, so the exit code says it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('FUSION_PORT', '8000'), timeout=2)"]

# Exec form: tini, then the server, with no shell in between to swallow SIGTERM. Flags given to
# `docker run IMAGE ...` are appended (`python -m app --max-batch-size 16`).
ENTRYPOINT ["tini", "--", "python", "-m", "app"]
