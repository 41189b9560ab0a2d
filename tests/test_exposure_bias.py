"""Exposure-bias measurements on a toy model with known answers: the exact denoiser of Gaussian data."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_ip_jax import diffusion as dl
from ddpm_ip_jax import exposure as eb
from ddpm_ip_jax import exposure_bias_lib

T = 100


def exact_eps(diff, mu, s, shrink=1.0):
  """E[eps | x_t] for data x0 ~ N(mu, s^2) per pixel (x_t = a x0 + b eps); `shrink` < 1 makes it biased."""
  abar = diff.tables["alphas_cumprod"]

  def model_fn(x, t):
    a2 = abar[t].reshape(-1, 1, 1, 1)
    a, b = jnp.sqrt(a2), jnp.sqrt(1 - a2)
    return shrink * b * (x - a * mu) / (a2 * s ** 2 + b ** 2)

  return model_fn


def measure(diff, model_fn, x0, key, *, start_step=None, **settings):
  """eb.measure of a params-free model_fn(x, t), compiled through eb.make_measure_fns."""
  fns = eb.make_measure_fns(diff, lambda params, x, t: model_fn(x, t), **settings)
  return eb.measure(fns, None, x0, key, start_step=start_step)


def data(mu, s, n=64):
  return mu + s * jax.random.normal(jax.random.key(1), (n, 8, 8, 1))


def test_point_mass_data_has_no_exposure_bias():
  diff = dl.make_diffusion(steps=T, noise_schedule="cosine", var_type="fixed_small")
  x0 = jnp.full((64, 8, 8, 1), 0.3)
  r = measure(diff, exact_eps(diff, 0.3, 0.0), x0, jax.random.key(0))
  # The model knows x0 exactly: no prediction error anywhere, and the sampled x_t have exactly the
  # training distribution q(x_t | x0), so their spread is sqrt(1 - abar_t) up to sampling error.
  # (pred_x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) amplifies float32 rounding at the noisiest step.)
  np.testing.assert_allclose(r["nu_sampling"], 0.0, atol=1e-3)
  np.testing.assert_allclose(r["nu_training"], 0.0, atol=1e-3)
  assert max(r["nu_sampling"][1:]) < 1e-4
  np.testing.assert_allclose(r["spread"], r["expected_spread"], rtol=0.05)
  assert r["delta_sum"] < 5e-3  # a model that under-predicts eps by 10% gives ~0.4 (next test)
  assert r["chain_reconstruction_l1"] < 1e-5
  assert r["t_original"] == list(range(T - 1, -1, -1))


def test_training_prediction_error_matches_the_gaussian_posterior():
  diff = dl.make_diffusion(steps=T, noise_schedule="cosine", var_type="fixed_small")
  mu, s = 0.1, 0.3
  nu = np.asarray(eb.training_prediction_error(diff, exact_eps(diff, mu, s), data(mu, s), jax.random.key(2),
                                               clip_denoised=False))
  abar = np.asarray(diff.tables["alphas_cumprod"])[::-1]
  posterior_std = np.sqrt(s ** 2 * (1 - abar) / (abar * s ** 2 + 1 - abar))
  np.testing.assert_allclose(nu, posterior_std, rtol=0.06)


def test_a_biased_model_shows_exposure_bias():
  diff = dl.make_diffusion(steps=T, noise_schedule="cosine", var_type="fixed_small")
  mu = 0.1
  x0 = jnp.full((64, 8, 8, 1), mu)
  exact = measure(diff, exact_eps(diff, mu, 0.0), x0, jax.random.key(0))
  biased = measure(diff, exact_eps(diff, mu, 0.0, shrink=0.8), x0, jax.random.key(0))
  # Under-predicting eps leaves too much noise in x_t: the sampled spread runs above sqrt(1 - abar)
  # and the error accumulates along the chain, beyond what the same model makes on training inputs.
  assert biased["delta_sum"] > 100 * exact["delta_sum"]
  late = slice(-50, None)  # the second half of the chain (t = 49 .. 0)
  ratio = np.asarray(biased["nu_sampling"][late]) / np.asarray(biased["nu_training"][late])
  assert ratio.mean() > 1.2
  np.testing.assert_allclose(np.asarray(exact["nu_sampling"][late]), 0.0, atol=1e-4)


def test_spread_of_gaussian_data_from_pure_noise():
  """Started from pure noise, the chain of an exact model forgets the real x0: x_t ~ q(x_t) independent of
  x0, so spread^2 = var(x_t) + abar var(x0) = (1 - abar) + 2 abar s^2 per pixel."""
  diff = dl.make_diffusion(steps=T, noise_schedule="cosine", var_type="fixed_small")
  mu, s = 0.1, 0.3
  stats = eb.sampling_chain_statistics(diff, exact_eps(diff, mu, s), data(mu, s, n=128), jax.random.key(3),
                                       clip_denoised=False)
  abar = np.asarray(diff.tables["alphas_cumprod"])[::-1]
  np.testing.assert_allclose(np.asarray(stats["spread"]), np.sqrt(1 - abar + 2 * abar * s ** 2), rtol=0.05)


def test_start_step_and_ddim_and_plot(tmp_path):
  diff = dl.make_diffusion(steps=T, noise_schedule="cosine", var_type="fixed_small", timestep_respacing="20")
  x0 = jnp.full((8, 8, 8, 1), -0.2)
  stats = eb.sampling_chain_statistics(diff, exact_eps(dl.make_diffusion(steps=T, noise_schedule="cosine"),
                                                       -0.2, 0.0), x0, jax.random.key(0), sampler="ddim",
                                       start_step=9)
  assert stats["nu"].shape == (10,) and list(np.asarray(stats["t"])) == list(range(9, -1, -1))
  np.testing.assert_allclose(np.asarray(stats["final"]), -0.2, atol=1e-5)  # DDIM of an exact point-mass model
  r = measure(diff, exact_eps(dl.make_diffusion(steps=T, noise_schedule="cosine"), -0.2, 0.0), x0,
                 jax.random.key(0), start_step=9)
  assert len(r["nu_sampling"]) == len(r["nu_training"]) == len(r["delta"]) == 10
  assert r["t_original"] == list(np.asarray(diff.timestep_map)[9::-1])
  exposure_bias_lib.plot(r, str(tmp_path / "eb.png"), title="toy")  # the chain's measures only: two panels
  assert (tmp_path / "eb.png").stat().st_size > 10_000
  full = dl.make_diffusion(steps=T, noise_schedule="cosine", var_type="fixed_small")
  r.update(eb.data_start_measures(eb.make_data_start_fns(full, lambda p, x, t: exact_eps(full, -0.2, 0.0)(x, t)), None,
                               x0, jax.random.key(1)))
  exposure_bias_lib.plot(r, str(tmp_path / "eb3.png"), title="toy")  # with the authors' one-step nu_t: three panels
  assert (tmp_path / "eb3.png").stat().st_size > (tmp_path / "eb.png").stat().st_size


def test_params_are_arguments_and_the_chain_compiles_once():
  """The measurements take the network parameters as traced arguments: other parameters give other numbers
  without a new compilation, and the noisy and the deterministic chain share one compiled chain."""
  diff = dl.make_diffusion(steps=20, noise_schedule="cosine", var_type="fixed_small")
  abar = diff.tables["alphas_cumprod"]

  def apply_fn(params, x, t):  # the exact eps of point-mass data at params["mu"]
    a2 = abar[t].reshape(-1, 1, 1, 1)
    return (x - jnp.sqrt(a2) * params["mu"]) / jnp.sqrt(1 - a2)

  fns = eb.make_measure_fns(diff, apply_fn)
  x0 = jnp.full((8, 4, 4, 1), 0.2)
  right = eb.measure(fns, {"mu": jnp.float32(0.2)}, x0, jax.random.key(0))
  wrong = eb.measure(fns, {"mu": jnp.float32(-0.4)}, x0, jax.random.key(0))
  assert right["chain_reconstruction_l1"] < 1e-4 < 0.5 < wrong["chain_reconstruction_l1"]
  assert fns.chain._cache_size() == 1 and fns.training_error._cache_size() == 1  # pylint: disable=protected-access


def test_the_authors_one_step_nu_is_the_posterior_std_and_ignores_a_constant_bias():
  """One-step nu_t (the authors' gaussian_error): the per-pixel std over the batch of pred_x0 - x0, at t = 0, s,
  2s, ... (s = T / 100). For Gaussian data and the exact denoiser it is the posterior std of x0 given x_t; a
  model that is off by the same amount for every example has std 0 (where an RMS would show the offset)."""
  diff = dl.make_diffusion(steps=200, noise_schedule="cosine", var_type="fixed_small")
  mu, s = 0.1, 0.3
  t, nu = eb.one_step_error(diff, exact_eps(diff, mu, s), data(mu, s, n=512), jax.random.key(3),
                            clip_denoised=False)
  assert np.asarray(t).tolist() == list(range(0, 200, 2))
  abar = np.asarray(diff.tables["alphas_cumprod"])[np.asarray(t)]
  posterior_std = np.sqrt(s ** 2 * (1 - abar) / (abar * s ** 2 + 1 - abar))
  np.testing.assert_allclose(np.asarray(nu), posterior_std, rtol=0.08, atol=2e-4)
  # Point-mass data at 0.3 and a model that believes in 0.5: pred_x0 = 0.5 for every example.
  x0 = jnp.full((32, 4, 4, 1), 0.3)
  _, nu = eb.one_step_error(diff, exact_eps(diff, 0.5, 0.0), x0, jax.random.key(4), clip_denoised=False)
  assert np.asarray(nu)[10:].max() < 1e-3


def test_the_authors_reconstruction_starts_at_0_6_t_and_is_exact_for_the_exact_denoiser():
  diff = dl.make_diffusion(steps=T, noise_schedule="cosine", var_type="fixed_small")
  assert eb.reconstruction_start(dl.make_diffusion(steps=1000)) == 599 and eb.reconstruction_start(diff) == 59
  fns = eb.make_data_start_fns(diff, lambda params, x, t: exact_eps(diff, 0.3, 0.0)(x, t))
  right = eb.data_start_measures(fns, None, jnp.full((16, 8, 8, 1), 0.3), jax.random.key(0))
  fns_wrong = eb.make_data_start_fns(diff, lambda params, x, t: exact_eps(diff, -0.2, 0.0)(x, t))
  wrong = eb.data_start_measures(fns_wrong, None, jnp.full((16, 8, 8, 1), 0.3), jax.random.key(0))
  assert right["reconstruction_start"] == 59 and right["reconstruction_l1"] < 1e-4 < 0.3 < wrong["reconstruction_l1"]
  assert len(right["nu_one_step"]) == 100 and right["nu_one_step_t"][:3] == [0, 1, 2]
  with pytest.raises(ValueError, match="full diffusion"):
    eb.make_data_start_fns(dl.make_diffusion(steps=T, timestep_respacing="10"), lambda p, x, t: x)
