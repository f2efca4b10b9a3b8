#!/usr/bin/env bash
# containers/build_offline.sh - build the Dockerfile where no base image can be pulled (the CI
# sandbox): a Debian rootfs made by debootstrap, with python3 + a CPU torch wheel, is tagged as
# the Dockerfile's FROM image, then `podman build --pull=never` builds the real Dockerfile on it.
# The result is a CPU-only stand-in for exercising the image and the pyxis launch path; the
# production image is built by containers/build.sh on the real CUDA base.
#
#   bash ../shared/tools/local_slurm.sh containers        # podman/buildah/runc set up for the sandbox
#   bash containers/build_offline.sh [TAG]                 # -> localhost/gptoss-runtime:offline
#   podman run --rm localhost/gptoss-runtime:offline --config /opt/gptoss/configs/debugmodel.toml --training.steps=3
#
# Knobs: TORCH_WHEEL (a local CPU torch wheel for the rootfs' python, else torch from the index),
# ROOTFS (reuse a debootstrap tree), MIRROR (Debian mirror), SUITE (bookworm = python 3.11.2, the
# default; trixie = python 3.13: `SUITE=trixie WORK_DIR=/tmp/gptoss-offline-trixie bash
# containers/build_offline.sh offline-trixie`, torch from the index unless TORCH_WHEEL).
# Needs root, debootstrap, podman, network access to the Debian mirror and the Python index.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tag=${1:-offline}
suite=${SUITE:-bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
work=${WORK_DIR:-/tmp/gptoss-offline-build}
rootfs=${ROOTFS:-$work/rootfs}
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
# The Dockerfile's base (ARG BASE_IMAGE=name:tag@sha256:...): the stand-in gets its name:tag
# (a local image cannot carry the registry's digest) and is passed as --build-arg BASE_IMAGE.
from=$(sed -n 's/^ARG BASE_IMAGE=\([^ ]*\).*/\1/p' "$root/Dockerfile" | head -n 1)
from=${from%%@*}
[[ -n "$from" ]] || { echo "no ARG BASE_IMAGE in $root/Dockerfile" >&2; exit 2; }
# another suite (SUITE=trixie: Python 3.13) gets its own stand-in base, not bookworm's
[[ "$suite" == bookworm ]] || from="$from-$suite"
log() { printf '[build_offline] %s\n' "$*" >&2; }

command -v podman >/dev/null || { log "podman missing: bash ../shared/tools/local_slurm.sh containers"; exit 2; }
mkdir -p "$work"
if [[ ! -x "$rootfs/usr/bin/python3" ]]; then
  command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null
  log "debootstrap $suite -> $rootfs"
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates,procps \
    "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
fi

if ! podman image exists "localhost/gptoss-debian-py:$suite"; then
  log "importing the rootfs as localhost/gptoss-debian-py:$suite"
  tar -C "$rootfs" -c . | podman import - "localhost/gptoss-debian-py:$suite" >/dev/null
fi

# The stand-in for the FROM image: python/pip on PATH (as in the pytorch images) and torch.
base_ctx=$work/base
mkdir -p "$base_ctx"
wheel_mount=()
torch_spec="torch"
if [[ -n "${TORCH_WHEEL:-}" ]]; then
  wheel_mount=(-v "$(dirname "$TORCH_WHEEL"):/wheels:ro")
  torch_spec="/wheels/$(basename "$TORCH_WHEEL")"
fi
cat > "$base_ctx/Containerfile" <<EOF
FROM localhost/gptoss-debian-py:$suite
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=$ca
RUN rm -f /usr/lib/python3*/EXTERNALLY-MANAGED && pip install --no-cache-dir "$torch_spec" && python -c "import torch; print('torch', torch.__version__)"
EOF
if ! podman image exists "$from"; then
  log "building the stand-in base, tagged $from"
  podman build --pull=never --network=host -v "$ca:$ca:ro" "${wheel_mount[@]}" \
    -t "$from" "$base_ctx"
fi

log "podman build $root -> localhost/gptoss-runtime:$tag"
podman build --pull=never --network=host -v "$ca:$ca:ro" --build-arg "BASE_IMAGE=$from" \
  -t "localhost/gptoss-runtime:$tag" -f "$root/Dockerfile" "$root"
echo "localhost/gptoss-runtime:$tag"
