"""Interrupts and faults end in one line; nothing non-finite is written (issue 22).

End to end (subprocesses, run together): Ctrl-C (SIGINT) to `sample` after its first part file stops it after the
batch in progress with one 'interrupted (SIGINT): N of M samples kept ...' line, exit 130, no traceback, the parts
kept, and the same command then completes them into exactly the file of an uninterrupted run; SIGTERM to
`exposure_bias` stops it with one line, exit 143, nothing written; a KeyboardInterrupt that escapes a command is
one line too. In process: the signal watcher, the NaN/Inf refusal of measurements, and the path in the message of
a write that fails (a full disk).
"""
import errno
import functools
import json
import os
import re
import signal
import sys
import threading
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config, popen_command, run, run_command, run_in_parallel
from ddpm_ip_jax import cli
from ddpm_ip_jax import diffusion as diffusion_lib
from ddpm_ip_jax import exposure
from ddpm_ip_jax import exposure_bias
from ddpm_ip_jax import fileio
from ddpm_ip_jax import generation
from ddpm_ip_jax import interrupts
from ddpm_ip_jax import models
from ddpm_ip_jax import workdir as workdir_lib

NUM_SAMPLES = 24  # 6 batches of 2 devices x 2: the signal comes after the first, the stop after the next check
SAMPLE_ARGS = [f"--num_samples={NUM_SAMPLES}", "--batch_size=2", "--steps=10", "--seed=5"]
_PART = re.compile(r"^\d{8}-\d{8}\.npz$")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """A converted toy model (configs/test.py, random weights with the zero output layers perturbed)."""
  d = tmp_path_factory.mktemp("interrupts")
  config = load_config("test")
  params = models.init_params(models.create_model(config), jax.random.key(0))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  workdir_lib.save_converted(config, params, d / "model")
  return d, config, params


def _signal_when(proc, ready, signum, timeout=240):
  """Sends `signum` to `proc` once ready() holds (polled); returns (exit code, stderr). stderr is read all the
  while (a thread), so that the command never blocks on a full pipe."""
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
  reader.start()
  deadline = time.monotonic() + timeout
  while not ready(lines) and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  if proc.poll() is None:
    proc.send_signal(signum)
  proc.wait(timeout=timeout)
  reader.join(timeout=10)
  return proc.returncode, "".join(lines)


def _parts(directory):
  return sorted(n for n in os.listdir(directory) if _PART.match(n)) if os.path.isdir(directory) else []


def _interrupted_sample(d):
  out = d / "sampled"
  proc = popen_command("sample", f"--checkpoint={d / 'model'}", f"--output_dir={out}", *SAMPLE_ARGS)
  return _signal_when(proc, lambda _: _parts(out / "parts"), signal.SIGINT)


def _terminated_exposure_bias(d):
  proc = popen_command("exposure_bias", f"--checkpoint={d / 'model'}", "--num_images=4", "--steps=5",
                       f"--output={d / 'eb'}")
  return _signal_when(proc, lambda lines: any("Measuring on" in line for line in lines), signal.SIGTERM)


def _escaping_keyboard_interrupt():
  """A command whose main raises KeyboardInterrupt outside any watched loop (e.g. Ctrl-C while a model loads)."""
  code = ("from ddpm_ip_jax import cli\n"
          "def main(argv):\n"
          "  raise KeyboardInterrupt\n"
          "cli.run(main)\n")
  proc = run([sys.executable, "-c", code], timeout=120)
  return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def runs(model):
  d = model[0]
  return run_in_parallel({"sample": functools.partial(_interrupted_sample, d),
                          "exposure_bias": functools.partial(_terminated_exposure_bias, d),
                          "escape": _escaping_keyboard_interrupt})


def _interrupted_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith("interrupted")]


@pytest.mark.slow
def test_ctrl_c_during_sample_keeps_the_parts_and_the_rerun_completes_them_exactly(model, runs):
  d, config, params = model
  code, stderr = runs["sample"]
  assert code == 130, stderr[-3000:]
  assert "Traceback" not in stderr
  lines = _interrupted_lines(stderr)
  assert len(lines) == 1, stderr[-3000:]
  out = d / "sampled"
  match = re.fullmatch(rf"interrupted \(SIGINT\): (\d+) of {NUM_SAMPLES} samples kept in (.+); run the same "
                       r"command again to resume\.", lines[0])
  assert match and match.group(2) == str(out / "parts"), lines[0]
  kept = int(match.group(1))
  assert 0 < kept < NUM_SAMPLES and generation.finished_prefix(out / "parts") == kept
  assert not (out / f"samples_{NUM_SAMPLES}x8x8x1.npz").exists()
  # The same command again: resumes from the parts and writes the file an uninterrupted run writes.
  proc = run_command("sample", f"--checkpoint={d / 'model'}", f"--output_dir={out}", *SAMPLE_ARGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Resuming: {kept} of {NUM_SAMPLES} samples" in proc.stderr
  settings = json.loads((out / "sampling.json").read_text())
  straight = generation.generate(config, params, str(d / "straight"), num_samples=NUM_SAMPLES,
                                 sampler=settings["sampler"], respacing="10", per_device_batch=2, seed=5,
                                 description=settings["model"])
  resumed = np.load(out / f"samples_{NUM_SAMPLES}x8x8x1.npz")["arr_0"]
  np.testing.assert_array_equal(resumed, np.load(straight)["arr_0"])


@pytest.mark.slow
def test_sigterm_during_exposure_bias_writes_nothing_in_one_line(model, runs):
  d = model[0]
  code, stderr = runs["exposure_bias"]
  assert code == 143, stderr[-3000:]
  assert "Traceback" not in stderr
  assert _interrupted_lines(stderr) == [
      f"interrupted (SIGTERM): nothing was kept ({d / 'eb'}.json is written once all the measurements are done); "
      "run the same command again to measure."], stderr[-3000:]
  assert not (d / "eb.json").exists() and not (d / "eb.png").exists()


@pytest.mark.slow
def test_a_keyboard_interrupt_that_escapes_is_one_line(runs):
  code, stderr = runs["escape"]
  assert code == 130 and "Traceback" not in stderr, stderr[-3000:]
  assert stderr.strip().splitlines()[-1] == ("interrupted (SIGINT): stopped before its first batch finished; "
                                             "nothing new was kept.")
  assert len(_interrupted_lines(stderr)) == 1


def test_watch_turns_a_signal_into_a_stop_at_the_next_check_and_restores_the_handlers():
  before = {sig: signal.getsignal(sig) for sig in interrupts.SIGNALS}
  with interrupts.watch():
    interrupts.check("nothing yet")  # no signal: goes on
    with interrupts.watch():  # nested (generation inside the study): one watcher
      os.kill(os.getpid(), signal.SIGTERM)
      deadline = time.monotonic() + 5
      while interrupts.requested() is None and time.monotonic() < deadline:
        time.sleep(0.01)
      assert interrupts.requested() == signal.SIGTERM
      with pytest.raises(interrupts.Interrupted) as caught:
        interrupts.check("3 of 8 things kept in X; run the same command again to resume")
  assert str(caught.value) == "interrupted (SIGTERM): 3 of 8 things kept in X; run the same command again to resume."
  assert caught.value.exit_code == 143 and isinstance(caught.value, KeyboardInterrupt)
  assert {sig: signal.getsignal(sig) for sig in interrupts.SIGNALS} == before


def test_watch_sees_a_signal_that_another_handler_takes():
  """The study's training installs its own SIGINT/SIGTERM handlers (it stops with a checkpoint and returns); the
  watcher still sees the signal, so the study stops at its next check instead of sampling on."""
  taken = []
  with interrupts.watch():
    previous = signal.signal(signal.SIGINT, lambda signum, frame: taken.append(signum))  # as train.py does
    try:
      os.kill(os.getpid(), signal.SIGINT)
      deadline = time.monotonic() + 5
      while not (taken and interrupts.requested()) and time.monotonic() < deadline:
        time.sleep(0.01)
    finally:
      signal.signal(signal.SIGINT, previous)
    assert taken == [signal.SIGINT] and interrupts.requested() == signal.SIGINT
    with pytest.raises(interrupts.Interrupted, match=r"^interrupted \(SIGINT\): the training of R stopped"):
      interrupts.check("the training of R stopped with a checkpoint at step 3 of 6")


def test_non_finite_measurements_are_refused_and_not_written(tmp_path):
  """NaN weights: the authors' measurements of the toy model come out NaN; write_results refuses them in one
  line naming the entries, and writes neither the JSON nor the plot."""
  config = load_config("test")
  model = models.create_model(config)
  params = models.init_params(model, jax.random.key(0))
  params = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
  full = diffusion_lib.create_diffusion(config.diffusion, learn_sigma=config.model.learn_sigma)
  fns = exposure.make_data_start_fns(full, lambda p, x, t: model.apply({"params": p}, x, t, train=False))
  results = exposure.data_start_measures(fns, params, jnp.zeros((4, 8, 8, 1)), jax.random.key(0))
  results.update(t_original=[2, 1, 0], nu_sampling=[0.1, float("inf"), 0.2], settings={"start_step": None})
  output = str(tmp_path / "eb")
  with pytest.raises(exposure.NonFiniteResultsError) as caught:
    exposure_bias.write_results(results, output, "toy")
  message = cli.fatal_message(caught.value)
  assert message.startswith("the exposure-bias measurements: 13 values came out NaN/Inf: nu_one_step (10 of 10), "
                            "nu_one_step_mean, reconstruction_l1, nu_sampling (1 of 3); "
                            f"{output}.json was not written. The parameters may hold NaN/Inf"), message
  assert "\n" not in message and not os.listdir(tmp_path)
  # The study's nested results: the dotted key of the entry.
  with pytest.raises(ValueError, match=r"the study run R: 1 values came out NaN/Inf: samples\.ddim/ddim5\.fid; "):
    exposure.check_finite({"step": 6, "samples": {"ddim/ddim5": {"fid": float("nan"), "recall": 0.5}}},
                          "the study run R", "results.json")
  exposure.check_finite({"a": [1.0, 2.0], "b": {"c": 3, "d": None, "e": "text", "f": True}}, "x", "y")  # finite


def test_a_full_disk_names_the_file_being_written(tmp_path):
  real_open = open

  class FullDisk:
    def __init__(self, *args, **kwargs):
      self.file = real_open(*args, **kwargs)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.file.close()

    def write(self, data):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  path = tmp_path / "parts" / "00000000-00000004.npz"
  with mock.patch("builtins.open", FullDisk), pytest.raises(OSError) as caught:
    fileio.save_npz(str(path), images=np.zeros((4, 8, 8, 1), np.uint8))
  assert caught.value.errno == errno.ENOSPC
  assert cli.fatal_message(caught.value) == f"OSError: [Errno 28] No space left on device: '{path}'"
  assert os.listdir(tmp_path / "parts") == []  # the temporary file is gone too
