#!/usr/bin/env bash
# containers/enroot_import.sh IMAGE [OUT.sqsh] - turn a container image into an enroot squashfs
# (.sqsh) that pyxis starts quickly on every node (no registry pull per node and job).
#
#   bash containers/enroot_import.sh ghcr.io/acme/gptoss-runtime:0.1.0 /shared/images/gptoss-runtime.sqsh
#   bash containers/enroot_import.sh dockerd://gptoss-runtime:0.1.0        # from the local docker daemon
#   bash containers/enroot_import.sh podman://gptoss-runtime:0.1.0         # from local podman storage
#   bash containers/enroot_import.sh gptoss-runtime-0.1.0.tar              # a `docker save` archive (air-gapped)
#   CONTAINER_IMAGE=/shared/images/gptoss-runtime.sqsh sbatch slurm/gptoss_120b.sbatch
#
# Run it on a node with enough scratch space (the image is ~6 GB unpacked), e.g. inside
# `srun --pty`, and write the .sqsh to a filesystem all nodes see. Registry credentials go to
# ~/.config/enroot/.credentials (see `man enroot-import`), never into this script.
set -euo pipefail
if (( $# < 1 )); then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
src=$1
case "$src" in
  docker://*|dockerd://*|podman://*) uri=$src ;;
  *.tar|*.tar.gz)  # `docker save` output copied in: load it into local storage, import from there
     [[ -f "$src" ]] || { echo "$src not found" >&2; exit 2; }
     if command -v podman >/dev/null; then loader=podman; scheme=podman; else loader=docker; scheme=dockerd; fi
     loaded=$("$loader" load -i "$src" | sed -n 's/^Loaded image[^:]*: *//p' | tail -n 1)
     [[ -n "$loaded" ]] || { echo "$loader load -i $src: no image name in its output" >&2; exit 1; }
     uri="$scheme://$loaded"; src=$loaded ;;
  *) # registry/org/name:tag -> enroot's docker://[USER@][REGISTRY#]IMAGE[:TAG] form
     if [[ "$src" == */* && "${src%%/*}" == *.* ]]; then uri="docker://${src%%/*}#${src#*/}"; else uri="docker://$src"; fi ;;
esac
base=${src##*/}; base=${base//:/+}
out=${2:-${base}.sqsh}
command -v enroot >/dev/null || { echo "enroot not found: run this on a cluster node with enroot/pyxis" >&2; exit 2; }
if [[ -e "$out" ]]; then
  echo "$out exists; remove it first to re-import" >&2
  exit 2
fi
echo "enroot import -o $out $uri" >&2
enroot import -o "$out" "$uri"
ls -lh "$out"
echo "use it: CONTAINER_IMAGE=$(cd "$(dirname "$out")" && pwd)/$(basename "$out") sbatch slurm/gptoss_20b.sbatch" >&2
