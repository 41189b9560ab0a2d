#!/usr/bin/env bash
# Cloud TPU pod slice: create it, install this repo on every worker, run the same training command on every
# worker (jax.distributed.initialize() finds the pod by itself), stop it with a checkpoint, read logs, delete it.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/common.sh
source "$REPO_ROOT/launch/common.sh"

: "${TPU_NAME:=ddpm-ip}"
: "${ZONE:=us-central2-b}"
: "${ACCELERATOR_TYPE:=v4-32}"
: "${RUNTIME_VERSION:=tpu-ubuntu2204-base}"
: "${PROJECT:=}"
: "${REPO_URL:=}"
: "${GIT_REF:=main}"
: "${REMOTE_DIR:=ddpm-ip-jax}"
: "${REMOTE_VENV:=ddpm-ip-venv}"
: "${REMOTE_LOG_DIR:=ddpm-ip-logs}"
: "${PYTHON_VERSION:=3.11}"
: "${UV_VERSION:=0.13.9}"
: "${LIBTPU_INDEX:=https://storage.googleapis.com/jax-releases/libtpu_releases.html}"
: "${WORKER:=0}"
: "${LOG_LINES:=100}"
: "${FOLLOW:=0}"
: "${JOB:=train}"
: "${STOP_TIMEOUT:=600}"
: "${ALLOW_LOCAL_WORKDIR:=0}"
: "${DRY_RUN:=0}"

usage() {
  cat <<EOF
Usage: launch/tpu_pod.sh COMMAND [ARGS...]

Commands:
  create [--preemptible | --spot]     create the TPU VM slice TPU_NAME
  setup                               on every worker: copy this checkout (or clone REPO_URL at GIT_REF), make a
                                      Python $PYTHON_VERSION venv with uv, pip install -e . "jax[tpu]==$(jax_pin "$REPO_ROOT")" -f LIBTPU_INDEX
  run CONFIG WORKDIR [FLAGS...]       on every worker, in the background (nohup):
                                        python -m ddpm_ip_jax.main --config=CONFIG --workdir=WORKDIR --distributed=true FLAGS...
                                      CONFIG is relative to the repo (configs/cifar10.py); WORKDIR must be a gs:// bucket
                                      path that every worker sees; FLAGS are config overrides, e.g.
                                      --config.training.batch_size=512. Re-running after a preemption resumes.
  sample WORKDIR [FLAGS...]           on every worker, in the background: python -m ddpm_ip_jax.sample
                                      --workdir=WORKDIR --distributed=true FLAGS... (e.g. --num_samples=50000
                                      --steps=100); each worker draws its share, worker 0 writes the .npz; rerun resumes
  evaluate WORKDIR [FLAGS...]         the same with python -m ddpm_ip_jax.evaluate (samples, then FID etc. by worker 0;
                                      FLAGS: --extractor, --weights, --reference, ... as gs:// paths)
  stop                                SIGTERM the training on every worker (it saves a checkpoint), wait for it to exit
  logs                                tail the log of job JOB (train, sample, evaluate) of worker WORKER
  delete                              delete the slice

Environment (value now in effect; the default unless you set it):
  TPU_NAME=$TPU_NAME  ZONE=$ZONE  PROJECT=${PROJECT:-<gcloud default>}
  ACCELERATOR_TYPE=$ACCELERATOR_TYPE  RUNTIME_VERSION=$RUNTIME_VERSION
      (v4: tpu-ubuntu2204-base; v5e: v2-alpha-tpuv5-lite; v5p: v2-alpha-tpuv5; v6e: v2-alpha-tpuv6e)
  REPO_URL=${REPO_URL:-<empty: copy this checkout>}  GIT_REF=$GIT_REF
  REMOTE_DIR=$REMOTE_DIR  REMOTE_VENV=$REMOTE_VENV  REMOTE_LOG_DIR=$REMOTE_LOG_DIR  (relative to the worker's home)
  PYTHON_VERSION=$PYTHON_VERSION  UV_VERSION=$UV_VERSION  LIBTPU_INDEX=$LIBTPU_INDEX
  WORKER=$WORKER (logs: a worker index or all)  JOB=$JOB (logs: train, sample or evaluate)
  LOG_LINES=$LOG_LINES  FOLLOW=$FOLLOW (1: tail -F)
  STOP_TIMEOUT=$STOP_TIMEOUT (seconds stop waits for the checkpoint)
  ALLOW_LOCAL_WORKDIR=$ALLOW_LOCAL_WORKDIR (1: accept a non-gs:// WORKDIR, only right on a one-host slice)
  DRY_RUN=$DRY_RUN (1: print the gcloud commands instead of running them)

Example:
  TPU_NAME=c10 ACCELERATOR_TYPE=v4-32 launch/tpu_pod.sh create --spot
  TPU_NAME=c10 launch/tpu_pod.sh setup
  TPU_NAME=c10 launch/tpu_pod.sh run configs/cifar10.py gs://my-bucket/runs/c10 \\
      --config.data.data_dir=gs://my-bucket/tfds
EOF
  exit 2
}

# A worker path for a remote shell: relative paths are under the worker's home.
remote_path() {
  # shellcheck disable=SC2016  # $HOME is for the worker's shell to expand
  if [[ $1 == /* ]]; then printf '%q' "$1"; else printf '"$HOME"/%q' "$1"; fi
}

# Shell variables D (repo), V (venv), L (log dir) that every remote command starts with.
remote_vars() {
  printf 'D=%s; V=%s; L=%s; ' "$(remote_path "$REMOTE_DIR")" "$(remote_path "$REMOTE_VENV")" \
    "$(remote_path "$REMOTE_LOG_DIR")"
}

# gcloud compute tpus tpu-vm SUBCOMMAND ARGS... --zone=ZONE [--project=PROJECT]
gcloud_tpu() {
  local cmd=(gcloud compute tpus tpu-vm "$@" "--zone=$ZONE")
  [[ -z $PROJECT ]] || cmd+=("--project=$PROJECT")
  run_or_print "${cmd[@]}"
}

# Runs a shell command line on worker $1 (an index or all).
on_workers() {
  gcloud_tpu ssh "$TPU_NAME" "--worker=$1" "--command=$2"
}

cmd_create() {
  local extra=() arg
  for arg in "$@"; do
    case $arg in
      --preemptible | --spot) extra+=("$arg") ;;
      *) die "create takes only --preemptible or --spot, not '$arg'" ;;
    esac
  done
  ((${#extra[@]} <= 1)) || die "choose one of --preemptible and --spot"
  gcloud_tpu create "$TPU_NAME" "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION" "${extra[@]}"
}

# The working tree (tracked and untracked files that git does not ignore) as a tarball.
pack_checkout() {
  local tarball=$1
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ git -C %s ls-files -z --cached --others --exclude-standard | tar -czf %s --null -T -\n' \
      "$(quote_cmd "$REPO_ROOT")" "$(quote_cmd "$tarball")"
    return
  fi
  (
    cd "$REPO_ROOT"
    git ls-files -z --cached --others --exclude-standard \
      | while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done \
      | tar -czf "$tarball" --null -T -
  )
}

cmd_setup() {
  (($# == 0)) || die "setup takes no arguments"
  local get_code
  if [[ -n $REPO_URL ]]; then
    get_code="{ [ -d \"\$D/.git\" ] || git clone --quiet $(printf '%q' "$REPO_URL") \"\$D\"; } && \
git -C \"\$D\" fetch --quiet origin $(printf '%q' "$GIT_REF") && git -C \"\$D\" checkout --quiet --detach FETCH_HEAD"
  else
    local tmp tarball
    tmp=$(mktemp -d)
    tarball=$tmp/ddpm-ip-jax.tgz
    pack_checkout "$tarball"
    gcloud_tpu scp "$tarball" "$TPU_NAME:ddpm-ip-jax.tgz" --worker=all
    get_code="mkdir -p \"\$D\" && tar -xzf \"\$HOME\"/ddpm-ip-jax.tgz -C \"\$D\" && rm \"\$HOME\"/ddpm-ip-jax.tgz"
    rm -rf "$tmp"
  fi
  local jax_tpu
  jax_tpu="jax[tpu]==$(jax_pin "$REPO_ROOT")"
  on_workers all "set -e; $(remote_vars)$get_code && \
PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --quiet uv==$(printf '%q' "$UV_VERSION") && \
{ [ -x \"\$V/bin/python\" ] || python3 -m uv venv --seed --python $(printf '%q' "$PYTHON_VERSION") \"\$V\"; } && \
\"\$V/bin/pip\" install --quiet -e \"\$D\" $(printf '%q' "$jax_tpu") -f $(printf '%q' "$LIBTPU_INDEX") && \
echo \"\$(hostname): jax \$(\"\$V/bin/python\" -c 'import jax; print(jax.__version__)') in \$V\""
}

# start_job NAME MODULE ARGS...: python -m ddpm_ip_jax.MODULE ARGS... on every worker, in the background (nohup),
# logging to $L/NAME.log; refuses to start while that job still runs there.
start_job() {
  local name=$1 module=$2
  shift 2
  local job=(-m "ddpm_ip_jax.$module" "$@")
  local quoted="" arg
  for arg in "${job[@]}"; do quoted+=" $(printf '%q' "$arg")"; done
  on_workers all "$(remote_vars)cd \"\$D\" && mkdir -p \"\$L\" && \
if [ -f \"\$L/$name.pid\" ] && grep -qs ddpm_ip_jax.$module \"/proc/\$(cat \"\$L/$name.pid\")/cmdline\"; then \
echo \"\$(hostname): a $name job is already running (pid \$(cat \"\$L/$name.pid\")); stop it first\" >&2; exit 1; fi; \
echo \"== \$(date -u +%FT%TZ) python\"$quoted >> \"\$L/$name.log\"; \
nohup \"\$V/bin/python\"$quoted >> \"\$L/$name.log\" 2>&1 < /dev/null & \
echo \$! > \"\$L/$name.pid\"; echo \"\$(hostname): started pid \$!, log \$L/$name.log\""
}

check_shared_workdir() {
  if [[ $1 != gs://* && $ALLOW_LOCAL_WORKDIR != 1 ]]; then
    die "WORKDIR must be a gs:// path that every worker sees (got '$1'); ALLOW_LOCAL_WORKDIR=1 for a one-host slice"
  fi
}

cmd_run() {
  (($# >= 2)) || die "run needs CONFIG and WORKDIR (see launch/tpu_pod.sh -h)"
  local config=$1 workdir=$2
  shift 2
  check_config "$config" "$REPO_ROOT"
  check_shared_workdir "$workdir"
  start_job train main "--config=$config" "--workdir=$workdir" --distributed=true "$@"
}

# sample|evaluate WORKDIR [FLAGS...]: every worker draws its share of the samples into the workdir.
cmd_sample_or_evaluate() {
  local module=$1
  shift
  (($# >= 1)) || die "$module needs WORKDIR (see launch/tpu_pod.sh -h)"
  local workdir=$1
  shift
  check_shared_workdir "$workdir"
  start_job "$module" "$module" "--workdir=$workdir" --distributed=true "$@"
}

cmd_stop() {
  (($# == 0)) || die "stop takes no arguments"
  [[ $STOP_TIMEOUT =~ ^[0-9]+$ ]] || die "STOP_TIMEOUT must be a number of seconds, not '$STOP_TIMEOUT'"
  # A process counts as running while its command line names the training (a zombie's is empty).
  on_workers all "$(remote_vars)h=\$(hostname); \
if [ ! -f \"\$L/train.pid\" ]; then echo \"\$h: no training started here\"; exit 0; fi; \
pid=\$(cat \"\$L/train.pid\"); alive() { grep -qs ddpm_ip_jax.main \"/proc/\$pid/cmdline\"; }; \
if ! alive; then echo \"\$h: training not running\"; rm -f \"\$L/train.pid\"; exit 0; fi; \
kill -TERM \"\$pid\"; echo \"\$h: SIGTERM sent to \$pid, waiting up to $STOP_TIMEOUT s for its checkpoint\"; \
for _ in \$(seq $STOP_TIMEOUT); do alive || break; sleep 1; done; \
if alive; then echo \"\$h: still running after $STOP_TIMEOUT s\" >&2; exit 1; fi; \
rm -f \"\$L/train.pid\"; echo \"\$h: stopped\""
}

cmd_logs() {
  (($# == 0)) || die "logs takes no arguments (choose the worker with WORKER=)"
  [[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "WORKER must be a worker index or all, not '$WORKER'"
  [[ $LOG_LINES =~ ^[0-9]+$ ]] || die "LOG_LINES must be a number, not '$LOG_LINES'"
  local follow=""
  [[ $FOLLOW != 1 ]] || follow=" -F"
  [[ $JOB == train || $JOB == sample || $JOB == evaluate ]] || die "JOB must be train, sample or evaluate, not '$JOB'"
  on_workers "$WORKER" "$(remote_vars)echo \"==> \$(hostname) \$L/$JOB.log\"; tail -n $LOG_LINES$follow \"\$L/$JOB.log\""
}

cmd_delete() {
  (($# == 0)) || die "delete takes no arguments"
  gcloud_tpu delete "$TPU_NAME" --quiet
}

check_dry_run
(($# >= 1)) || usage
command=$1
shift
case $command in
  create) cmd_create "$@" ;;
  setup) cmd_setup "$@" ;;
  run) cmd_run "$@" ;;
  sample | evaluate) cmd_sample_or_evaluate "$command" "$@" ;;
  stop) cmd_stop "$@" ;;
  logs) cmd_logs "$@" ;;
  delete) cmd_delete "$@" ;;
  -h | --help | help) usage ;;
  *) printf 'error: unknown command %s\n\n' "$command" >&2 && usage ;;
esac
