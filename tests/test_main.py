"""The command-line entry point, run as a user runs it (a subprocess on the 2 simulated CPU devices of
conftest.py): a toy training run that checkpoints, logs and writes samples, its resumption, and the
errors that must come before anything compiles."""
import functools
import glob
import os
import time

import pytest

from helpers import TOY_TRAIN_ARGS, finish, popen_command, run_command, run_in_parallel

pytestmark = pytest.mark.slow  # runs the training command in subprocesses

TOY = TOY_TRAIN_ARGS + [
    "--config.training.steps_per_call=2",
    "--config.training.log_every_steps=2",
    "--config.training.checkpoint_every_steps=2",
    "--config.training.num_grid_samples=4",
    "--config.training.grid_sampling_steps=5",
]


def run_main(*args):
  """The training command run to its end, and the seconds it took."""
  start = time.monotonic()
  proc = run_command("main", *args)
  return proc, time.monotonic() - start


def test_toy_run_checkpoints_logs_samples_and_resumes(tmp_path):
  workdir = tmp_path / "run"
  proc, _ = run_main(*TOY, f"--workdir={workdir}", "--config.training.num_train_steps=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (workdir / "checkpoints" / "4").is_dir()
  assert (workdir / "checkpoints" / "2").is_dir()
  assert glob.glob(str(workdir / "events.out.tfevents.*"))
  assert sorted(os.listdir(workdir / "samples")) == ["ema_0.995_step_00000004.png"]
  config_json = (workdir / "config.json").read_text()
  assert '"num_train_steps": 4' in config_json and '"image_size": 8' in config_json
  # A quiet console: our lines (one per log interval, with loss, speed and ETA), no library INFO records.
  assert "step 4: loss" in proc.stderr and "images/s, ETA" in proc.stderr
  assert "checkpoint_manager.py" not in proc.stderr and "xla_bridge.py" not in proc.stderr, proc.stderr[-3000:]

  # --verbosity=1 shows them again, and the scalars the writer records.
  proc, _ = run_main(*TOY, f"--workdir={workdir}", "--config.training.num_train_steps=6", "--verbosity=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoint_manager.py" in proc.stderr and "[6] " in proc.stderr
  assert "Resuming from the checkpoint of step 4." in proc.stderr
  assert "Training steps 4..6" in proc.stderr
  assert (workdir / "checkpoints" / "6").is_dir()
  assert "ema_0.995_step_00000006.png" in os.listdir(workdir / "samples")


# name -> the overrides of a toy run (into its own new workdir) that must fail before anything compiles
FAIL_FAST = {
    "unknown override": ["--config.training.batchsize=8"],
    "bad value": ["--config.diffusion.noise_schedule=cosinus"],
    "missing dataset": ["--config.data.dataset=cifar10", "--config.data.data_dir=/nonexistent",
                        "--config.model.image_size=32", "--config.model.in_channels=3"],
    "indivisible batch": ["--config.training.batch_size=7"],
}


@pytest.fixture(scope="module")
def fail_fast(tmp_path_factory):
  """{name: (its workdir, CompletedProcess, seconds)} of the FAIL_FAST runs, three at a time."""
  def fail(workdir, overrides):
    return (workdir, *run_main(*TOY, f"--workdir={workdir}", *overrides))

  return run_in_parallel({name: functools.partial(fail, tmp_path_factory.mktemp("fail_fast"), overrides)
                          for name, overrides in FAIL_FAST.items()})


def assert_fails_fast(proc, seconds, *messages):
  assert proc.returncode != 0
  for message in messages:
    assert message in proc.stderr, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "Compiling" not in proc.stderr
  assert seconds < 60, f"took {seconds:.0f} s to fail"


def test_unknown_override_fails_fast(fail_fast):
  _, proc, seconds = fail_fast["unknown override"]
  assert_fails_fast(proc, seconds, "Unknown config override --config.training.batchsize",
                    "config.training has no field 'batchsize'", "batch_size")


def test_bad_value_fails_fast(fail_fast):
  _, proc, seconds = fail_fast["bad value"]
  assert_fails_fast(proc, seconds, "config.diffusion.noise_schedule='cosinus' is not one of")


def test_missing_dataset_fails_fast(fail_fast):
  workdir, proc, seconds = fail_fast["missing dataset"]
  assert_fails_fast(proc, seconds, "FATAL config error: config.data:", "cifar10")
  assert not os.path.exists(workdir / "checkpoints")


def test_indivisible_batch_fails_fast(fail_fast):
  _, proc, seconds = fail_fast["indivisible batch"]
  assert_fails_fast(proc, seconds, "config.training.batch_size=7 does not divide over the 2 devices")


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
  workdir = tmp_path / "run"
  proc = popen_command("main", *TOY, f"--workdir={workdir}", "--config.training.num_train_steps=100000",
                       "--config.training.checkpoint_every_steps=100000")
  try:
    deadline = time.monotonic() + 240
    while not glob.glob(str(workdir / "events.out.tfevents.*")) and time.monotonic() < deadline:
      time.sleep(1)
    time.sleep(3)  # inside the training loop
    proc.send_signal(15)
    stderr = finish(proc, timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, stderr[-3000:]
  assert "SIGTERM: saved the checkpoint of step" in stderr
  steps = [int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit()]
  assert len(steps) == 1 and 0 < steps[0] < 100000
