"""Resume is checked, not assumed: a changed config or architecture stops the run before anything compiles or
is written; an unreadable newest checkpoint is reported and the newest readable one used (training and
sampling); Ctrl-C stops at a checkpoint like SIGTERM.

The training command runs as a subprocess on the toy config (configs/test.py), 2 steps per checkpoint."""
import json
import os
import signal
import subprocess
import sys

import pytest

from helpers import REPO, TOY_TRAIN_ARGS
from ddpm_ip_jax import workdir as workdir_lib

pytestmark = pytest.mark.slow  # the training command in subprocesses

TOY = TOY_TRAIN_ARGS + ["--config.training.num_grid_samples=2", "--config.training.grid_sampling_steps=2"]


def run_main(workdir, *args, timeout=300):
  return subprocess.run([sys.executable, "-m", "ddpm_ip_jax.main", *TOY, f"--workdir={workdir}", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def fatal_line(proc):
  """The one FATAL line of a failed run; asserts that there is no traceback and nothing compiled."""
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr and "Training steps" not in proc.stderr, proc.stderr[-3000:]
  (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("FATAL")]
  return line


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A toy run with checkpoints 2 and 4 (and config.json), copied for each test that damages it."""
  workdir = tmp_path_factory.mktemp("resume") / "run"
  proc = run_main(workdir, "--config.training.num_train_steps=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture
def run(trained, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  return workdir


def test_a_changed_config_stops_the_resume_and_names_the_fields(run):
  before = (run / "config.json").read_text()
  line = fatal_line(run_main(run, "--config.training.num_train_steps=6", "--config.diffusion.input_perturbation=0.2",
                             "--config.training.ema_rates=0.99"))
  assert "diffusion.input_perturbation: 0.1 in config.json, 0.2 now" in line
  assert "training.ema_rates: (0.995,) in config.json, (0.99,) now" in line
  assert "--allow_config_change=diffusion.input_perturbation,training.ema_rates" in line
  assert (run / "config.json").read_text() == before
  # Harmless fields (steps, cadence, learning rate) resume without a word; an allowed change resumes too.
  proc = run_main(run, "--config.training.num_train_steps=6", "--config.training.learning_rate=5e-4",
                  "--config.diffusion.input_perturbation=0.2", "--allow_config_change=diffusion.input_perturbation")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Resuming from the checkpoint of step 4." in proc.stderr
  saved = json.loads((run / "config.json").read_text())
  assert saved["diffusion"]["input_perturbation"] == 0.2 and saved["training"]["learning_rate"] == 5e-4


def test_a_changed_architecture_fails_before_compiling_and_keeps_config_json(run):
  before = (run / "config.json").read_text()
  line = fatal_line(run_main(run, "--config.training.num_train_steps=6", "--config.model.model_channels=64"))
  assert "model.model_channels: 32 in config.json, 64 now" in line
  # Allowed by mistake: the restored arrays are checked against the model's shapes.
  line = fatal_line(run_main(run, "--config.training.num_train_steps=6", "--config.model.model_channels=64",
                             "--allow_config_change=model"))
  assert "does not match this config" in line and "in the checkpoint" in line and "here" in line
  assert (run / "config.json").read_text() == before


@pytest.mark.parametrize("damage", ["empty_dir", "garbage_metadata", "truncated_arrays"])
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(run, damage):
  newest = run / "checkpoints" / "4"
  if damage == "empty_dir":
    for root, _, files in os.walk(newest):
      for f in files:
        os.remove(os.path.join(root, f))
  elif damage == "garbage_metadata":
    (newest / "default" / "_METADATA").write_text("not json {")
  else:
    for root, _, files in os.walk(newest / "default"):
      for f in files:
        if os.path.basename(root) == "d":
          with open(os.path.join(root, f), "r+b") as fh:
            fh.truncate(7)
  # Sampling (read-only) falls back with a warning.
  from ddpm_ip_jax.workdir import load_model  # pylint: disable=import-outside-toplevel
  loaded = load_model(workdir=str(run))
  assert loaded.step == 2
  # Training reports it, sets it aside, resumes from step 2 and saves 4 anew.
  proc = run_main(run, "--config.training.num_train_steps=6")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"The checkpoint of step 4 ({newest}) cannot be read" in proc.stderr
  assert "Resuming from the checkpoint of step 2." in proc.stderr
  assert (run / "checkpoints" / "4.unreadable").is_dir()
  assert sorted(int(n) for n in os.listdir(run / "checkpoints") if n.isdigit())[-1] == 6
  assert workdir_lib.load_model(workdir=str(run)).step == 6


def test_no_readable_checkpoint_is_one_line(run):
  for step in ("2", "4"):
    (run / "checkpoints" / step / "default" / "_METADATA").write_text("garbage")
  line = fatal_line(run_main(run, "--config.training.num_train_steps=6"))
  assert "No checkpoint in" in line and "step 4:" in line and "step 2:" in line


def test_ctrl_c_saves_a_checkpoint_and_stops(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, "-m", "ddpm_ip_jax.main", *TOY, f"--workdir={workdir}",
                           "--config.training.num_train_steps=100000",
                           "--config.training.checkpoint_every_steps=100000", "--config.training.log_every_steps=1"],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  seen = []
  try:
    for line in proc.stderr:
      seen.append(line)
      if "] step 2:" in line:
        proc.send_signal(signal.SIGINT)
        break
    _, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  err = "".join(seen) + err
  assert proc.returncode == 0, err[-3000:]
  assert "SIGINT: saved the checkpoint of step" in err and "KeyboardInterrupt" not in err
  steps = [int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
  assert len(steps) == 1 and steps[0] >= 2


def test_a_full_disk_is_one_line_and_leaves_no_partial_write(run):
  """The file-size limit (RLIMIT_FSIZE) stands in for a full disk: writes beyond it fail with EFBIG, as they
  fail with ENOSPC when the disk is full, and orbax reports both the same way."""
  import resource  # pylint: disable=import-outside-toplevel

  def small_files():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

  proc = subprocess.run([sys.executable, "-m", "ddpm_ip_jax.main", *TOY, f"--workdir={run}",
                         "--config.training.num_train_steps=8", "--config.training.tensorboard=False"], cwd=REPO,
                        capture_output=True, text=True, timeout=300, preexec_fn=small_files)
  assert "Resuming from the checkpoint of step 4." in proc.stderr, proc.stderr[-3000:]
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("FATAL")]
  assert "No space left to write the checkpoint of step 6" in line
  assert "The last good checkpoint is step 4" in line
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]  # no orbax-checkpoint-tmp directory left
