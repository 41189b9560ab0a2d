"""Dropout's mask drawn in a loop of unrolled Threefry blocks: bit for bit `jax.random.bernoulli`, and the UNet's
numbers those of flax's `nn.Dropout`."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_ip_jax.models import create_model
from ddpm_ip_jax.models import dropout as dropout_lib
from test_unet import inputs, random_params, tiny_model_config


@pytest.mark.parametrize("shape, chunk", [
    ((3, 5), dropout_lib.CHUNK),         # one block, no loop
    ((4, 8, 8, 64), 1024),               # 16 iterations, no padding
    ((2, 7, 9, 130), 1000),              # 17 iterations, the last one padded
    ((2, 3), 1)])                        # one element per iteration
@pytest.mark.parametrize("keep_prob", [0.7, 0.9])
def test_keep_mask_is_bernoulli_bit_for_bit(shape, chunk, keep_prob):
  keys = [jax.random.PRNGKey(3), jax.random.key(7), jax.random.fold_in(jax.random.PRNGKey(0), 12345)]
  draw = jax.jit(lambda k: dropout_lib.keep_mask(k, keep_prob, shape, chunk=chunk))
  for key in keys:
    mask = np.asarray(draw(key))
    assert mask.shape == shape and mask.dtype == bool
    np.testing.assert_array_equal(mask, np.asarray(jax.random.bernoulli(key, keep_prob, shape)))
  if np.prod(shape) >= 100:
    assert 0.5 < mask.mean() < 1.0   # not all kept: a broken hash that keeps everything fails above too


def test_threefry_known_answer():
  """Random123's published known-answer vector for Threefry-2x32 with 20 rounds (key and counter all ones)."""
  ones = np.uint32(0xFFFFFFFF)
  out = dropout_lib.threefry2x32(ones, ones, jnp.full((1,), ones), jnp.full((1,), ones))
  assert [int(w[0]) for w in out] == [0x1CB996FC, 0xBB002BE7]


def test_other_key_implementations_fall_back_to_bernoulli():
  key = jax.random.key(5, impl="rbg")
  mask = dropout_lib.keep_mask(key, 0.8, (4, 300))
  np.testing.assert_array_equal(mask, jax.random.bernoulli(key, 0.8, (4, 300)))


def test_unet_dropout_equals_flax_dropout(monkeypatch):
  """The same rng stream (drawn in the `Dropout_0` scope of each ResBlock) and the same masks: the training
  forward pass and its parameter gradient are those of the UNet with flax's `nn.Dropout`."""
  model = create_model(tiny_model_config(dropout=0.3))
  params = random_params(model)
  x, t = inputs()

  def loss_and_grad():
    def loss(p):
      out = model.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.key(11)})
      return jnp.sum(out ** 2), out
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (ours_loss, ours_out), ours_grad = loss_and_grad()
  monkeypatch.setattr(dropout_lib, "Dropout", nn.Dropout)
  (flax_loss, flax_out), flax_grad = loss_and_grad()
  np.testing.assert_array_equal(ours_out, flax_out)
  np.testing.assert_allclose(ours_loss, flax_loss, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), ours_grad, flax_grad)
  # and dropout did act: another key changes the output
  other = model.apply({"params": params}, x, t, train=True, rngs={"dropout": jax.random.key(12)})
  assert not np.allclose(other, ours_out)


def _has_loop(shape, key):
  # a new function each time: make_jaxpr caches its traces by function
  return " scan[" in str(jax.make_jaxpr(lambda k: dropout_lib.keep_mask.__wrapped__(k, 0.9, shape))(key))


def test_the_chunked_loop_is_for_the_cpu_only(monkeypatch):
  """On a CPU the mask comes from the loop of Threefry blocks; on an accelerator it is jax.random.bernoulli's
  (JAX unrolls the hash there; a loop of small blocks would serialise the device)."""
  shape, key = (4, 64, 1024), jax.random.key(1)
  assert _has_loop(shape, key)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not _has_loop(shape, key)
