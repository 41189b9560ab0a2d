#!/usr/bin/env bash
# One command for a bare GPU machine: parity against the reference's golden numbers, the training step and the
# sampler timed, the PyTorch reference's step timed beside it (docs/performance.md, "Device check").
#
#   bash benchmarks/device_check.sh [--rehearse] [--wheels=DIR] [--reference_repo=DIR]
#
# Results: $OUT/device_check.json and $OUT/device_check.log where $OUT is set, else ./device_check_out/.
# --wheels=DIR    wheels the machine lacks (bash benchmarks/fetch_device_wheels.sh DIR, beforehand, where there
#                 is network); installed with --no-index into a folder outside the repository.
# --reference_repo=DIR  the folder holding the reference's guided_diffusion/ (git clone
#                 https://github.com/forever208/DDPM-IP); without it the reference's step is not timed.
# --rehearse      the same script on the CPU with the toy config and small sizes (a test runs it).
# The repository is used from its folder (PYTHONPATH), not installed: the machine's own JAX stays in use.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-$PWD/device_check_out}"
WHEELS=""
REFERENCE=""
REHEARSE=""
for arg in "$@"; do
  case "$arg" in
    --rehearse) REHEARSE="--rehearse" ;;
    --wheels=*) WHEELS="${arg#--wheels=}" ;;
    --reference_repo=*) REFERENCE="${arg#--reference_repo=}" ;;
    -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/device_check.log"
: > "$LOG"

SITE=""
if [[ -n "$WHEELS" ]]; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  if [[ ! -d "$WHEELS" || ${#wheels[@]} -eq 0 ]]; then
    echo "device_check.sh: --wheels=$WHEELS holds no .whl files (fill it with benchmarks/fetch_device_wheels.sh)" >&2
    exit 2
  fi
  SITE="${TMPDIR:-/tmp}/ddpm_ip_jax_device_site"
  rm -rf "$SITE"
  echo "installing ${#wheels[@]} wheels into $SITE" | tee -a "$LOG"
  "$PYTHON" -m pip install --quiet --no-index --no-deps --target="$SITE" "${wheels[@]}" >>"$LOG" 2>&1 || {
    echo "device_check.sh: installing the wheels of $WHEELS failed (see $LOG)" >&2; exit 2; }
fi
export PYTHONPATH="${SITE:+$SITE:}$REPO${PYTHONPATH:+:$PYTHONPATH}"

# Everything the JAX parts import, checked at once so that a missing wheel is one line, not a traceback.
if ! missing="$("$PYTHON" - <<'EOF'
import importlib.util
need = ("jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "absl", "etils", "numpy", "scipy", "PIL",
        "pytest", "yaml")
print(" ".join(n for n in need if importlib.util.find_spec(n.split(".")[0]) is None))
EOF
)"; then
  echo "device_check.sh: $PYTHON cannot run" >&2; exit 2
fi
if [[ -n "$missing" ]]; then
  echo "device_check.sh: missing Python packages: $missing (fetch their wheels with" \
       "benchmarks/fetch_device_wheels.sh DIR and pass --wheels=DIR)" >&2
  exit 2
fi

echo "device check: results in $OUT_DIR/device_check.json, log in $LOG"
"$PYTHON" "$REPO/benchmarks/device_check.py" --out="$OUT_DIR" $REHEARSE ${REFERENCE:+--reference_repo="$REFERENCE"}
