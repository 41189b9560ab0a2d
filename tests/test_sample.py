"""The sample command: deterministic for any device count, resumable to exactly the same file."""
import json
import os
import re

from absl import app
import jax
import numpy as np
import pytest

from helpers import cpu_env, run_command, toy_config
from ddpm_ip_jax import generation
from ddpm_ip_jax import models
from ddpm_ip_jax import sample_settings
from ddpm_ip_jax import workdir


@pytest.fixture(scope="module")
def model_and_params():
  config = toy_config()
  params = models.init_params(models.create_model(config), jax.random.key(0))
  # Output layers start at zero (as in the reference): perturb them so the network does something.
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  return config, params


def run(config, params, out_dir, devices, num_samples=6, per_device_batch=2):
  return generation.generate(config, params, str(out_dir), num_samples=num_samples, respacing="4",
                             per_device_batch=per_device_batch, seed=3, devices=devices, description="tiny")


def test_one_and_two_devices_give_the_same_samples(tmp_path, model_and_params):
  config, params = model_and_params
  assert len(jax.local_devices()) >= 2, "conftest simulates 2 CPU devices"
  one = run(config, params, tmp_path / "one", jax.local_devices()[:1])
  two = run(config, params, tmp_path / "two", jax.local_devices()[:2])
  a, b = np.load(one)["arr_0"], np.load(two)["arr_0"]
  assert a.shape == (6, 8, 8, 1) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert len(np.unique(a.reshape(6, -1), axis=0)) == 6  # every sample differs
  assert os.path.exists(tmp_path / "one" / "samples_grid.png")


def test_interrupted_run_resumes_to_the_same_file(tmp_path, model_and_params):
  config, params = model_and_params
  devices = jax.local_devices()[:2]
  full = np.load(run(config, params, tmp_path / "full", devices, num_samples=10))["arr_0"]
  out = tmp_path / "resumed"
  final = run(config, params, out, devices, num_samples=10)
  parts = sorted(os.listdir(out / "parts"))
  assert parts == ["00000000-00000004.npz", "00000004-00000008.npz", "00000008-00000010.npz"]
  # Simulate a kill after the first batch: later parts and the final file gone, a half-written temp left.
  os.remove(out / "parts" / parts[1])
  os.remove(out / "parts" / parts[2])
  os.remove(final)
  (out / "parts" / "00000004-00000008.npz.tmp.npz").write_bytes(b"truncated")
  assert generation.finished_prefix(out / "parts") == 4
  resumed = np.load(run(config, params, out, devices, num_samples=10))["arr_0"]
  np.testing.assert_array_equal(resumed, full)
  # A rerun with other settings into the same directory is refused rather than mixed.
  with pytest.raises(ValueError, match="other settings"):
    generation.generate(config, params, str(out), num_samples=10, respacing="5", per_device_batch=2,
                        seed=3, devices=devices, description="tiny")


def test_chain_settings_take_the_flags_given_and_the_config_for_the_rest():
  config = toy_config()  # config.sampling: ancestral, all 10 steps
  args = sample_settings.SampleArgs(sampler="ddim", eta=0.5, eps_scale=["0", "1.01"], seed=7, workdir="runs/w")
  settings = sample_settings.chain_settings(config, args)
  assert settings == dict(sampler="ddim", respacing=config.sampling.timestep_respacing, eta=0.5,
                          clip_denoised=config.sampling.clip_denoised, eps_scale=(0.0, 1.01))
  loaded = workdir.LoadedModel(config, None, "tiny", 12, raw=False)
  assert sample_settings.output_dir(loaded, settings, args) == "runs/w/samples_ddim10_eta0.5_es0,1.01_step12_seed7"
  for bad, message in [(dict(eta=5.0), "--eta=5 must be in [0, 1]"), (dict(steps="11"), "--steps='11': "),
                       (dict(eps_scale=["-1", "1"]), "--eps_scale=-1,1: lambda_t = k t + b must be positive"),
                       (dict(eps_scale=["1"]), "--eps_scale wants 'k,b'")]:
    with pytest.raises(app.UsageError, match=re.escape(message)):
      sample_settings.chain_settings(config, sample_settings.SampleArgs(**bad))


@pytest.mark.slow
def test_commands_take_their_chain_settings_from_the_run_config(tmp_path, model_and_params):
  """The sample and exposure-bias commands on a converted checkpoint: without --steps/--sampler/--eta they
  use the run's config.sampling (here DDIM with 3 steps), and a flag overrides one setting."""
  config, params = model_and_params
  config = config.copy_and_resolve_references()
  config.sampling.sampler, config.sampling.timestep_respacing = "ddim", "ddim3"
  workdir.save_converted(config, params, tmp_path / "model")

  def run_on_the_model(module, *args):
    proc = run_command(module, f"--checkpoint={tmp_path / 'model'}", *args, env=cpu_env(2))
    assert proc.returncode == 0, proc.stderr[-3000:]

  run_on_the_model("sample", "--num_samples=4", "--batch_size=2", f"--output_dir={tmp_path / 'a'}")
  settings = json.loads((tmp_path / "a" / "sampling.json").read_text())
  assert (settings["sampler"], settings["respacing"], settings["eta"]) == ("ddim", "ddim3", 0.0)
  expected = generation.generate(config, params, str(tmp_path / "b"), num_samples=4, sampler="ddim",
                                 respacing="ddim3", per_device_batch=2, description="other")
  np.testing.assert_array_equal(np.load(tmp_path / "a" / "samples_4x8x8x1.npz")["arr_0"],
                                np.load(expected)["arr_0"])
  run_on_the_model("sample", "--num_samples=2", "--batch_size=1", "--steps=2", "--sampler=ancestral",
              f"--output_dir={tmp_path / 'c'}")
  settings = json.loads((tmp_path / "c" / "sampling.json").read_text())
  assert (settings["sampler"], settings["respacing"]) == ("ancestral", "2")

  run_on_the_model("exposure_bias", "--num_images=4", f"--output={tmp_path / 'eb'}")
  results = json.loads((tmp_path / "eb.json").read_text())
  assert results["settings"]["sampler"] == "ddim" and results["settings"]["steps"] == "ddim3"
  assert len(results["nu_sampling"]) == 3 and np.isfinite(results["chain_reconstruction_l1"])
  assert np.isfinite(results["reconstruction_l1"]) and results["reconstruction_start"] == 5  # 0.6 * 10 - 1
  assert results["nu_one_step_t"] == list(range(10))  # T = 10: every step (stride T // 100, at least 1)


def test_class_conditional_samples_uniform_or_given_labels_saved_as_arr_1(tmp_path):
  """The reference's 10-class toy network (tests/data/reference/class_cond10.npz), converted and sampled on the
  command line: classes drawn uniformly by default, or the given --labels cycled; arr_1 holds them."""
  from helpers import REFERENCE_DIR  # pylint: disable=import-outside-toplevel
  from ddpm_ip_jax import reference_checkpoints  # pylint: disable=import-outside-toplevel
  data = dict(np.load(REFERENCE_DIR / "class_cond10.npz"))
  config = reference_checkpoints.config_from_reference_flags(json.loads(str(data["flags"])))
  config.diffusion.noise_schedule, config.diffusion.steps = "cosine", 10
  params = reference_checkpoints.params_from_state_dict(
      {k[3:]: v for k, v in data.items() if k.startswith("sd/")}, config)
  workdir.save_converted(config, params, tmp_path / "model")

  def sample(out, *extra):
    return run_command("sample", f"--checkpoint={tmp_path / 'model'}", "--num_samples=12", "--batch_size=3",
                       "--steps=2", f"--output_dir={out}", *extra)

  assert sample(tmp_path / "uniform").returncode == 0
  assert sample(tmp_path / "given", "--labels=3,7").returncode == 0
  uniform = np.load(tmp_path / "uniform" / "samples_12x8x8x3.npz")
  given = np.load(tmp_path / "given" / "samples_12x8x8x3.npz")
  assert uniform["arr_1"].min() >= 0 and uniform["arr_1"].max() < 10 and len(set(uniform["arr_1"])) > 2
  np.testing.assert_array_equal(given["arr_1"], [3, 7] * 6)
  assert not np.array_equal(uniform["arr_0"], given["arr_0"])  # the class changes the sample
  bad = sample(tmp_path / "bad", "--labels=10")
  assert bad.returncode == 1 and "FATAL --labels=10: labels [10] outside [0, 10)" in bad.stderr
