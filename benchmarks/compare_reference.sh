#!/usr/bin/env bash
# JAX against the PyTorch reference (forever208/DDPM-IP) on this machine's CPU: the training step and the sampler,
# each measurement in its own process, JAX and the reference alternating; prints Markdown tables per pair and the
# medians (benchmarks/compare_table.py).
#
#   bash benchmarks/compare_reference.sh --reference_repo=DIR [--channels=64] [--batch=32] [--pairs=2] \
#       [--train_steps=5] [--reference_warmup_steps=2] [--sample_steps=100] [--sample_batch=32] \
#       [--dtype=float32] [--cores=N] [--parts=train,sample] [--out=DIR]
#
# --reference_repo=DIR  the folder holding the reference's guided_diffusion/ (git clone
#                 https://github.com/forever208/DDPM-IP; not part of this repository).
# --channels, --batch   base channels of the CIFAR-10 UNet and the training batch (both sides).
# --train_steps   timed training steps per process (JAX: its timed and as many pipelined calls after the
#                 compiling one; reference: after --reference_warmup_steps untimed ones).
# --sample_steps, --sample_batch  the sampler's steps (the 1000 respaced to that many evenly spaced ones, both
#                 sides) and its total batch (JAX splits it over its devices, so it must divide by --cores).
# --dtype         JAX's compute dtype (the reference runs float32: its fp16 mode is CUDA only).
# --cores         JAX CPU devices and torch threads (default: nproc).
# --parts         train, sample or both; --out  results folder (default ./compare_out): one .jsonl per process
#                 (its JSON lines and its wall time), one .log (its stderr), setup.json, table.md.
# Both sides run with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (docs/performance.md, "Host memory").
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REFERENCE=""
CHANNELS=64
BATCH=32
PAIRS=2
TRAIN_STEPS=5
REF_WARMUP=2
SAMPLE_STEPS=100
SAMPLE_BATCH=32
DTYPE=float32
CORES="$(nproc)"
PARTS="train,sample"
OUT_DIR="$PWD/compare_out"
for arg in "$@"; do
  case "$arg" in
    --reference_repo=*) REFERENCE="${arg#*=}" ;;
    --channels=*) CHANNELS="${arg#*=}" ;;
    --batch=*) BATCH="${arg#*=}" ;;
    --pairs=*) PAIRS="${arg#*=}" ;;
    --train_steps=*) TRAIN_STEPS="${arg#*=}" ;;
    --reference_warmup_steps=*) REF_WARMUP="${arg#*=}" ;;
    --sample_steps=*) SAMPLE_STEPS="${arg#*=}" ;;
    --sample_batch=*) SAMPLE_BATCH="${arg#*=}" ;;
    --dtype=*) DTYPE="${arg#*=}" ;;
    --cores=*) CORES="${arg#*=}" ;;
    --parts=*) PARTS="${arg#*=}" ;;
    --out=*) OUT_DIR="${arg#*=}" ;;
    -h|--help) sed -n '2,21p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "compare_reference.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

fail() { echo "compare_reference.sh: $*" >&2; exit 2; }
[[ -n "$REFERENCE" ]] || fail "--reference_repo=DIR is required (the folder holding guided_diffusion/)"
[[ -d "$REFERENCE/guided_diffusion" ]] || fail "$REFERENCE has no guided_diffusion/ folder"
for value in "$CHANNELS" "$BATCH" "$PAIRS" "$TRAIN_STEPS" "$REF_WARMUP" "$SAMPLE_STEPS" "$SAMPLE_BATCH" "$CORES"; do
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || fail "'$value' is not a positive integer (see --help)"
done
case "$PARTS" in
  train|sample|train,sample|sample,train) ;;
  *) fail "--parts=$PARTS: give train, sample or train,sample" ;;
esac
(( BATCH % CORES == 0 )) || fail "--batch=$BATCH does not split over $CORES JAX devices"
(( SAMPLE_BATCH % CORES == 0 )) || fail "--sample_batch=$SAMPLE_BATCH does not split over $CORES JAX devices"

REFERENCE="$(cd "$REFERENCE" && pwd)"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
rm -f "$OUT_DIR"/pair*_*.jsonl "$OUT_DIR"/pair*_*.log "$OUT_DIR/table.md"
PYTHON="${PYTHON:-python3}"
cd "$REPO"
export LC_ALL=C  # a point as the decimal separator of EPOCHREALTIME
export GLIBC_TUNABLES=glibc.malloc.hugetlb=1
JAX_ENV=("XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$CORES")
JAX_ARGS=(-m ddpm_ip_jax.benchmark --config=configs/cifar10.py "--config.model.model_channels=$CHANNELS"
          "--config.model.dtype=$DTYPE")
REF_ARGS=("--reference_repo=$REFERENCE" "--num_channels=$CHANNELS" "--threads=$CORES" --device=cpu)

cpu="$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)"
"$PYTHON" -c 'import json, sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
  date "$(date -u '+%Y-%m-%d %H:%M UTC')" machine "$(uname -m)" cpu "${cpu:-unknown}" cores "$CORES" \
  channels "$CHANNELS" batch "$BATCH" pairs "$PAIRS" train_steps "$TRAIN_STEPS" \
  reference_warmup_steps "$REF_WARMUP" sample_steps "$SAMPLE_STEPS" sample_batch "$SAMPLE_BATCH" \
  dtype "$DTYPE" parts "$PARTS" glibc_tunables "$GLIBC_TUNABLES" > "$OUT_DIR/setup.json"

# run NAME COMMAND...: runs COMMAND with its stdout's JSON lines in NAME.jsonl and its stderr in NAME.log, then
# appends the wall time from launch to exit and the exit status as one more JSON line; a failed run does not
# stop the comparison (the table marks it).
run() {
  local name="$1" start end rc=0
  shift
  echo "[$(date -u '+%H:%M:%S')] $name: $*" >&2
  start="$EPOCHREALTIME"
  "$@" > "$OUT_DIR/$name.out" 2> "$OUT_DIR/$name.log" || rc=$?
  end="$EPOCHREALTIME"
  { grep '^{' "$OUT_DIR/$name.out" || true
    awk -v a="$start" -v b="$end" -v rc="$rc" 'BEGIN { printf "{\"what\": \"wall\", \"wall_s\": %.3f, \"rc\": %d}\n", b - a, rc }'
  } > "$OUT_DIR/$name.jsonl"
  rm -f "$OUT_DIR/$name.out"
  if (( rc != 0 )); then
    echo "  $name failed (exit status $rc): see $OUT_DIR/$name.log" >&2
  fi
}

for (( pair = 1; pair <= PAIRS; pair++ )); do
  if [[ ",$PARTS," == *,train,* ]]; then
    run "pair${pair}_jax_train" env "${JAX_ENV[@]}" "$PYTHON" "${JAX_ARGS[@]}" "--config.training.batch_size=$BATCH" \
      "--train_steps=$TRAIN_STEPS" --sample_steps=
    run "pair${pair}_reference_train" "$PYTHON" benchmarks/reference_pytorch_step.py "${REF_ARGS[@]}" \
      "--batch_size=$BATCH" "--steps=$TRAIN_STEPS" "--warmup_steps=$REF_WARMUP"
  fi
  if [[ ",$PARTS," == *,sample,* ]]; then
    run "pair${pair}_jax_sample" env "${JAX_ENV[@]}" "$PYTHON" "${JAX_ARGS[@]}" --train_steps=0 \
      "--sample_steps=$SAMPLE_STEPS" "--sample_batch=$(( SAMPLE_BATCH / CORES ))"
    run "pair${pair}_reference_sample" "$PYTHON" benchmarks/reference_pytorch_sample.py "${REF_ARGS[@]}" \
      "--batch_size=$SAMPLE_BATCH" "--timestep_respacing=$SAMPLE_STEPS"
  fi
done

"$PYTHON" benchmarks/compare_table.py "$OUT_DIR" | tee "$OUT_DIR/table.md"
