# Helpers shared by the launch scripts: sourced, never run.
# shellcheck shell=bash

# XLA flags that help the UNet step on NVIDIA GPUs: the latency-hiding scheduler overlaps the gradient
# all-reduce with the backward pass, and the collectives get the highest-priority stream.
# tests/test_launch.py checks that our jaxlib knows every one (XLA aborts on an unknown flag).
# shellcheck disable=SC2034  # used by the scripts that source this file
DEFAULT_GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_highest_priority_async_stream=true"

die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

# One command as a line that can be pasted into a shell.
quote_cmd() {
  local words=() w
  for w in "$@"; do
    if [[ $w =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then words+=("$w"); else words+=("${w@Q}"); fi
  done
  printf '%s\n' "${words[*]}"
}

# Runs a command; with DRY_RUN=1 prints it ("+ cmd") instead.
run_or_print() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$(quote_cmd "$@")"
  else
    "$@"
  fi
}

# The jax version of the lock file (constraints-py311.txt): the TPU/CUDA wheels must match it.
jax_pin() {
  local pin
  pin=$(sed -n 's/^jax==\([0-9.]*\)$/\1/p' "$1/constraints-py311.txt")
  [[ -n $pin ]] || die "no jax==X pin found in $1/constraints-py311.txt"
  printf '%s\n' "$pin"
}

# Fails early on a config file that does not exist: $1 as the training will see it, $2 where to look
# for it here (CONFIG may end in ":param", as config_flags allows).
check_config() {
  local config=${1%%:*} where=${2:-.}
  [[ -f $where/$config || ( $config == /* && -f $config ) ]] \
    || die "config file $config not found (in $where); give e.g. configs/cifar10.py"
}

check_dry_run() {
  [[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || die "DRY_RUN must be 0 or 1, not '$DRY_RUN'"
}
