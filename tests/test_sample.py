"""The sample command: deterministic for any device count, resumable to exactly the same file."""
import os

import jax
import numpy as np
import pytest

from ddpm_ip_jax import config_base
from ddpm_ip_jax import models
from ddpm_ip_jax import generation


def tiny_config():
  config = config_base.get_config()
  m = config.model
  m.image_size, m.in_channels, m.model_channels, m.channel_mult = 8, 1, 32, (1,)
  m.num_res_blocks, m.attention_resolutions, m.learn_sigma = 1, (), True
  config.diffusion.noise_schedule = "cosine"
  return config


@pytest.fixture(scope="module")
def model_and_params():
  config = tiny_config()
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
