#!/usr/bin/env bash
# Downloads, where there is network, the wheels that a bare GPU machine (CPython 3.12, x86-64 Linux, with JAX,
# flax, optax, orbax, absl, etils, numpy, scipy, pillow and pytest but none of the rest) lacks for
# benchmarks/device_check.sh, at the versions of constraints-py311.txt:
#
#   bash benchmarks/fetch_device_wheels.sh DIR      # then: bash benchmarks/device_check.sh --wheels=DIR
#
# DIR is best a git-ignored folder of the repository (device_wheels/) so that it travels with the working tree.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: bash benchmarks/fetch_device_wheels.sh DIR" >&2
  exit 2
fi
DIR="$1"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PACKAGES=(ml_collections PyYAML)

pins=()
for name in "${PACKAGES[@]}"; do
  pin="$(grep -i "^${name}==" "$REPO/constraints-py311.txt" || true)"
  pins+=("${pin:-$name}")
done
mkdir -p "$DIR"
python3 -m pip download --dest "$DIR" --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 "${pins[@]}"
ls -l "$DIR"
