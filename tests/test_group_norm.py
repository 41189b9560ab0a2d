"""GroupNorm with its written-out gradient (ddpm_ip_jax/models/group_norm.py): the reference's formula forward,
and the gradients of flax's GroupNorm (autodiff) for the input, the scale and the bias; the same for GroupNorm
fused with the SiLU after it (and the ResBlocks' scale-shift between them)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_ip_jax.models.group_norm import GroupNorm, GroupNormSiLU, group_norm

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


def _scale_shift(shape):
  rng = np.random.default_rng(1)
  return (jnp.asarray(0.3 * rng.standard_normal((shape[0], shape[-1])), jnp.float32),
          jnp.asarray(rng.standard_normal((shape[0], shape[-1])), jnp.float32))


def _expand(v, ndim):
  return v.reshape((v.shape[0],) + (1,) * (ndim - 2) + (v.shape[-1],))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_scale_shift", [False, True])
def test_fused_silu_forward_is_the_reference_formula(shape, with_scale_shift):
  x, gamma, beta, _ = _inputs(shape)
  s, shift = _scale_shift(shape) if with_scale_shift else (None, None)
  g = np.asarray(x, np.float64).reshape(shape[0], -1, 32, shape[-1] // 32)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 3), keepdims=True)
  z = ((g - mean) / np.sqrt(var + 1e-5)).reshape(shape) * np.asarray(gamma) + np.asarray(beta)
  if with_scale_shift:
    z = z * (1 + _expand(np.asarray(s, np.float64), len(shape))) + _expand(np.asarray(shift, np.float64), len(shape))
  want = z / (1 + np.exp(-z))
  got = GroupNormSiLU().apply({"params": {"scale": gamma, "bias": beta}}, x, s, shift)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=3e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_scale_shift", [False, True])
def test_fused_silu_gradients_equal_autodiff_of_the_parts(shape, with_scale_shift):
  """Against flax's GroupNorm, the scale-shift and nn.silu differentiated by autodiff: the input, GroupNorm's
  scale and bias, and the scale and shift from the time embedding."""
  x, gamma, beta, weights = _inputs(shape)
  s, shift = _scale_shift(shape)
  flax_norm = nn.GroupNorm(num_groups=32, epsilon=1e-5, use_fast_variance=False)

  def theirs(x, gamma, beta, s, shift):
    h = flax_norm.apply({"params": {"scale": gamma, "bias": beta}}, x)
    if with_scale_shift:
      h = h * (1 + _expand(s, x.ndim)) + _expand(shift, x.ndim)
    return jnp.sum(nn.silu(h) * weights)

  def ours(x, gamma, beta, s, shift):
    args = (s, shift) if with_scale_shift else ()
    return jnp.sum(GroupNormSiLU().apply({"params": {"scale": gamma, "bias": beta}}, x, *args) * weights)

  argnums = (0, 1, 2, 3, 4) if with_scale_shift else (0, 1, 2)
  got = jax.grad(ours, argnums)(x, gamma, beta, s, shift)
  want = jax.grad(theirs, argnums)(x, gamma, beta, s, shift)
  for name, g, w in zip(("x", "scale", "bias", "s", "shift"), got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(w))), err_msg=name)


def test_fused_module_has_the_params_of_group_norm():
  x = jnp.ones((2, 4, 4, 32))
  fused = GroupNormSiLU().init(jax.random.key(0), x)["params"]
  plain = GroupNorm().init(jax.random.key(0), x)["params"]
  assert jax.tree.map(np.shape, fused) == jax.tree.map(np.shape, plain)
