# syntax=docker/dockerfile:1
#
# Two images from one file (BuildKit; the default builder of current Docker):
#
#   docker build --target worker -t hotswap-worker .   # GPU worker: CUDA torch + Triton + .[worker]
#   docker build --target api    -t hotswap-api .      # API and scheduler: no torch
#
# `docker compose build` builds both. Build arguments:
#   PYTHON_IMAGE     base of the api image                      (python:3.12-slim)
#   CUDA_IMAGE       base of the worker image                   (nvidia/cuda:12.8.1-base-ubuntu24.04)
#   TORCH_SPEC       the torch requirement of the worker        (torch: PyPI's Linux build, CUDA 12)
#   TORCH_INDEX_URL  a wheel index for another CUDA build of torch (empty: PyPI)
# The host needs an NVIDIA driver new enough for torch's CUDA version and the NVIDIA Container Toolkit.

ARG PYTHON_IMAGE=python:3.12-slim
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ------------------------------------------------------------------------------------------------
# worker: one process per GPU (`hotswap worker --device cuda:0`); also runs `hotswap models fetch-demo`.
FROM ${CUDA_IMAGE} AS worker

ARG TORCH_SPEC=torch
ARG TORCH_INDEX_URL=

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOTSWAP_CACHE_DIR=/var/cache/hotswap \
    HOTSWAP_DATA_DIR=/var/lib/hotswap \
    TRITON_CACHE_DIR=/var/cache/hotswap/triton

# The nvidia/cuda base image carries the driver hooks only; torch's wheels bring the CUDA libraries.
# Triton compiles a small C launcher at run time: it needs gcc and the Python headers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# torch first, in its own layer: it is by far the largest and changes least often.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"

# The package with the worker extras (Triton, transformers, gguf); torch above already satisfies them.
RUN --mount=type=bind,target=/src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    cd /src && pip install ".[worker]"

# A named volume mounted on one of these dirs starts out owned by hotswap (Docker copies the owner).
RUN groupadd --system --gid 10001 hotswap \
 && useradd --system --uid 10001 --gid hotswap --create-home --home-dir /home/hotswap hotswap \
 && mkdir -p /var/cache/hotswap/models /var/cache/hotswap/adapters /var/cache/hotswap/triton /var/lib/hotswap \
 && chown -R hotswap:hotswap /var/cache/hotswap /var/lib/hotswap

USER hotswap
WORKDIR /home/hotswap
STOPSIGNAL SIGTERM
CMD ["hotswap", "worker", "--device", "cuda:0"]

# ------------------------------------------------------------------------------------------------
# api: the API (`hotswap api`) and the scheduler (`hotswap scheduler`). Never imports torch.
# Last stage, so a plain `docker build .` builds this small image.
FROM ${PYTHON_IMAGE} AS api

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOTSWAP_CACHE_DIR=/var/cache/hotswap \
    HOTSWAP_DATA_DIR=/var/lib/hotswap

RUN --mount=type=bind,target=/src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    cd /src && pip install .

RUN groupadd --system --gid 10001 hotswap \
 && useradd --system --uid 10001 --gid hotswap --create-home --home-dir /home/hotswap hotswap \
 && mkdir -p /var/cache/hotswap/models /var/lib/hotswap \
 && chown -R hotswap:hotswap /var/cache/hotswap /var/lib/hotswap

USER hotswap
WORKDIR /home/hotswap
EXPOSE 8000
CMD ["hotswap", "api", "--host", "0.0.0.0", "--port", "8000"]
