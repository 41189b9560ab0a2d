"""Multi-host training on one machine: two processes joined by jax.distributed on localhost (CPU devices,
gloo collectives), one device each, train through the real entry point (`--distributed=true` and the
coordinator flags) and reach the parameters of one process with two devices and the same global batch.

Each process reads its rows of a fixed global batch per step (a stand-in for input_pipeline's per-host shard,
whose order depends on the host count by design), so both runs see the same examples on the same global
devices; noise comes from (step, global device index), so they must agree to float round-off.
"""
import json
import os
import socket
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import REPO, command, cpu_env, finish, popen, read_until

pytestmark = pytest.mark.slow  # two training processes on localhost

# Runs ddpm_ip_jax.main with create_input_iter replaced by this process's rows of a fixed global batch per step.
CHILD = r"""
import sys
sys.path.insert(0, sys.argv.pop(1))
from absl import app
import jax
import numpy as np
from ddpm_ip_jax import cli, input_pipeline, main

def fixed_batches(data_config, image_size, global_batch_size, *, seed, start_step=0, **_):
  per_host = global_batch_size // jax.process_count()
  rows = slice(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)
  step = start_step
  while True:
    rng = np.random.default_rng(step)
    images = rng.uniform(-1, 1, (global_batch_size, image_size, image_size, 1)).astype(np.float32)
    labels = rng.integers(0, 10, (global_batch_size,)).astype(np.int32)
    yield {"image": images[rows].reshape(jax.local_device_count(), -1, *images.shape[1:]),
           "label": labels[rows].reshape(jax.local_device_count(), -1)}
    step += 1

input_pipeline.create_input_iter = fixed_batches
app.run(main.main, flags_parser=cli.parse_flags)
"""

TOY = [
    "--config=configs/digits.py",
    "--config.model.image_size=8",
    "--config.model.channel_mult=(1,)",
    "--config.diffusion.steps=10",
    "--config.training.batch_size=4",
    "--config.training.num_train_steps=3",
    "--config.training.adam_eps=1e-4",  # see test_train.test_two_devices_equal_one_device_with_the_same_noise
    "--config.training.log_every_steps=1",
    "--config.training.checkpoint_every_steps=2",
    "--config.training.sample_every_steps=0",
    "--config.training.num_grid_samples=2",
    "--config.training.grid_sampling_steps=2",
]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _popen(args, devices, log=None):
  return popen([sys.executable, "-c", CHILD, REPO, *TOY, *args], env=cpu_env(devices), log=log)


def _finish(procs, timeout=240):
  """The stderr of each process, once all have exited 0 (any still running after `timeout` is killed)."""
  try:
    outs = [finish(proc, timeout) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, err in zip(procs, outs):
    assert proc.returncode == 0, err[-4000:]
  return outs


def _checkpoint(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "default"))


def test_two_processes_equal_one_process_with_two_devices(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  port = _free_port()
  dist = ["--distributed=true", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  # Both processes of the 2-process run and the 1-process run at once: 3 processes on 2 cores.
  procs = [_popen([f"--workdir={two}", *dist, f"--process_id={i}"], devices=1) for i in range(2)]
  procs.append(_popen([f"--workdir={one}"], devices=2))
  err0, err1, err_one = _finish(procs)
  assert "JAX process 0 / 2" in err0 and "JAX process 1 / 2" in err1 and "JAX process 0 / 1" in err_one
  # A CPU run of several processes compiles without the persistent cache (runtime.no_cache_across_cpu_processes:
  # JAX 0.12 deadlocks a loaded program at its first all-reduce, as the next test's run, in the same cache, would).
  cache_off = "Compilation cache off: a CPU run of several processes"
  assert cache_off in err0 and cache_off in err1 and cache_off not in err_one

  # Process 0 alone writes the config, the TensorBoard events and the samples; both write the checkpoints.
  assert sorted(os.listdir(two / "samples")) == ["ema_0.995_step_00000003.png"]
  assert len([f for f in os.listdir(two) if f.startswith("events.out.tfevents")]) == 1
  assert sorted(os.listdir(two / "checkpoints")) == sorted(os.listdir(one / "checkpoints")) == ["2", "3"]

  a, b = _checkpoint(two, 3), _checkpoint(one, 3)
  assert int(a["step"]) == int(b["step"]) == 3
  for part in ("params", "ema_params", "opt_state"):
    la, lb = ocp.tree.to_flat_dict(a[part]), ocp.tree.to_flat_dict(b[part])
    assert la.keys() == lb.keys()
    for k in la:
      np.testing.assert_allclose(np.asarray(la[k]), np.asarray(lb[k]), rtol=1e-4, atol=1e-6, err_msg=str(k))
  np.testing.assert_array_equal(a["sampler_state"]["counts"], b["sampler_state"]["counts"])
  # Training moved the parameters away from the shared initialisation.
  init = ocp.tree.to_flat_dict(a["ema_params"]["0.995"])
  moved = max(float(np.max(np.abs(np.asarray(v) - np.asarray(init[k]))))
              for k, v in ocp.tree.to_flat_dict(a["params"]).items())
  assert moved > 1e-4
  # The logged global loss of every step agrees too (psum over both hosts).
  loss = lambda err: [line.split(": loss ")[1].split(",")[0] for line in err.splitlines() if ": loss " in line]
  assert loss(err0) == loss(err_one) and len(loss(err0)) == 3


def test_sigterm_to_one_host_stops_every_host_at_the_same_step(tmp_path):
  """jax's preemption service: the notice reaches the other host, both save the same step and exit."""
  workdir = tmp_path / "run"
  dist = ["--distributed=true", f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2"]
  args = [f"--workdir={workdir}", *dist, "--config.training.num_train_steps=100000",
          "--config.training.checkpoint_every_steps=100000"]
  # Process 0 logs to a file: its stderr is not read while the test waits for process 1's step line, and a full
  # pipe would stop process 0 in a write, and process 1 with it in the next step's all-reduce.
  procs = [_popen([*args, "--process_id=0"], devices=1, log=tmp_path / "process_0.log"),
           _popen([*args, "--process_id=1"], devices=1)]
  try:
    read_until(procs[1], "] step 2:")  # once process 1 is inside the training loop
    procs[1].send_signal(15)
  finally:
    errs = _finish(procs)
  for err in errs:
    assert "SIGTERM: saved the checkpoint of step" in err, err[-3000:]
  stopped = [int(err.split("SIGTERM: saved the checkpoint of step ")[1].split(" ")[0]) for err in errs]
  assert stopped[0] == stopped[1] and os.listdir(workdir / "checkpoints") == [str(stopped[0])]


def test_two_processes_sample_and_evaluate_as_one(tmp_path):
  """sample and evaluate with --distributed: each process draws its share on its device, process 0 assembles the
  samples file and writes the metrics, and both equal what one process with two devices produces."""
  import jax  # pylint: disable=import-outside-toplevel
  from ddpm_ip_jax import input_pipeline, models, workdir  # pylint: disable=import-outside-toplevel
  from ddpm_ip_jax.evaluation import digits_training  # pylint: disable=import-outside-toplevel
  from helpers import load_config  # pylint: disable=import-outside-toplevel
  config = load_config("test")
  config.model.image_size, config.model.channel_mult = 16, (1, 2)  # the digits classifier's 16x16
  params = models.init_params(models.create_model(config), jax.random.key(0))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  workdir.save_converted(config, params, tmp_path / "model")
  images, labels = input_pipeline.load_digits(16)
  classifier, _ = digits_training.train_classifier(np.asarray(images), labels, epochs=1)
  digits_training.save_params(classifier, str(tmp_path / "dc.npz"))

  def evaluate(out, devices, *extra):
    return popen(command("evaluate", f"--checkpoint={tmp_path / 'model'}", "--extractor=digits",
                         f"--weights={tmp_path / 'dc.npz'}", f"--reference={out / 'ref.npz'}", "--num_samples=10",
                         "--batch_size=2", "--steps=3", f"--output_dir={out / 'samples'}", *extra),
                 env=cpu_env(devices))

  one, two = tmp_path / "one", tmp_path / "two"
  dist = ["--distributed=true", f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2"]
  procs = [evaluate(two, 1, *dist, f"--process_id={i}") for i in range(2)]
  procs.append(evaluate(one, 2))
  errs = _finish(procs)
  # The features are computed on both processes: the reference's 1797 digits in 18 batches, 9 on each.
  assert "digits features of 1797 images: 9 of the 18 batches on process 1." in errs[1], errs[1][-3000:]

  a, b = np.load(two / "samples" / "samples_10x16x16x1.npz"), np.load(one / "samples" / "samples_10x16x16x1.npz")
  np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
  parts = sorted(os.listdir(two / "samples" / "parts"))  # both processes wrote theirs: 2 per global batch of 4
  assert parts[:2] == ["00000000-00000002.npz", "00000002-00000004.npz"] and len(parts) == 5
  metrics = [json.loads((d / "samples" / "metrics_digits.json").read_text()) for d in (two, one)]
  for key in ("fid", "precision", "recall", "inception_score", "num_samples"):
    assert metrics[0][key] == metrics[1][key], key
