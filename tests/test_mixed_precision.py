"""bfloat16 compute (config.model.dtype) against float32: the same training loss on a fixed batch, fixed
parameters and fixed noise, and float32 master parameters, optimizer state and EMA.

Tolerance, measured on CPU with the 16x16 digits model of configs/digits.py (hybrid loss, learned sigma),
parameters perturbed by N(0, 0.05^2), batch 16 over all T, 5 seeds: the relative difference of the batch-mean
loss was 4e-5..3.9e-4, the largest per-example one 1.9e-3..3.3e-3 (bfloat16's 8-bit mantissa: relative step
2^-8 = 3.9e-3). The test allows 2e-3 for the mean and 1e-2 per example (about 5x and 3x the worst measured).

The batches are the first digits of `input_pipeline.load_digits`, read from tests/data/digits.npz so that the
tests run without scikit-learn (the device check runs them on a GPU machine that has none); a test checks the
fixture against load_digits where scikit-learn is installed.
"""
import functools

from flax import jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import fixed_digits, load_config
from ddpm_ip_jax import diffusion as diffusion_lib
from ddpm_ip_jax import input_pipeline
from ddpm_ip_jax import models
from ddpm_ip_jax import objective
from ddpm_ip_jax import train_state
from ddpm_ip_jax import train_step

MEAN_RTOL = 2e-3
EXAMPLE_RTOL = 1e-2


def test_digits_fixture_is_the_first_digits_of_load_digits():
  pytest.importorskip("sklearn", reason="load_digits needs scikit-learn")
  for size, n in ((16, 16), (8, 32)):
    expected = input_pipeline.load_digits(size)[0][:n]
    fixture = fixed_digits(size, n)
    assert fixture.dtype == np.uint8 and fixture.shape == (n, size, size, 1)
    np.testing.assert_array_equal(fixture, expected)


def _config(dtype):
  config = load_config("digits")
  config.model.dtype = dtype
  config.training.ema_rates = (0.9,)
  return config


def _loss(config, params, x0, noise, diff):
  model = models.create_model(config)

  def model_fn(x_t, t):
    return model.apply({"params": params}, x_t, t, train=False)

  losses = diffusion_lib.training_losses(diff, model_fn, x0, noise.t, noise.eps, noise.xi,
                                         jnp.full(noise.t.shape, 0.1))
  return jnp.mean(losses["loss"]), losses["loss"]


def test_bfloat16_loss_matches_float32_on_a_fixed_batch():
  f32, bf16 = _config("float32"), _config("bfloat16")
  size = f32.model.image_size
  diff = diffusion_lib.create_diffusion(f32.diffusion, learn_sigma=True)
  tx = train_state.create_optimizer(f32.training)
  state = train_state.make_train_state(jax.random.key(0), models.create_model(bf16), tx,
                                       ema_rates=(0.9,), schedule_sampler="uniform",
                                       num_timesteps=diff.num_timesteps)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
  # The output layers start at zero (an all-zero prediction in any dtype): perturb every parameter so the
  # whole network computes something.
  leaves, treedef = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree.unflatten(treedef, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  state = state.replace(params=params)
  x0 = jnp.asarray(fixed_digits(size, 16).astype(np.float32) / 127.5 - 1.0)
  noise = objective.draw_step_noise(objective.step_key(jax.random.key(1), 0, 0), state.sampler_state, x0.shape,
                                    objective.InputPerturbation(), diff.num_timesteps)

  loss32, per_example32 = jax.jit(functools.partial(_loss, f32, diff=diff))(state.params, x0, noise)
  loss16, per_example16 = jax.jit(functools.partial(_loss, bf16, diff=diff))(state.params, x0, noise)
  rel = abs(float(loss16) - float(loss32)) / abs(float(loss32))
  print(f"float32 loss {float(loss32):.6f}, bfloat16 {float(loss16):.6f}, relative difference {rel:.2e}")
  assert loss16.dtype == jnp.float32
  assert rel < MEAN_RTOL
  # Per example too, the hybrid loss's vb term included; and bfloat16 really ran.
  np.testing.assert_allclose(per_example16, per_example32, rtol=EXAMPLE_RTOL)
  assert np.max(np.abs(per_example16 - per_example32) / np.abs(per_example32)) > 1e-4


def test_bfloat16_training_step_keeps_float32_master_state():
  """Parameters, Adam moments and EMA stay float32 (a one-level 8x8 UNet, to compile fast)."""
  config = _config("bfloat16")
  config.model.image_size = 8
  config.model.channel_mult = (1,)
  config.diffusion.steps = 10
  training = train_step.create_training(config)
  state, p_step = training.state, training.p_train_steps
  n = jax.local_device_count()  # 2 simulated CPU devices in the suite, 1 on a one-GPU device check
  batch = {"image": (fixed_digits(8, 4 * n).astype(np.float32) / 127.5 - 1.0).reshape(n, 1, 4, 8, 8, 1),
           "label": np.zeros((n, 1, 4), np.int32)}
  new_state, metrics = p_step(jax_utils.replicate(state), batch)
  for part in (new_state.params, new_state.opt_state, new_state.ema_params):
    assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree.leaves(part))
  assert np.isfinite(float(metrics["loss"][0]))
