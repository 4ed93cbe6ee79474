# waardhaven-tasks: one image for every service (worker-high, worker-low, beat, flower, exporter).
# Each container runs one of services/<name>/run; the chart sets it as the container's args.
#
#   make image                                  (scripts/build-image.sh: buildah, or docker)
#   buildah bud --isolation chroot --build-arg BASE=localhost/debian-python:bookworm -t IMG .
#
# BASE is any Debian-like image with python3.11, venv and passwd (useradd). Both stages use it,
# so the venvs' interpreter symlinks point at the same Python in the final stage.
ARG BASE=python:3.11-slim-bookworm

# --- builder: the venvs, from the lock only ---------------------------------------------------
FROM ${BASE} AS builder
# Optional: a package index mirror and a CA bundle for it (scripts/build-image.sh passes the
# host's bundle when pip on the host trusts an extra CA). Build-stage only: not in the image.
ARG PIP_INDEX_URL
ARG PIP_CERT
ARG DUMB_INIT_VERSION=1.2.5.post1
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=120
WORKDIR /src
COPY requirements/base.lock requirements/base.lock
# dumb-init from PyPI (a static binary in a wheel): the init that forwards signals.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install -r requirements/base.lock "dumb-init==${DUMB_INIT_VERSION}"
# The Celery exporter pins redis<6 (the app uses redis 8): it lives in its own venv, from its lock.
COPY services/exporter/requirements.lock services/exporter/requirements.lock
RUN python3 -m venv /opt/exporter-venv \
 && /opt/exporter-venv/bin/pip install -r services/exporter/requirements.lock
# The package last: a code change rebuilds only this layer.
COPY pyproject.toml ./
COPY shared/ shared/
RUN /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/python -c "import tasks.settings, celery, flower, redbeat"

# --- final: no compilers, no pip cache, non-root ----------------------------------------------
FROM ${BASE}
RUN groupadd --system --gid 10001 waardhaven \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin waardhaven
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/exporter-venv /opt/exporter-venv
WORKDIR /app
# Code owned by root, read-only for the service user; only /tmp is written (an emptyDir in k8s).
COPY pyproject.toml ./
COPY shared/ shared/
COPY services/ services/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
USER 10001:10001
# dumb-init in single-child mode: signals go to the direct child only. The run scripts `exec`
# celery, so SIGTERM reaches the Celery main process (REMAP_SIGTERM=SIGQUIT: soft shutdown)
# and never its prefork children. No HEALTHCHECK: Kubernetes probes run services/*/healthcheck.
ENTRYPOINT ["dumb-init", "--single-child", "--"]
CMD ["services/worker-low/run"]

# Last, so that a new revision or build date does not invalidate the cached layers above.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="waardhaven-tasks" \
      org.opencontainers.image.description="Background processing for the Waardhaven AutoIndex: Celery workers, beat, Flower, exporter." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="https://github.com/waardhaven/waardhaven-tasks" \
      org.opencontainers.image.licenses="Proprietary"
