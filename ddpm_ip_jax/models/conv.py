"""The UNet's convolution: `lax.conv_general_dilated`, with its gradients written as channels-last convolutions on
a CPU.

Two measured faults of XLA:CPU's own convolution gradients (docs/performance.md, "Kernel by kernel" and
"Micro-batches"), both fixed by writing the backward pass here (`jax.custom_vjp`):

1. **Gradients inside a loop.** XLA:CPU hands a convolution to its fast kernels (YNNPACK) only in the
   channels-last form [batch, spatial.., features] x [spatial.., in, out]. Autodiff's gradients are convolutions
   in other forms (the kernel reversed and transposed; batch and features swapped for the filter gradient), which
   XLA:CPU rewrites into that form at the top level of a program but not inside a `while` loop (`lax.scan`),
   where they run in its generic loop kernel: a 3x3 layer's forward-and-backward of 4 images at 32x32x64 took
   2.65 s in a scan against 0.10 s outside. Here both gradients are written as channels-last convolutions, with
   explicit transposes (the input gradient: g against the spatially reversed kernel with in and out swapped; the
   filter gradient: x with batch and features swapped against g as the kernel), so they are fast in a loop too:
   that is what lets the training step run its per-device micro-batches in a `lax.scan` (train_step.py).
2. **Long filter-gradient reductions.** The filter gradient contracts over every batch position; when that
   reduction is long its kernel slows down several times (32x32x64 over 16 images: 34 GFLOP/s, against
   100-104 GFLOP/s summed over chunks of 1-4 images). So the filter gradient is summed over batch chunks whose
   operands fit `FILTER_GRAD_CHUNK_BYTES` (with micro-batches of a few images it is one chunk).

Gradients equal lax's up to float32 summation order. Other backends, grouped or dilated convolutions and layouts
other than channels-last use `lax.conv_general_dilated` unchanged. `conv_general_dilated` has lax's signature, so
that `flax.linen.Conv(conv_general_dilated=...)` takes it.
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


def channels_last(num_spatial):
  """The dimension numbers of [batch, spatial.., features] x [spatial.., in, out] -> [batch, spatial.., out]."""
  n = num_spatial
  return lax.ConvDimensionNumbers(lhs_spec=(0, n + 1) + tuple(range(1, n + 1)),
                                  rhs_spec=(n + 1, n) + tuple(range(n)),
                                  out_spec=(0, n + 1) + tuple(range(1, n + 1)))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
  """`lax.conv_general_dilated` (same arguments, same forward result); on the CPU its gradients are
  channels-last convolutions and the filter gradient is summed over batch chunks (module docstring)."""
  def plain(x, w):
    return lax.conv_general_dilated(x, w, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count,
                                    batch_group_count=batch_group_count, precision=precision,
                                    preferred_element_type=preferred_element_type)

  num_spatial = lhs.ndim - 2
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  dilated = any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
  if (jax.default_backend() != "cpu" or feature_group_count != 1 or batch_group_count != 1 or dilated
      or dn != channels_last(num_spatial) or preferred_element_type is not None):
    return plain(lhs, rhs)
  strides = tuple(window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:-2], strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  out_positions = math.prod(jax.eval_shape(plain, lhs, rhs).shape[1:-1])
  image_bytes = out_positions * (lhs.shape[-1] + rhs.shape[-1]) * jnp.dtype(lhs.dtype).itemsize
  chunk = filter_grad_chunk(lhs.shape[0], image_bytes)
  return _channels_last_conv(strides, pads, precision, chunk)(lhs, rhs)


def _channels_last_conv(strides, pads, precision, chunk):
  """conv(x [B, spatial.., Cin], w [spatial.., Cin, Cout]) with its gradients as channels-last convolutions and
  the filter gradient summed in float32 over `chunk`-image slices."""
  n = len(strides)
  dn = channels_last(n)

  def conv(x, w, window_strides, padding, lhs_dilation=None, rhs_dilation=None):
    return lax.conv_general_dilated(x, w, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dn, precision=precision)

  @jax.custom_vjp
  def channels_last_conv(x, w):
    return conv(x, w, strides, pads)

  def forward(x, w):
    return conv(x, w, strides, pads), (x, w)

  def backward(residuals, g):
    x, w = residuals
    in_size, out_size, kernel = x.shape[1:-1], g.shape[1:-1], w.shape[:n]
    ones = (1,) * n
    # Input gradient: g (dilated by the strides) against the kernel reversed in space, in and out swapped. Its
    # padding makes the output the input's size: k - 1 - lo before, in - (out - 1) * s + lo - 1 after.
    w_t = jnp.swapaxes(lax.rev(w, tuple(range(n))), n, n + 1)
    dx_pads = [(k - 1 - lo, size - (m - 1) * s + lo - 1)
               for k, size, m, s, (lo, _) in zip(kernel, in_size, out_size, strides, pads)]
    dx = conv(g, w_t, ones, dx_pads, lhs_dilation=strides)
    # Filter gradient: dw[k.., ci, co] = sum over b and the outputs o of x_padded[b, o * s + k, ci] g[b, o, co],
    # the convolution of x as [ci, spatial.., b] with g as the kernel [out.., b, co] dilated by the strides:
    # output [ci, k.., co]. The padding after is what makes the output the kernel's size.
    dw_pads = [(lo, k + (m - 1) * s - size - lo)
               for k, size, m, s, (lo, _) in zip(kernel, in_size, out_size, strides, pads)]
    x_t = jnp.moveaxis(x, (0, n + 1), (n + 1, 0))         # [Cin, spatial.., B]
    g_t = jnp.moveaxis(g, 0, n)                             # [out.., B, Cout]
    batch = x.shape[0]
    dw_t = jnp.zeros((x.shape[-1],) + kernel + (w.shape[-1],), jnp.float32)
    for start in range(0, batch, chunk):
      stop = min(start + chunk, batch)
      part = conv(lax.slice_in_dim(x_t, start, stop, axis=n + 1), lax.slice_in_dim(g_t, start, stop, axis=n),
                  ones, dw_pads, rhs_dilation=strides)
      dw_t = dw_t + part.astype(jnp.float32)
    dw = jnp.moveaxis(dw_t, 0, n)                           # [k.., Cin, Cout]
    return dx.astype(x.dtype), dw.astype(w.dtype)

  channels_last_conv.defvjp(forward, backward)
  return channels_last_conv
