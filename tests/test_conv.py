"""The UNet's convolution (ddpm_ip_jax/models/conv.py): XLA's forward pass; on the CPU both gradients written as
channels-last convolutions, the filter gradient summed over batch chunks. It must give lax's numbers, for every
layer shape the UNet has and more (odd sizes, asymmetric and string padding, strides), also inside a lax.scan."""
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_ip_jax import config_base
from ddpm_ip_jax.models import conv, create_model, init_params


@pytest.mark.parametrize("batch, size, channels, expected", [
    (16, 32, 64 + 64, 4), (16, 16, 128 + 128, 8), (16, 8, 128 + 128, 16), (16, 32, 128 + 128, 2),
    (3, 64, 256 + 256, 1), (16, 4, 128 + 128, 16)])
def test_filter_grad_chunk_keeps_a_chunk_within_two_mib(batch, size, channels, expected):
  """The CIFAR-10 UNet's levels at 16 float32 images per device (64 and 128 base channels)."""
  assert conv.filter_grad_chunk(batch, size * size * channels * 4) == expected


def _loss(conv_fn, **kwargs):
  # sin makes the output gradient vary with every output value, so a chunk left out or counted twice shows.
  return lambda x, w: jnp.sum(jnp.sin(conv_fn(x, w, **kwargs)))


@pytest.mark.parametrize("batch, size, cin, cout, kernel, stride, padding", [
    (6, 32, 8, 16, 3, 1, 1),   # 1 image per chunk, 6 chunks
    (5, 16, 16, 32, 3, 1, 1),  # 2 per chunk and a last chunk of 1
    (9, 16, 16, 8, 1, 1, 0),   # the 1x1 skip convolution, 4 + 4 + 1
    (6, 32, 24, 24, 3, 2, 1),  # the strided Downsample: chunked by its 16x16 output, 2 per chunk
    (2, 8, 8, 8, 3, 1, 1),     # one chunk
    (3, 7, 4, 5, 3, 2, 1),     # odd size, strided: the last input row gets no output of its own
    (3, 9, 4, 5, 3, 2, (0, 1)),  # asymmetric padding
    (2, 6, 4, 5, 3, 1, 0),     # no padding: the output is smaller
    (2, 5, 4, 5, 3, 3, 1),     # stride 3
    (2, 8, 4, 5, 3, 2, "SAME"),
    (2, 8, 4, 5, 3, 1, "VALID"),
])
def test_forward_and_gradients_equal_lax(batch, size, cin, cout, kernel, stride, padding, monkeypatch):
  # Chunks of the sizes the comments say (these layers are small, so the chunk budget shrinks with them).
  monkeypatch.setattr(conv, "FILTER_GRAD_CHUNK_BYTES", 32 * 32 * 24 * 4)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, size, size, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, cin, cout)), jnp.float32)
  if not isinstance(padding, str):
    padding = ((padding, padding) if isinstance(padding, int) else padding,) * 2
  kwargs = dict(window_strides=(stride, stride), padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_array_equal(conv.conv_general_dilated(x, w, **kwargs), lax.conv_general_dilated(x, w, **kwargs))
  theirs = jax.jit(jax.grad(_loss(lax.conv_general_dilated, **kwargs), (0, 1)))(x, w)

  def in_a_scan(x, w):  # the training step's micro-batch loop: the same gradients, summed over two halves
    halves = x.reshape((2, -1) + x.shape[1:]) if batch % 2 == 0 else x[None]
    step = lambda acc, xs: (jax.tree.map(jnp.add, acc, jax.grad(_loss(conv.conv_general_dilated, **kwargs),
                                                                (0, 1))(xs, w)), None)
    (dx, dw), _ = lax.scan(step, (jnp.zeros_like(halves[0]), jnp.zeros_like(w)), halves)
    return dx, dw

  ours = jax.jit(jax.grad(_loss(conv.conv_general_dilated, **kwargs), (0, 1)))(x, w)
  np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(theirs[0]))))
  np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(theirs[1]))))
  assert ours[0].dtype == x.dtype and ours[1].dtype == w.dtype
  if batch % 2 == 0:
    dx_sum, dw = jax.jit(in_a_scan)(x, w)
    np.testing.assert_allclose(dx_sum, theirs[0][:batch // 2] + theirs[0][batch // 2:], rtol=1e-5,
                               atol=1e-5 * float(jnp.max(jnp.abs(theirs[0]))))
    np.testing.assert_allclose(dw, theirs[1], rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(theirs[1]))))


def _conv_dimension_numbers(jaxpr):
  """The dimension numbers of every convolution in `jaxpr`, its sub-jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      found.append(eqn.params["dimension_numbers"])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, "eqns"):
          found += _conv_dimension_numbers(sub)
  return found


def test_both_gradients_are_channels_last_convolutions():
  """What makes them fast inside a loop on XLA:CPU: every convolution of the backward pass has the forward's
  channels-last form (lax's own filter gradient swaps batch and features in its dimension numbers)."""
  x = jnp.ones((4, 8, 8, 3), jnp.float32)
  w = jnp.ones((3, 3, 3, 5), jnp.float32)
  kwargs = dict(window_strides=(2, 2), padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  of = lambda conv_fn: _conv_dimension_numbers(jax.make_jaxpr(jax.grad(_loss(conv_fn, **kwargs), (0, 1)))(x, w).jaxpr)
  ours, theirs = of(conv.conv_general_dilated), of(lax.conv_general_dilated)
  assert len(ours) == 3 and set(ours) == {conv.channels_last(2)}  # forward, input and filter gradient
  assert len(set(theirs)) > 1  # lax's are not, so the check can tell


def test_low_precision_chunks_are_summed_in_float32(monkeypatch):
  """bfloat16 compute: the chunks' bfloat16 filter gradients are added up in float32 and rounded once, not
  rounded to bfloat16 after every addition."""
  monkeypatch.setattr(conv, "FILTER_GRAD_CHUNK_BYTES", 16 * 16 * 16 * 2)  # one image per chunk
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((16, 16, 16, 8)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((3, 3, 8, 8)), jnp.bfloat16)
  g = jnp.asarray(rng.standard_normal((16, 16, 16, 8)), jnp.bfloat16)
  kwargs = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ours = jax.vjp(lambda w_: conv.conv_general_dilated(x, w_, **kwargs), w)[1](g)[0]
  parts = [jax.vjp(lambda w_, i=i: lax.conv_general_dilated(x[i:i + 1], w_, **kwargs), w)[1](g[i:i + 1])[0]
           for i in range(16)]
  in_float32 = sum(p.astype(jnp.float32) for p in parts).astype(jnp.bfloat16)
  in_bfloat16 = sum(parts[1:], parts[0])
  assert ours.dtype == jnp.bfloat16
  np.testing.assert_array_equal(ours.astype(jnp.float32), in_float32.astype(jnp.float32))
  assert not np.array_equal(in_bfloat16.astype(jnp.float32), in_float32.astype(jnp.float32))  # it would show


def test_the_unet_takes_its_filter_gradients_from_the_chunks(monkeypatch):
  """The UNet's parameter gradients with every convolution's filter gradient chunked equal those without
  chunking (the tests' small networks fit one chunk at the default budget, so it is made small here)."""
  m = config_base.get_config().model
  m.update(image_size=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
           num_heads=2, learn_sigma=True, dropout=0.0)
  model = create_model(m)
  rng = np.random.default_rng(0)
  # Off the zero init of the output convolutions, so that every gradient flows.
  params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32),
                        init_params(model, jax.random.key(0)))
  x = jnp.asarray(rng.standard_normal((4, 8, 8, 3)), jnp.float32)
  t = jnp.asarray([0, 10, 500, 999], jnp.int32)
  calls = []
  original = conv._channels_last_conv

  def counting(*args):
    calls.append(args[-1])  # the chunk size
    return original(*args)

  def grads(chunk_bytes):
    monkeypatch.setattr(conv, "FILTER_GRAD_CHUNK_BYTES", chunk_bytes)
    loss = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x, t, train=True)))
    return jax.jit(jax.grad(loss))(params)

  monkeypatch.setattr(conv, "_channels_last_conv", counting)
  whole = grads(1 << 40)
  assert calls and set(calls) == {4}  # every convolution, each in one chunk of the 4 images
  calls.clear()
  pieces = grads(1)  # one image per chunk everywhere
  assert calls and set(calls) == {1}
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(pieces)):
    assert float(jnp.max(jnp.abs(a))) > 0
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(a))) + 1e-12)
