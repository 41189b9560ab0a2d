"""The UNet's convolution: `lax.conv_general_dilated`, with the filter gradient taken over batch chunks on a CPU.

XLA:CPU computes a convolution's filter gradient as one contraction over every batch position (batch x output
height x width). When that reduction is long its kernel slows down several times: on the 2-core Xeon (AVX-512,
2 MB of L2 per core) the 3x3 filter gradient of a 32x32x64 layer over 16 images runs at 34 GFLOP/s, against
100-104 GFLOP/s summed over chunks of 1-4 images and ~150 GFLOP/s for the same layer's forward and input-gradient
convolutions (docs/performance.md, "Kernel by kernel"). So on the CPU the backward pass here sums the filter
gradients of batch chunks whose operands fit `FILTER_GRAD_CHUNK_BYTES`; the input gradient and the
forward pass are XLA's own. The result is the same gradient up to float32 summation order (relative 1e-6);
other backends, grouped convolutions and batches that fit one chunk use `lax.conv_general_dilated` unchanged.

`conv_general_dilated` has lax's signature, so that `flax.linen.Conv(conv_general_dilated=...)` takes it.
"""
import math

import jax
from jax import lax
import jax.numpy as jnp

# Bytes of one filter-gradient chunk's operands (its input and output-gradient rows, x (C_in + C_out) x itemsize):
# the reduction stays fast while they fit the 2 MB L2 cache of a core. Measured on the CIFAR-10 UNet's levels at
# 16 images per device (docs/performance.md): 32x32x64 in chunks of 4 images (2 MiB) 104 GFLOP/s, of 8 64 GFLOP/s,
# whole 34; 16x16x128 in chunks of 8 (2 MiB) 104, whole 86; fewer images per chunk gain little more and make
# more operations to compile.
FILTER_GRAD_CHUNK_BYTES = 2 * 1024 * 1024


def filter_grad_chunk(batch, image_bytes, chunk_bytes=None):
  """Images per filter-gradient chunk, for `batch` images whose filter-gradient operands take `image_bytes` each
  (`batch`, no chunking, when the whole batch fits `chunk_bytes`, by default `FILTER_GRAD_CHUNK_BYTES`)."""
  chunk_bytes = FILTER_GRAD_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
  return min(batch, max(1, chunk_bytes // max(1, image_bytes)))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
  """`lax.conv_general_dilated` (same arguments, same forward result); on the CPU its filter gradient is
  summed over batch chunks (module docstring)."""
  def conv(x, w):
    return lax.conv_general_dilated(x, w, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count,
                                    batch_group_count=batch_group_count, precision=precision,
                                    preferred_element_type=preferred_element_type)

  if jax.default_backend() != "cpu" or feature_group_count != 1 or batch_group_count != 1:
    return conv(lhs, rhs)
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  out_shape = jax.eval_shape(conv, lhs, rhs).shape
  batch = lhs.shape[dn.lhs_spec[0]]
  positions = math.prod(out_shape[d] for d in dn.out_spec[2:])
  channels = lhs.shape[dn.lhs_spec[1]] + out_shape[dn.out_spec[1]]
  chunk = filter_grad_chunk(batch, positions * channels * jnp.dtype(lhs.dtype).itemsize)
  if chunk >= batch:
    return conv(lhs, rhs)
  return _chunked(conv, dn.lhs_spec[0], dn.out_spec[0], batch, chunk)(lhs, rhs)


def _chunked(conv, lhs_batch_dim, out_batch_dim, batch, chunk):
  """conv(x, w) whose filter gradient is the float32 sum of the filter gradients of `chunk`-image slices."""

  @jax.custom_vjp
  def chunked_conv(x, w):
    return conv(x, w)

  def forward(x, w):
    return conv(x, w), (x, w)

  def backward(residuals, g):
    x, w = residuals
    dx = jax.vjp(lambda x_: conv(x_, w), x)[1](g)[0]
    dw = jnp.zeros(w.shape, jnp.float32)
    for start in range(0, batch, chunk):
      stop = min(start + chunk, batch)
      x_part = lax.slice_in_dim(x, start, stop, axis=lhs_batch_dim)
      g_part = lax.slice_in_dim(g, start, stop, axis=out_batch_dim)
      dw = dw + jax.vjp(lambda w_, x_part=x_part: conv(x_part, w_), w)[1](g_part)[0].astype(jnp.float32)
    return dx, dw.astype(w.dtype)

  chunked_conv.defvjp(forward, backward)
  return chunked_conv
