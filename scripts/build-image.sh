#!/usr/bin/env bash
# Build the waardhaven-tasks image from the top-level Dockerfile (what `make image` runs).
#
#   scripts/build-image.sh [IMAGE]        default IMAGE=localhost/waardhaven-tasks:dev
#
# Environment: BASE (base image build argument; default the Dockerfile's python:3.11-slim),
# BUILDER=buildah|docker (default: buildah when installed, else docker with a running engine),
# VERSION (default pyproject's version), REVISION (default git HEAD), PIP_INDEX_URL (a mirror).
# When the host trusts an extra CA (PIP_CERT / SSL_CERT_FILE, e.g. behind a TLS proxy), that
# bundle is mounted read-only into the build and given to pip; it never ends up in the image.
set -euo pipefail
cd "$(dirname "$0")/.."

image="${1:-${IMAGE:-localhost/waardhaven-tasks:dev}}"
version="${VERSION:-$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)}"
revision="${REVISION:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
args=(
  --build-arg "VERSION=${version}"
  --build-arg "REVISION=${revision}"
  --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  -f Dockerfile -t "$image"
)
[[ -n "${BASE:-}" ]] && args+=(--build-arg "BASE=${BASE}")
[[ -n "${PIP_INDEX_URL:-}" ]] && args+=(--build-arg "PIP_INDEX_URL=${PIP_INDEX_URL}")

ca="${PIP_CERT:-${SSL_CERT_FILE:-}}"
ca_args=()
if [[ -n "$ca" && -f "$ca" ]]; then
  ca_args=(-v "${ca}:/run/build-ca.crt:ro" --build-arg "PIP_CERT=/run/build-ca.crt")
fi

builder="${BUILDER:-}"
if [[ -z "$builder" ]]; then
  if command -v buildah >/dev/null; then
    builder=buildah
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    builder=docker
  else
    echo "build-image: neither buildah nor a running docker engine found" >&2
    echo "  Debian/Ubuntu: apt-get install buildah" >&2
    exit 1
  fi
fi

echo "build-image: ${builder} -> ${image} (version ${version}, revision ${revision})" >&2
case "$builder" in
  buildah)
    # chroot isolation: works without a container runtime (and inside unprivileged CI jobs).
    exec buildah bud --isolation chroot --layers "${ca_args[@]}" "${args[@]}" .
    ;;
  docker)
    if ((${#ca_args[@]})); then
      # docker build cannot mount a host file into RUN steps without BuildKit secrets.
      echo "build-image: docker: extra CA not mounted; set PIP_INDEX_URL to a reachable mirror" >&2
    fi
    exec docker build "${args[@]}" .
    ;;
  *)
    echo "build-image: unknown BUILDER=${builder}" >&2
    exit 2
    ;;
esac
