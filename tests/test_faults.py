"""Surviving faults: SIGKILL in the middle of a checkpoint write, SIGTERM (preemption) then resume to the
parameters of an uninterrupted run, and a NaN loss (stop with a clear error and keep the last good
checkpoint, or skip the update when asked).

The kill tests run the entry point as a subprocess on the 2 simulated CPU devices of conftest.py; the NaN
tests call train_and_evaluate in this process with a batch poisoned at one step (a NaN pixel, as a broken
float dataset would give).
"""
import os
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import TOY_TRAIN_ARGS, finish, popen_command, read_until, toy_config
from ddpm_ip_jax import input_pipeline
from ddpm_ip_jax import train
from ddpm_ip_jax import train_step

pytestmark = pytest.mark.slow  # runs the training command in subprocesses

TOY = TOY_TRAIN_ARGS + [
    "--config.training.log_every_steps=1",
    "--config.training.num_grid_samples=2",
    "--config.training.grid_sampling_steps=2",
]


def _popen(workdir, *args, **kwargs):
  return popen_command("main", *TOY, f"--workdir={workdir}", *args, **kwargs)


def _steps(checkpoints):
  return sorted(int(p) for p in os.listdir(checkpoints) if p.isdigit())


def _restore(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "default"))


def _flat(tree):
  return {k: np.asarray(v) for k, v in ocp.tree.to_flat_dict(tree).items()}


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  checkpoints = workdir / "checkpoints"
  # A checkpoint after every step, so that one is nearly always being written.
  args = ["--config.training.num_train_steps=100000", "--config.training.checkpoint_every_steps=1",
          "--config.training.keep_checkpoints=100"]
  proc = _popen(workdir, *args)
  try:
    deadline, killed_mid_write = time.monotonic() + 240, False
    while time.monotonic() < deadline and proc.poll() is None:
      names = os.listdir(checkpoints) if checkpoints.is_dir() else []
      if any(n.isdigit() for n in names) and any(".orbax-checkpoint-tmp" in n for n in names):
        proc.send_signal(signal.SIGKILL)
        killed_mid_write = True
        break
      time.sleep(0.002)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert killed_mid_write, "never saw a checkpoint being written"
  assert proc.returncode == -signal.SIGKILL
  partial = [n for n in os.listdir(checkpoints) if ".orbax-checkpoint-tmp" in n]
  assert partial, "the write finished before the kill landed"
  last = _steps(checkpoints)[-1]
  assert all(int(n.split(".")[0]) > last for n in partial)

  # The next start resumes from the last complete checkpoint and finishes.
  state = _restore(workdir, last)
  assert int(state["step"]) == last and all(np.isfinite(v).all() for v in _flat(state["params"]).values())
  err = finish(_popen(workdir, "--config.training.num_train_steps=" + str(last + 2),
                       "--config.training.checkpoint_every_steps=1", "--config.training.keep_checkpoints=100"))
  assert f"Resuming from the checkpoint of step {last}." in err, err[-3000:]
  assert _steps(checkpoints)[-1] == last + 2


def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path):
  steps = 30
  args = [f"--config.training.num_train_steps={steps}", "--config.training.checkpoint_every_steps=100000"]
  straight = _popen(tmp_path / "straight", *args, log=tmp_path / "straight.stderr")  # read after the others
  interrupted = _popen(tmp_path / "interrupted", *args)
  try:
    # SIGTERM once the loop has logged its first step (the lines read are kept for the failure message).
    seen = read_until(interrupted, "] step 1:")
    interrupted.send_signal(signal.SIGTERM)
    err = "".join(seen) + finish(interrupted)
  finally:
    if interrupted.poll() is None:
      interrupted.kill()
  assert interrupted.returncode == 0, err[-3000:]
  assert "SIGTERM: saved the checkpoint of step" in err
  (stopped,) = _steps(tmp_path / "interrupted" / "checkpoints")
  assert 0 < stopped < steps

  resumed_err = finish(_popen(tmp_path / "interrupted", *args))
  assert f"Resuming from the checkpoint of step {stopped}." in resumed_err, resumed_err[-3000:]
  straight_err = finish(straight)
  assert straight.returncode == 0, straight_err[-3000:]

  a, b = _restore(tmp_path / "interrupted", steps), _restore(tmp_path / "straight", steps)
  assert int(a["step"]) == int(b["step"]) == steps
  for part in ("params", "ema_params", "opt_state", "sampler_state"):
    fa, fb = _flat(a[part]), _flat(b[part])
    assert fa.keys() == fb.keys()
    for k in fa:  # the same compiled step on the same data and noise: bit for bit
      np.testing.assert_array_equal(fa[k], fb[k], err_msg=f"{part} {k}")


@pytest.fixture
def nan_at_step_4(monkeypatch):
  """The real digits batches, with a NaN pixel in the batch of step 4 (the batch that makes step 4)."""
  real = input_pipeline.create_input_iter

  def poisoned(*args, start_step=0, **kwargs):
    for step, batch in enumerate(real(*args, start_step=start_step, **kwargs), start=start_step + 1):
      if step == 4:
        batch["image"] = batch["image"].copy()
        batch["image"][0, 0, 0, 0, 0] = np.nan
      yield batch

  monkeypatch.setattr(input_pipeline, "create_input_iter", poisoned)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, nan_at_step_4):
  workdir = tmp_path / "run"
  with pytest.raises(train_step.NonFiniteLossError) as error:
    train.train_and_evaluate(toy_config(), str(workdir))
  message = str(error.value)
  assert isinstance(error.value, FloatingPointError)
  assert "The loss became nan" in message and "at step 4;" in message
  assert f"The last good checkpoint is step 2 in {workdir / 'checkpoints'}" in message
  assert "learning_rate" in message and "grad_clip" in message and "skip_nonfinite_updates" in message
  # Step 4 was not saved (nor was step 3, between checkpoints); step 2 restores with finite values.
  assert _steps(workdir / "checkpoints") == [2]
  state = _restore(workdir, 2)
  assert int(state["step"]) == 2
  for part in ("params", "ema_params", "opt_state"):
    assert all(np.isfinite(v).all() for v in _flat(state[part]).values())


def test_skip_nonfinite_updates_keeps_training_with_finite_params(tmp_path, nan_at_step_4):
  workdir = tmp_path / "run"
  state = train.train_and_evaluate(toy_config(skip_nonfinite_updates=True), str(workdir))
  assert int(jax.device_get(state.step)[0]) == 6
  assert _steps(workdir / "checkpoints")[-1] == 6
  saved = _restore(workdir, 6)
  for part in ("params", "ema_params", "opt_state", "sampler_state"):
    assert all(np.isfinite(v).all() for v in _flat(saved[part]).values()), part
