"""GroupNorm with its written-out gradient (ddpm_ip_jax/models/group_norm.py): the reference's formula forward,
and the gradients of flax's GroupNorm (autodiff) for the input, the scale and the bias."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_ip_jax.models.group_norm import GroupNorm, group_norm

SHAPES = [(3, 8, 8, 64), (2, 5, 7, 32), (2, 16, 96)]


def _inputs(shape):
  rng = np.random.default_rng(0)
  c = shape[-1]
  # Far from zero mean, where a one-pass variance would lose digits.
  x = (5.0 + 3.0 * rng.standard_normal(shape)).astype(np.float32)
  return (jnp.asarray(x), jnp.asarray(rng.standard_normal(c), jnp.float32),
          jnp.asarray(rng.standard_normal(c), jnp.float32), jnp.asarray(rng.standard_normal(shape), jnp.float32))


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_is_the_reference_formula(shape):
  x, scale, bias, _ = _inputs(shape)
  g = np.asarray(x, np.float64).reshape(shape[0], -1, 32, shape[-1] // 32)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 3), keepdims=True)
  want = ((g - mean) / np.sqrt(var + 1e-5)).reshape(shape) * np.asarray(scale) + np.asarray(bias)
  np.testing.assert_allclose(group_norm(x, scale, bias), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_equal_flax_autodiff(shape):
  x, scale, bias, weights = _inputs(shape)
  flax_norm = nn.GroupNorm(num_groups=32, epsilon=1e-5, use_fast_variance=False)

  def theirs(x, scale, bias):
    return jnp.sum(flax_norm.apply({"params": {"scale": scale, "bias": bias}}, x) * weights)

  def ours(x, scale, bias):
    return jnp.sum(group_norm(x, scale, bias) * weights)

  for got, want in zip(jax.grad(ours, (0, 1, 2))(x, scale, bias), jax.grad(theirs, (0, 1, 2))(x, scale, bias)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_module_has_flax_names_and_inits():
  x = jnp.ones((2, 4, 4, 32))
  params = GroupNorm().init(jax.random.key(0), x)["params"]
  assert set(params) == {"scale", "bias"}
  np.testing.assert_array_equal(params["scale"], np.ones(32))
  np.testing.assert_array_equal(params["bias"], np.zeros(32))
