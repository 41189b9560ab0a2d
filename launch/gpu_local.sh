#!/usr/bin/env bash
# One machine with several NVIDIA GPUs: install the CUDA build of jax, then train (or sample) on all local GPUs
# in one process. With COORDINATOR_ADDRESS set it is one process of a multi-node run without SLURM.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/common.sh
source "$REPO_ROOT/launch/common.sh"

: "${PYTHON:=python3}"
: "${MEM_FRACTION:=0.90}"
: "${GPU_XLA_FLAGS:=$DEFAULT_GPU_XLA_FLAGS}"
: "${COORDINATOR_ADDRESS:=}"
: "${NUM_PROCESSES:=}"
: "${PROCESS_ID:=}"
: "${DRY_RUN:=0}"

usage() {
  cat <<EOF
Usage: launch/gpu_local.sh COMMAND [ARGS...]

Commands:
  setup                           $PYTHON -m pip install -e $REPO_ROOT "jax[cuda12]==$(jax_pin "$REPO_ROOT")"
                                  (the CUDA 12 pip wheels matching our jax pin)
  run CONFIG WORKDIR [FLAGS...]   python -m ddpm_ip_jax.main --config=CONFIG --workdir=WORKDIR FLAGS...
                                  on every visible GPU (the global batch is split over them); FLAGS are config
                                  overrides, e.g. --config.training.batch_size=128. Re-running resumes.
  sample WORKDIR [FLAGS...]       python -m ddpm_ip_jax.sample --workdir=WORKDIR FLAGS...
                                  e.g. --num_samples=50000 --steps=100

Both run in the foreground (the process is exec'ed, so a SIGTERM reaches the training and it checkpoints).

Environment (value now in effect; the default unless you set it):
  PYTHON=$PYTHON  (the interpreter of the environment to install into / run with)
  CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-<unset: all GPUs>}
  MEM_FRACTION=$MEM_FRACTION  (exported as XLA_PYTHON_CLIENT_MEM_FRACTION)
  GPU_XLA_FLAGS=$GPU_XLA_FLAGS
      (prepended to XLA_FLAGS)
  COORDINATOR_ADDRESS=${COORDINATOR_ADDRESS:-<unset: one machine>} NUM_PROCESSES=${NUM_PROCESSES:-<unset>} PROCESS_ID=${PROCESS_ID:-<unset>}
      (multi-node without SLURM: run the same command on every node, with its own PROCESS_ID;
       COORDINATOR_ADDRESS is HOST:PORT of process 0)
  DRY_RUN=$DRY_RUN (1: print the commands instead of running them)

Example:
  CUDA_VISIBLE_DEVICES=0,1,2,3 launch/gpu_local.sh run configs/cifar10.py runs/c10
EOF
  exit 2
}

export_gpu_env() {
  local xla_flags="$GPU_XLA_FLAGS${XLA_FLAGS:+ $XLA_FLAGS}"
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ export %s\n' "$(quote_cmd "XLA_FLAGS=$xla_flags")" \
      "$(quote_cmd "XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION")"
    [[ -z ${CUDA_VISIBLE_DEVICES:-} ]] || printf '+ export %s\n' "$(quote_cmd "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES")"
  fi
  export XLA_FLAGS=$xla_flags XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION
}

# --distributed=true and the explicit coordinates, when this is one process of a multi-node run.
distributed_flags() {
  if [[ -z $COORDINATOR_ADDRESS && -z $NUM_PROCESSES && -z $PROCESS_ID ]]; then
    return
  fi
  [[ $COORDINATOR_ADDRESS =~ ^[^:]+:[0-9]+$ ]] || die "COORDINATOR_ADDRESS must be HOST:PORT, not '$COORDINATOR_ADDRESS'"
  [[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] || die "NUM_PROCESSES must be a positive number, not '$NUM_PROCESSES'"
  if [[ ! $PROCESS_ID =~ ^[0-9]+$ ]] || ((PROCESS_ID >= NUM_PROCESSES)); then
    die "PROCESS_ID must be in [0, NUM_PROCESSES), not '$PROCESS_ID'"
  fi
  printf '%s\n' --distributed=true "--coordinator_address=$COORDINATOR_ADDRESS" \
    "--num_processes=$NUM_PROCESSES" "--process_id=$PROCESS_ID"
}

# Replaces this shell by the command (DRY_RUN=1: prints it).
exec_or_print() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$(quote_cmd "$@")"
  else
    exec "$@"
  fi
}

cmd_setup() {
  (($# == 0)) || die "setup takes no arguments"
  run_or_print "$PYTHON" -m pip install -e "$REPO_ROOT" "jax[cuda12]==$(jax_pin "$REPO_ROOT")"
  run_or_print "$PYTHON" -c 'import jax; print(jax.devices())'
}

cmd_run() {
  (($# >= 2)) || die "run needs CONFIG and WORKDIR (see launch/gpu_local.sh -h)"
  local config=$1 workdir=$2
  shift 2
  check_config "$config"
  local dist
  dist=$(distributed_flags)
  local -a dist_args=()
  [[ -z $dist ]] || mapfile -t dist_args <<<"$dist"
  export_gpu_env
  exec_or_print "$PYTHON" -m ddpm_ip_jax.main "--config=$config" "--workdir=$workdir" "${dist_args[@]}" "$@"
}

cmd_sample() {
  (($# >= 1)) || die "sample needs WORKDIR (see launch/gpu_local.sh -h)"
  local workdir=$1
  shift
  export_gpu_env
  exec_or_print "$PYTHON" -m ddpm_ip_jax.sample "--workdir=$workdir" "$@"
}

check_dry_run
[[ $MEM_FRACTION =~ ^0?\.[0-9]+$|^1(\.0*)?$ ]] || die "MEM_FRACTION must be in (0, 1], not '$MEM_FRACTION'"
(($# >= 1)) || usage
command=$1
shift
case $command in
  setup) cmd_setup "$@" ;;
  run) cmd_run "$@" ;;
  sample) cmd_sample "$@" ;;
  -h | --help | help) usage ;;
  *) printf 'error: unknown command %s\n\n' "$command" >&2 && usage ;;
esac
