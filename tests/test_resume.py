"""Resume is checked, not assumed: a changed config or architecture stops the run before anything compiles or
is written; an unreadable newest checkpoint is reported and the newest readable one used (training and
sampling); Ctrl-C stops at a checkpoint like SIGTERM.

The training command runs as a subprocess on the toy config (configs/test.py), 2 steps per checkpoint. Each test's
scenario (a `_scenario_...` function: its commands and assertions) runs on its own copy of the session's toy run
(conftest's `toy_run`, checkpoints 2 and 4), three scenarios at a time in a module fixture; the test then raises
what its scenario raised."""
import functools
import json
import os
import shutil
import signal

import pytest

from helpers import (TOY_TRAIN_ARGS, assert_one_fatal_line, finish, finished_in_parallel, popen_command, read_until,
                     run_command)
from ddpm_ip_jax import workdir as workdir_lib

pytestmark = pytest.mark.slow  # the training command in subprocesses

DAMAGES = ("empty_dir", "garbage_metadata", "truncated_arrays")


def run_main(workdir, *args):
  return run_command("main", *TOY_TRAIN_ARGS, f"--workdir={workdir}", *args)


def fatal_line(proc):
  """The one FATAL line of a failed run; asserts that there is no traceback and nothing compiled."""
  assert "Training steps" not in proc.stderr, proc.stderr[-3000:]
  return assert_one_fatal_line(proc)


@pytest.fixture(scope="module")
def scenarios(toy_run, tmp_path_factory):
  """{test name: the finished Future of its scenario}, each scenario given a fresh copy of the toy run."""
  def copy(name):
    workdir = tmp_path_factory.mktemp(name) / "run"
    shutil.copytree(toy_run, workdir)
    return workdir

  calls = {name: functools.partial(scenario, copy(name)) for name, scenario in [
      ("changed_config", _scenario_changed_config), ("changed_architecture", _scenario_changed_architecture),
      ("no_readable", _scenario_no_readable_checkpoint)]}
  calls["ctrl_c"] = functools.partial(_scenario_ctrl_c, tmp_path_factory.mktemp("ctrl_c") / "run")
  for damage in DAMAGES:
    run = copy(damage)
    calls[damage] = functools.partial(_scenario_unreadable_newest, run, _damage_newest(run, damage))
  return finished_in_parallel(calls)


def test_a_changed_config_stops_the_resume_and_names_the_fields(scenarios):
  scenarios["changed_config"].result()


def _scenario_changed_config(run):
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


def test_a_changed_architecture_fails_before_compiling_and_keeps_config_json(scenarios):
  scenarios["changed_architecture"].result()


def _scenario_changed_architecture(run):
  before = (run / "config.json").read_text()
  line = fatal_line(run_main(run, "--config.training.num_train_steps=6", "--config.model.model_channels=64"))
  assert "model.model_channels: 32 in config.json, 64 now" in line
  # Allowed by mistake: the restored arrays are checked against the model's shapes.
  line = fatal_line(run_main(run, "--config.training.num_train_steps=6", "--config.model.model_channels=64",
                             "--allow_config_change=model"))
  assert "does not match this config" in line and "in the checkpoint" in line and "here" in line
  assert (run / "config.json").read_text() == before


def _damage_newest(run, damage):
  """Makes the newest checkpoint (step 4) of `run` unreadable; returns the step that sampling (read-only) then
  loads, with a warning. Called in the main thread: orbax in this process stays off the scenarios' threads."""
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
  return workdir_lib.load_model(workdir=str(run)).step


@pytest.mark.parametrize("damage", DAMAGES)
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(scenarios, damage):
  run, sampled_step = scenarios[damage].result()
  # Sampling (read-only) fell back with a warning.
  assert sampled_step == 2
  # Training set it aside and saved steps 4 and 6 anew (checked by the scenario); the newest is read now.
  assert workdir_lib.load_model(workdir=str(run)).step == 6


def _scenario_unreadable_newest(run, sampled_step):
  # Training reports it, sets it aside, resumes from step 2 and saves 4 anew.
  proc = run_main(run, "--config.training.num_train_steps=6")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"The checkpoint of step 4 ({run / 'checkpoints' / '4'}) cannot be read" in proc.stderr
  assert "Resuming from the checkpoint of step 2." in proc.stderr
  assert (run / "checkpoints" / "4.unreadable").is_dir()
  assert sorted(int(n) for n in os.listdir(run / "checkpoints") if n.isdigit())[-1] == 6
  return run, sampled_step


def test_no_readable_checkpoint_is_one_line(scenarios):
  scenarios["no_readable"].result()


def _scenario_no_readable_checkpoint(run):
  for step in ("2", "4"):
    (run / "checkpoints" / step / "default" / "_METADATA").write_text("garbage")
  line = fatal_line(run_main(run, "--config.training.num_train_steps=6"))
  assert "No checkpoint in" in line and "step 4:" in line and "step 2:" in line


def test_ctrl_c_saves_a_checkpoint_and_stops(scenarios):
  scenarios["ctrl_c"].result()


def _scenario_ctrl_c(workdir):
  proc = popen_command("main", *TOY_TRAIN_ARGS, f"--workdir={workdir}", "--config.training.num_train_steps=100000",
                       "--config.training.checkpoint_every_steps=100000", "--config.training.log_every_steps=1")
  try:
    seen = read_until(proc, "] step 2:")
    proc.send_signal(signal.SIGINT)
    err = "".join(seen) + finish(proc, timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-3000:]
  assert "SIGINT: saved the checkpoint of step" in err and "KeyboardInterrupt" not in err
  steps = [int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
  assert len(steps) == 1 and steps[0] >= 2


def test_a_full_disk_is_one_line_and_leaves_no_partial_write(toy_run, tmp_path, scenarios):
  """The file-size limit (RLIMIT_FSIZE) stands in for a full disk: writes beyond it fail with EFBIG, as they
  fail with ENOSPC when the disk is full, and orbax reports both the same way. Run here, not among the scenarios:
  `preexec_fn` is not safe while other threads run (the scenarios are finished by now)."""
  import resource  # pylint: disable=import-outside-toplevel
  del scenarios  # finished: no thread of theirs is running
  run = tmp_path / "run"
  shutil.copytree(toy_run, run)

  def small_files():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

  proc = run_command("main", *TOY_TRAIN_ARGS, f"--workdir={run}", "--config.training.num_train_steps=8",
                     "--config.training.tensorboard=False", preexec_fn=small_files)
  assert "Resuming from the checkpoint of step 4." in proc.stderr, proc.stderr[-3000:]
  line = assert_one_fatal_line(proc)
  assert "No space left to write the checkpoint of step 6" in line
  assert "The last good checkpoint is step 4" in line
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]  # no orbax-checkpoint-tmp directory left
