"""Samplers and the UNet-driven losses against the reference's toy network (tests/data/reference)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REFERENCE_DIR, load_reference, nchw, nhwc
from ddpm_ip_jax import images, reference_checkpoints, sampling
from ddpm_ip_jax import diffusion as dl
from ddpm_ip_jax.models import create_model

SAMPLING = load_reference("sampling")
LOSSES = load_reference("losses")


@pytest.fixture(scope="module")
def toy():
  """The reference's toy UNet (learned sigma, cosine, T = 1000), loaded through the import path."""
  config = reference_checkpoints.config_from_reference_flags(
      {**json.loads((REFERENCE_DIR / "unet_config.json").read_text()), "noise_schedule": "cosine",
       "rescale_learned_sigmas": True})
  params = reference_checkpoints.load_reference_checkpoint(REFERENCE_DIR / "unet_state_dict.npz", config)
  model = create_model(config)
  model_fn = jax.jit(lambda x, t: model.apply({"params": params}, x, t))
  return config, model, params, model_fn


def test_p_mean_variance_per_step_matches_reference(toy):
  config, _, _, model_fn = toy
  diff = dl.create_diffusion(config.diffusion, learn_sigma=True, timestep_respacing="10")
  x_t, t = nhwc(SAMPLING["pmv/x_t"]), jnp.asarray(SAMPLING["pmv/t"], jnp.int32)
  out = dl.p_mean_variance(diff, model_fn(x_t, diff.timestep_map[t]), x_t, t, clip_denoised=True)
  for name in ["mean", "variance", "log_variance", "pred_xstart"]:
    np.testing.assert_allclose(nchw(out[name]), SAMPLING[f"pmv/{name}"], atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.parametrize("case", ["10_eta0.0", "ddim10_eta0.0", "ddim10_eta0.5"])
def test_ten_step_chains_match_reference(toy, case):
  config, _, _, model_fn = toy
  spec = case.split("_")[0]
  eta = float(case.split("eta")[1])
  diff = dl.create_diffusion(config.diffusion, learn_sigma=True, timestep_respacing=spec)
  np.testing.assert_array_equal(np.asarray(diff.timestep_map), SAMPLING[f"{case}/timestep_map"])
  step_noise = jnp.asarray(np.transpose(SAMPLING[f"{case}/step_noise"], (0, 1, 3, 4, 2)))
  x_T = nhwc(SAMPLING["x_T"])
  run = jax.jit(lambda key, noise, x: sampling.sample_loop(
      diff, model_fn, key, x.shape, sampler="ancestral" if spec == "10" else "ddim", eta=eta,
      step_noise=noise, x_T=x))
  sample = run(jax.random.key(0), step_noise, x_T)
  np.testing.assert_allclose(nchw(sample), SAMPLING[f"{case}/sample"], atol=1e-3, rtol=0)


def test_unet_loss_case_matches_reference(toy):
  config, _, _, model_fn = toy
  diff = dl.create_diffusion(config.diffusion, learn_sigma=True)
  assert diff.loss_type == "rescaled_mse"
  case = "ip0.1_unet"
  losses = dl.training_losses(diff, model_fn, nhwc(LOSSES["x_start"]), jnp.asarray(LOSSES["t"], jnp.int32),
                              nhwc(LOSSES[f"{case}/noise"]), nhwc(LOSSES[f"{case}/xi"]), float(LOSSES[f"{case}/gamma"]))
  for name in ["mse", "vb", "loss"]:
    ref = LOSSES[f"{case}/{name}"]
    assert np.max(np.abs(np.asarray(losses[name]) - ref) / np.abs(ref)) < 1e-4, name


def test_sampling_is_keyed_and_deterministic(toy):
  _, model, params, _ = toy
  diff = dl.create_diffusion(toy[0].diffusion, learn_sigma=True, timestep_respacing="5")
  sample = sampling.make_sample_fn(model, diff, (2, 16, 16, 3))
  a, b = sample(params, jax.random.key(1)), sample(params, jax.random.key(1))
  c = sample(params, jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2
  assert np.all(np.abs(np.asarray(a)) <= 1.0 + 1e-5) or np.isfinite(np.asarray(a)).all()
  ddim = sampling.make_sample_fn(model, diff, (2, 16, 16, 3), sampler="ddim", eta=0.0)
  # DDIM with eta = 0 is deterministic given x_T: the step noise has no effect.
  key = jax.random.key(3)
  x_T = jax.random.normal(jax.random.split(key)[0], (2, 16, 16, 3))
  model_fn = lambda x, t: model.apply({"params": params}, x, t)
  n1 = jax.random.normal(jax.random.key(4), (5, 2, 16, 16, 3))
  r1 = sampling.sample_loop(diff, model_fn, key, (2, 16, 16, 3), sampler="ddim", step_noise=n1, x_T=x_T)
  np.testing.assert_allclose(np.asarray(r1), np.asarray(ddim(params, key)), atol=1e-5)


def test_sampler_arguments_are_checked():
  diff = dl.make_diffusion(timestep_respacing="4")
  with pytest.raises(ValueError, match="unknown sampler"):
    sampling.sample_loop(diff, lambda x, t: x, jax.random.key(0), (1, 2, 2, 1), sampler="euler")
  with pytest.raises(ValueError, match="step_noise must have shape"):
    sampling.sample_loop(diff, lambda x, t: x, jax.random.key(0), (1, 2, 2, 1),
                         step_noise=jnp.zeros((3, 1, 2, 2, 1)))


def test_to_uint8_truncates_like_the_reference():
  x = np.array([-1.5, -1.0, -0.0039, 0.0, 0.999, 1.0, 2.0], np.float32)
  # (x + 1) * 127.5 = [-63.75, 0, 127.0025, 127.5, 254.87, 255, 382.5] -> clip -> truncate
  np.testing.assert_array_equal(images.to_uint8(x), [0, 0, 127, 127, 254, 255, 255])
  assert images.to_uint8(x).dtype == np.uint8


def test_per_example_keys_make_samples_independent_of_the_batch():
  diff = dl.make_diffusion(noise_schedule="cosine", timestep_respacing="4")
  model_fn = lambda x, t: 0.1 * x  # any deterministic network
  keys = jax.random.split(jax.random.key(0), 4)
  whole = sampling.sample_loop(diff, model_fn, keys, (4, 2, 2, 1))
  halves = [sampling.sample_loop(diff, model_fn, keys[i:i + 2], (2, 2, 2, 1)) for i in (0, 2)]
  np.testing.assert_allclose(np.asarray(whole), np.concatenate([np.asarray(h) for h in halves]), atol=1e-6)
  single = sampling.sample_loop(diff, model_fn, keys[3:], (1, 2, 2, 1))
  np.testing.assert_allclose(np.asarray(whole[3:]), np.asarray(single), atol=1e-6)
  with pytest.raises(ValueError, match="per-example keys"):
    sampling.sample_loop(diff, model_fn, keys, (3, 2, 2, 1))


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_epsilon_scaling_identity_at_b1_k0_and_active_otherwise(sampler):
  diff = dl.make_diffusion(noise_schedule="cosine", timestep_respacing="6", var_type="learned_range")
  w = jax.random.normal(jax.random.key(5), (1, 2))
  model_fn = lambda x, t: jnp.tanh(x @ w)  # 1 image channel -> eps and v
  run = lambda scale: np.asarray(sampling.sample_loop(diff, model_fn, jax.random.key(0), (3, 4, 4, 1),
                                                      sampler=sampler, eta=0.5, eps_scale=scale))
  plain = run(None)
  np.testing.assert_array_equal(run((0.0, 1.0)), plain)
  assert np.abs(run((0.0, 1.02)) - plain).max() > 1e-4
  assert np.abs(run((0.001, 1.0)) - plain).max() > 1e-5
  # Scaling eps by lambda is the same as a network whose eps output is divided by lambda.
  lam = 1.0 + 0.01 * jnp.arange(6, dtype=jnp.float32)  # k = 0.01, b = 1 over the respaced indices
  inv_map = jnp.zeros(1000, jnp.int32).at[diff.timestep_map].set(jnp.arange(6))
  manual = lambda x, t: jnp.concatenate([model_fn(x, t)[..., :1] / lam[inv_map[t]].reshape(-1, 1, 1, 1),
                                         model_fn(x, t)[..., 1:]], axis=-1)
  expected = sampling.sample_loop(diff, manual, jax.random.key(0), (3, 4, 4, 1), sampler=sampler, eta=0.5)
  np.testing.assert_allclose(run((0.01, 1.0)), np.asarray(expected), atol=1e-6)
  with pytest.raises(ValueError, match="predicts eps"):
    sampling.sample_loop(dl.make_diffusion(mean_type="start_x", timestep_respacing="3"), model_fn,
                         jax.random.key(0), (1, 2, 2, 1), eps_scale=(0.0, 1.01))


@pytest.mark.parametrize("spec", ["", "10"])
def test_rescaled_timesteps_match_reference(spec):
  """rescale_timesteps=True (improved-diffusion's models): the network sees original step * 1000 / T; T = 4000,
  all steps and respaced to 10 (tests/data/reference/rescale_timesteps.npz, made by make_extra_fixtures.py)."""
  golden = load_reference("rescale_timesteps")
  config = reference_checkpoints.config_from_reference_flags(
      {**json.loads((REFERENCE_DIR / "unet_config.json").read_text()), "noise_schedule": "cosine",
       "diffusion_steps": 4000, "rescale_learned_sigmas": True, "rescale_timesteps": True})
  assert config.diffusion.rescale_timesteps
  params = reference_checkpoints.load_reference_checkpoint(REFERENCE_DIR / "unet_state_dict.npz", config)
  model = create_model(config)
  diff = dl.create_diffusion(config.diffusion, learn_sigma=True, timestep_respacing=spec)
  name = spec or "all"
  t = jnp.asarray(golden[f"{name}/t"], jnp.int32)
  np.testing.assert_allclose(np.asarray(diff.model_timesteps[t]),
                             np.asarray(diff.timestep_map[t]) * 1000 / 4000, rtol=1e-7)
  x_t = nhwc(golden["x_t"])
  model_fn = jax.jit(lambda x, s: model.apply({"params": params}, x, s))
  out = dl.p_mean_variance(diff, model_fn(x_t, diff.model_timesteps[t]), x_t, t, clip_denoised=True)
  for key in ("mean", "variance", "log_variance", "pred_xstart"):
    np.testing.assert_allclose(nchw(out[key]), golden[f"{name}/{key}"], atol=1e-4, rtol=0, err_msg=key)
