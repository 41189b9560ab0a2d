"""The diffusion math against the PyTorch reference's golden numbers (tests/data/reference)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_reference, nchw, nhwc
from ddpm_ip_jax import diffusion as dl

SCHEDULES = load_reference("schedules")
RESPACING = load_reference("respacing")
LOSSES = load_reference("losses")


def rel_err(a, b):
  return np.max(np.abs(np.asarray(a, np.float64) - b) / np.maximum(np.abs(b), 1e-300))


@pytest.mark.parametrize("key", ["cosine_1000", "cosine_4000", "linear_1000", "linear_4000"])
def test_schedule_tables_match_reference_float64(key):
  name, steps = key.split("_")
  tables = dl.schedule_tables(dl.beta_schedule(name, int(steps)))
  names = sorted({k.split("/")[1] for k in SCHEDULES if k.startswith(key + "/")})
  assert len(names) == 13
  for n in names:
    assert tables[n].dtype == np.float64
    assert rel_err(tables[n], SCHEDULES[f"{key}/{n}"]) < 1e-10, n


@pytest.mark.parametrize("spec", ["100", "250", "ddim25", "ddim50", "10,20,5", "1000"])
def test_respacing_matches_reference(spec):
  kept = dl.space_timesteps(1000, spec)
  np.testing.assert_array_equal(kept, RESPACING[f"{spec}/timestep_map"])
  betas = dl.respace_betas(dl.beta_schedule("cosine", 1000), kept)
  assert rel_err(betas, RESPACING[f"{spec}/betas"]) < 1e-10
  diff = dl.make_diffusion(steps=1000, noise_schedule="cosine", timestep_respacing=spec)
  assert diff.num_timesteps == len(kept)
  np.testing.assert_array_equal(np.asarray(diff.timestep_map), kept)


def test_ddim50_ends_at_980_and_bad_specs_are_rejected():
  assert dl.space_timesteps(1000, "ddim50")[-1] == 980
  for bad in ["ddim7x", "ddim999", "2000", "abc", "0"]:
    with pytest.raises(ValueError, match="respacing|steps"):
      dl.space_timesteps(1000, bad)
  with pytest.raises(ValueError, match="noise schedule"):
    dl.beta_schedule("quadratic", 1000)
  with pytest.raises(ValueError, match="loss type"):
    dl.make_diffusion(loss_type="l1")


def _diffusion_for_case(case):
  if case == "ip0.1_fixedvar_fixed":
    return dl.make_diffusion(steps=1000, noise_schedule="cosine", var_type="fixed_large", loss_type="mse")
  return dl.make_diffusion(steps=1000, noise_schedule="cosine", var_type="learned_range", loss_type="rescaled_mse")


@pytest.mark.parametrize("case", ["ip0.1_fixed", "ip0.15_fixed", "ip0_fixed", "ip0.1_fixedvar_fixed"])
def test_losses_match_reference_with_fixed_model_output(case):
  diff = _diffusion_for_case(case)
  seen = {}
  fixed_output = nhwc(LOSSES[f"{case}/model_output"])

  def model_fn(x_t, t):
    seen["x_t"], seen["t"] = x_t, t
    return fixed_output

  t = jnp.asarray(LOSSES["t"], jnp.int32)
  losses = dl.training_losses(diff, model_fn, nhwc(LOSSES["x_start"]), t, nhwc(LOSSES[f"{case}/noise"]),
                              nhwc(LOSSES[f"{case}/xi"]), float(LOSSES[f"{case}/gamma"]))
  np.testing.assert_allclose(nchw(seen["x_t"]), LOSSES[f"{case}/x_t"], atol=2e-6)
  np.testing.assert_array_equal(np.asarray(seen["t"]), LOSSES["t"])  # no respacing: original steps
  jitted = jax.jit(lambda *a: dl.training_losses(diff, lambda x, tt: fixed_output, *a))(
      nhwc(LOSSES["x_start"]), t, nhwc(LOSSES[f"{case}/noise"]), nhwc(LOSSES[f"{case}/xi"]),
      float(LOSSES[f"{case}/gamma"]))
  for name in ["mse", "vb", "loss"]:
    if f"{case}/{name}" in LOSSES:
      assert rel_err(losses[name], LOSSES[f"{case}/{name}"]) < 1e-4, name
      assert rel_err(jitted[name], LOSSES[f"{case}/{name}"]) < 1e-4, name
  if case == "ip0.1_fixedvar_fixed":
    np.testing.assert_array_equal(np.asarray(losses["vb"]), 0.0)


def test_gamma_zero_is_plain_adm_and_perturbation_changes_only_the_input():
  diff = _diffusion_for_case("ip0.1_fixed")
  x0, t = nhwc(LOSSES["x_start"]), jnp.asarray(LOSSES["t"], jnp.int32)
  eps, xi = nhwc(LOSSES["ip0.1_fixed/noise"]), nhwc(LOSSES["ip0.1_fixed/xi"])
  # gamma = 0: the input is q_sample(x0, t, eps), whatever xi is.
  np.testing.assert_array_equal(dl.perturbed_input(diff, x0, t, eps, xi, 0.0), dl.q_sample(diff, x0, t, eps))

  # A network that outputs exactly eps (and v = 0): the mse is 0 for every gamma, since the target is eps,
  # not eps + gamma xi; only what the network sees moves with gamma.
  def oracle(x_t, t_model):
    return jnp.concatenate([eps, jnp.zeros_like(eps)], axis=-1)

  inputs = {}
  for gamma in [0.0, 0.1, 0.5]:
    seen = {}
    losses = dl.training_losses(diff, lambda x, tt: (seen.setdefault("x", x), oracle(x, tt))[1],
                                x0, t, eps, xi, gamma)
    np.testing.assert_allclose(np.asarray(losses["mse"]), 0.0, atol=0)
    inputs[gamma] = seen["x"]
  abar = np.asarray(diff.tables["alphas_cumprod"])[np.asarray(t)].reshape(-1, 1, 1, 1)
  np.testing.assert_allclose(inputs[0.5] - inputs[0.0], np.sqrt(1 - abar) * 0.5 * xi, atol=1e-5)


def test_vb_trains_only_the_variance_channels():
  diff = _diffusion_for_case("ip0.1_fixed")
  x0, t = nhwc(LOSSES["x_start"]), jnp.asarray(LOSSES["t"], jnp.int32)
  eps, xi = nhwc(LOSSES["ip0.1_fixed/noise"]), nhwc(LOSSES["ip0.1_fixed/xi"])
  out = nhwc(LOSSES["ip0.1_fixed/model_output"])
  vb_grad = jax.grad(lambda o: dl.training_losses(diff, lambda *_: o, x0, t, eps, xi, 0.1)["vb"].sum())(out)
  assert np.all(np.asarray(vb_grad[..., :3]) == 0)
  assert np.any(np.asarray(vb_grad[..., 3:]) != 0)


def test_kl_loss_types_and_start_x():
  x0, t = nhwc(LOSSES["x_start"]), jnp.asarray(LOSSES["t"], jnp.int32)
  eps, xi = nhwc(LOSSES["ip0.1_fixed/noise"]), nhwc(LOSSES["ip0.1_fixed/xi"])
  out = nhwc(LOSSES["ip0.1_fixed/model_output"])
  kl = dl.make_diffusion(noise_schedule="cosine", var_type="learned_range", loss_type="kl")
  rkl = dl.make_diffusion(noise_schedule="cosine", var_type="learned_range", loss_type="rescaled_kl")
  a = dl.training_losses(kl, lambda *_: out, x0, t, eps, xi, 0.1)
  b = dl.training_losses(rkl, lambda *_: out, x0, t, eps, xi, 0.1)
  # The kl loss is the same vb term as the hybrid loss's (at T = 1000), through the full output.
  np.testing.assert_allclose(np.asarray(a["loss"]), LOSSES["ip0.1_fixed/vb"], rtol=1e-4)
  np.testing.assert_allclose(np.asarray(b["loss"]), 1000 * np.asarray(a["loss"]), rtol=1e-6)
  # start_x prediction regresses onto x0.
  sx = dl.make_diffusion(noise_schedule="cosine", mean_type="start_x")
  c = dl.training_losses(sx, lambda *_: x0, x0, t, eps, xi, 0.1)
  np.testing.assert_allclose(np.asarray(c["mse"]), 0.0)


def test_p_mean_variance_fixed_variances_and_posterior():
  diff = dl.make_diffusion(noise_schedule="cosine", var_type="fixed_large")
  tables = dl.schedule_tables(dl.beta_schedule("cosine", 1000))
  x = jnp.ones((3, 2, 2, 1))
  t = jnp.array([0, 1, 999], jnp.int32)
  out = dl.p_mean_variance(diff, jnp.zeros_like(x), x, t)
  expected = np.append(tables["posterior_variance"][1], tables["betas"][1:])[[0, 1, 999]]
  np.testing.assert_allclose(np.asarray(out["variance"])[:, 0, 0, 0], expected, rtol=1e-6)
  small = dl.make_diffusion(noise_schedule="cosine", var_type="fixed_small")
  out = dl.p_mean_variance(small, jnp.zeros_like(x), x, t)
  np.testing.assert_allclose(np.asarray(out["log_variance"])[:, 0, 0, 0],
                             tables["posterior_log_variance_clipped"][[0, 1, 999]], rtol=1e-6)
  with pytest.raises(ValueError, match="channels"):
    dl.p_mean_variance(small, jnp.zeros((3, 2, 2, 2)), x, t)


def test_input_perturbation_variants():
  t = jnp.array([0, 499, 999, 250], jnp.int32)
  np.testing.assert_array_equal(np.asarray(dl.perturbation_gamma("constant", 0.1, t, 1000)), np.float32(0.1))
  lin = np.asarray(dl.perturbation_gamma("linear", 0.2, t, 1000, gamma_start=0.05))
  np.testing.assert_allclose(lin, 0.05 + 0.15 * np.array([0, 499, 999, 250]) / 999, rtol=1e-6)
  u = np.asarray(dl.perturbation_gamma("uniform", 0.3, jnp.zeros(4000, jnp.int32), 1000,
                                       key=jax.random.key(0)))
  assert 0 <= u.min() and u.max() <= 0.3 and abs(u.mean() - 0.15) < 0.01
  with pytest.raises(ValueError, match="input perturbation kind"):
    dl.perturbation_gamma("cosine", 0.1, t, 1000)
  # A per-example gamma perturbs each example by its own amount.
  diff = _diffusion_for_case("ip0.1_fixed")
  x0, eps, xi = nhwc(LOSSES["x_start"]), nhwc(LOSSES["ip0.1_fixed/noise"]), nhwc(LOSSES["ip0.1_fixed/xi"])
  gammas = jnp.array([0.0, 0.1, 0.15, 0.1])
  per_example = dl.perturbed_input(diff, x0, t, eps, xi, gammas)
  for i, g in enumerate([0.0, 0.1, 0.15, 0.1]):
    np.testing.assert_allclose(per_example[i:i + 1], dl.perturbed_input(diff, x0[i:i + 1], t[i:i + 1],
                                                                         eps[i:i + 1], xi[i:i + 1], g), atol=1e-7)
