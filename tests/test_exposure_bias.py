"""Exposure-bias measurements on a toy model with known answers: the exact denoiser of Gaussian data."""
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_ip_jax import diffusion as dl
from ddpm_ip_jax import exposure as eb

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
  return mu + s * jax.random.normal(jax.random.PRNGKey(1), (n, 8, 8, 1))


def test_point_mass_data_has_no_exposure_bias():
  diff = dl.make_diffusion(steps=T, noise_schedule="cosine", var_type="fixed_small")
  x0 = jnp.full((64, 8, 8, 1), 0.3)
  r = measure(diff, exact_eps(diff, 0.3, 0.0), x0, jax.random.PRNGKey(0))
  # The model knows x0 exactly: no prediction error anywhere, and the sampled x_t have exactly the
  # training distribution q(x_t | x0), so their spread is sqrt(1 - abar_t) up to sampling error.
  # (pred_x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) amplifies float32 rounding at the noisiest step.)
  np.testing.assert_allclose(r["nu_sampling"], 0.0, atol=1e-3)
  np.testing.assert_allclose(r["nu_training"], 0.0, atol=1e-3)
  assert max(r["nu_sampling"][1:]) < 1e-4
  np.testing.assert_allclose(r["spread"], r["expected_spread"], rtol=0.05)
  assert r["delta_sum"] < 5e-3  # a model that under-predicts eps by 10% gives ~0.4 (next test)
  assert r["reconstruction_l1"] < 1e-5
  assert r["t_original"] == list(range(T - 1, -1, -1))


def test_training_prediction_error_matches_the_gaussian_posterior():
  diff = dl.make_diffusion(steps=T, noise_schedule="cosine", var_type="fixed_small")
  mu, s = 0.1, 0.3
  nu = np.asarray(eb.training_prediction_error(diff, exact_eps(diff, mu, s), data(mu, s), jax.random.PRNGKey(2),
                                               clip_denoised=False))
  abar = np.asarray(diff.tables["alphas_cumprod"])[::-1]
  posterior_std = np.sqrt(s ** 2 * (1 - abar) / (abar * s ** 2 + 1 - abar))
  np.testing.assert_allclose(nu, posterior_std, rtol=0.06)


def test_a_biased_model_shows_exposure_bias():
  diff = dl.make_diffusion(steps=T, noise_schedule="cosine", var_type="fixed_small")
  mu = 0.1
  x0 = jnp.full((64, 8, 8, 1), mu)
  exact = measure(diff, exact_eps(diff, mu, 0.0), x0, jax.random.PRNGKey(0))
  biased = measure(diff, exact_eps(diff, mu, 0.0, shrink=0.8), x0, jax.random.PRNGKey(0))
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
  stats = eb.sampling_chain_statistics(diff, exact_eps(diff, mu, s), data(mu, s, n=128), jax.random.PRNGKey(3),
                                       clip_denoised=False)
  abar = np.asarray(diff.tables["alphas_cumprod"])[::-1]
  np.testing.assert_allclose(np.asarray(stats["spread"]), np.sqrt(1 - abar + 2 * abar * s ** 2), rtol=0.05)


def test_start_step_and_ddim_and_plot(tmp_path):
  diff = dl.make_diffusion(steps=T, noise_schedule="cosine", var_type="fixed_small", timestep_respacing="20")
  x0 = jnp.full((8, 8, 8, 1), -0.2)
  stats = eb.sampling_chain_statistics(diff, exact_eps(dl.make_diffusion(steps=T, noise_schedule="cosine"),
                                                       -0.2, 0.0), x0, jax.random.PRNGKey(0), sampler="ddim",
                                       start_step=9)
  assert stats["nu"].shape == (10,) and list(np.asarray(stats["t"])) == list(range(9, -1, -1))
  np.testing.assert_allclose(np.asarray(stats["final"]), -0.2, atol=1e-5)  # DDIM of an exact point-mass model
  r = measure(diff, exact_eps(dl.make_diffusion(steps=T, noise_schedule="cosine"), -0.2, 0.0), x0,
                 jax.random.PRNGKey(0), start_step=9)
  assert len(r["nu_sampling"]) == len(r["nu_training"]) == len(r["delta"]) == 10
  assert r["t_original"] == list(np.asarray(diff.timestep_map)[9::-1])
  eb.plot(r, str(tmp_path / "eb.png"), title="toy")
  assert (tmp_path / "eb.png").stat().st_size > 10_000


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
  right = eb.measure(fns, {"mu": jnp.float32(0.2)}, x0, jax.random.PRNGKey(0))
  wrong = eb.measure(fns, {"mu": jnp.float32(-0.4)}, x0, jax.random.PRNGKey(0))
  assert right["reconstruction_l1"] < 1e-4 < 0.5 < wrong["reconstruction_l1"]
  assert fns.chain._cache_size() == 1 and fns.training_error._cache_size() == 1  # pylint: disable=protected-access
