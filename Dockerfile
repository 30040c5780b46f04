# syntax=docker/dockerfile:1
# ledger-bot image. Build:  docker build --build-arg GIT_SHA="$(git rev-parse HEAD)" -t ledger-bot .
# The base is pinned by digest (the multi-arch index of python:3.12-slim), so a rebuild of the same
# commit uses the same bytes; Renovate (.github/renovate.json) proposes a new digest as a reviewed PR.
# It stays an ARG so a build can swap it without editing this file; both stages use the same base
# so the venv's interpreter exists. Check a digest: docker buildx imagetools inspect python:3.12-slim
ARG PYTHON_IMAGE=python:3.12-slim@sha256:78387bc3881b8273120a12ebe6c1ab22b018ccc2c9adf565ae1ac9b536e184ea

# ---- deps: the hash-locked runtime dependencies, in a venv that the final stage copies --------
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
# Only the lock file first: this layer is rebuilt when dependencies change, not when code does.
COPY requirements.lock /tmp/requirements.lock
# --require-hashes: every file must match the lock. --only-binary: wheels only, so no compiler is
# ever needed (the slim base has none) and an sdist can't run code at build time.
# pip compiles .pyc files while installing, so the read-only image never needs to write them.
# pip check: --no-deps trusts the lock to be complete and consistent; a lock edited one package at a
# time (e.g. by an update bot) that breaks a dependency's requirement fails the build here.
RUN /opt/venv/bin/pip install --require-hashes --no-deps --only-binary=:all: \
        -r /tmp/requirements.lock \
    && /opt/venv/bin/pip check

# ---- runtime -----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only in Kubernetes; only /tmp is writable.
# HOME=/tmp: anything that caches under ~ writes to the writable emptyDir, not the image.
# LITELLM_*: litellm must never fetch its model cost map from the internet at import time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    LITELLM_OFFLINE_MODE=true \
    HEALTH_PORT=8080
WORKDIR /app
COPY --from=deps /opt/venv /opt/venv
# Copied as root with the default modes (files 0644, dirs 0755): readable, not writable, by the
# runtime user below.
COPY knowledge/ /app/knowledge/
COPY ledger_bot.py /app/
# Last, so a new commit only rebuilds this tiny layer.
ARG GIT_SHA=unknown
ENV LEDGER_BOT_GIT_SHA=${GIT_SHA}
# Numeric, so Kubernetes' runAsNonRoot can verify it without an /etc/passwd entry.
USER 10001:10001
EXPOSE 8080
# Exec form: python is PID 1 and gets SIGTERM itself; the bot drains and exits 0.
# No HEALTHCHECK: Kubernetes probes /health and /ready (workloads/ledger-bot/values.*.yaml).
CMD ["python", "ledger_bot.py"]
