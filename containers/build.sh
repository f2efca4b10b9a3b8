#!/usr/bin/env bash
# containers/build.sh [TAG] - build the image from the repository's Dockerfile and optionally push it.
#
#   bash containers/build.sh                               # -> gptoss-runtime:<version from pyproject>
#   REGISTRY=ghcr.io/acme PUSH=1 bash containers/build.sh  # -> ghcr.io/acme/gptoss-runtime:<version>, pushed
#   ENGINE=podman bash containers/build.sh 0.1.0-dev       # podman instead of docker
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
engine=${ENGINE:-$(command -v docker >/dev/null 2>&1 && echo docker || echo podman)}
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$root/pyproject.toml" | head -n 1)
tag=${1:-${version:-latest}}
name=${IMAGE_NAME:-gptoss-runtime}
image=${REGISTRY:+$REGISTRY/}$name:$tag
echo "building $image with $engine from $root" >&2
# shellcheck disable=SC2086  # BUILD_ARGS is a word-split list of extra options
"$engine" build ${BUILD_ARGS:-} -t "$image" -f "$root/Dockerfile" "$root"
if [[ "${PUSH:-0}" == 1 ]]; then
  [[ -n "${REGISTRY:-}" ]] || { echo "PUSH=1 needs REGISTRY=host/org" >&2; exit 2; }
  "$engine" push "$image"
fi
echo "$image"
