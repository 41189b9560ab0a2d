"""GroupNorm with its gradient written out, as per-channel sums over the positions, then per-group sums.

The reference's GroupNorm32 (32 groups, eps 1e-5, in float32): y = (x - mean) / sqrt(var + eps) * scale + bias,
the mean and the biased variance (the mean of squared deviations, two passes) over each example's positions and
the C / 32 channels of a group. flax's GroupNorm reduces a [B, positions, G, C/G] view and lets autodiff derive the
backward pass; XLA:CPU runs that 7x slower than PyTorch's kernel (0.63 against 0.08 s of the 64-channel step at
batch 32; docs/performance.md). Here every reduction runs over the positions with the channels contiguous
([B, C] sums, then [B, G]), forward and backward, the backward pass from the closed form
  dx = (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)) / sqrt(var + eps),   dxhat = dy * scale,
mean_g the same group mean. The same numbers as flax's up to float32 summation order (relative 1e-6); inside the
UNet the training step's forward and backward are 1.06x faster and the forward pass 1.14x.
"""
import functools
import math
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

NUM_GROUPS = 32
EPSILON = 1e-5


def _group_mean(values, num_groups):
  """[B, ..., C] -> [B, 1, .., 1, C]: for each channel, the mean of `values` over its group's positions and
  channels."""
  b, c = values.shape[0], values.shape[-1]
  per_group = c // num_groups
  count = math.prod(values.shape[1:-1]) * per_group
  sums = jnp.sum(values, axis=tuple(range(1, values.ndim - 1)))                # [B, C]
  means = sums.reshape(b, num_groups, per_group).sum(axis=-1) / count          # [B, G]
  return jnp.repeat(means, per_group, axis=1).reshape((b,) + (1,) * (values.ndim - 2) + (c,))


def _statistics(x, num_groups, epsilon):
  mean = _group_mean(x, num_groups)
  deviation = x - mean
  return mean, lax.rsqrt(_group_mean(deviation * deviation, num_groups) + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x, scale, bias, num_groups=NUM_GROUPS, epsilon=EPSILON):
  """GroupNorm of x [B, ..., C] (channels last) with per-channel scale and bias [C] (module docstring)."""
  return _forward(x, scale, bias, num_groups, epsilon)[0]


def _forward(x, scale, bias, num_groups, epsilon):
  mean, inv_std = _statistics(x, num_groups, epsilon)
  return (x - mean) * (inv_std * scale) + bias, (x, mean, inv_std, scale)


def _backward(num_groups, epsilon, residuals, dy):
  del epsilon  # in inv_std
  x, mean, inv_std, scale = residuals
  xhat = (x - mean) * inv_std
  batch_and_positions = tuple(range(x.ndim - 1))
  dxhat = dy * scale
  dx = inv_std * (dxhat - _group_mean(dxhat, num_groups) - xhat * _group_mean(dxhat * xhat, num_groups))
  return dx, jnp.sum(dy * xhat, axis=batch_and_positions), jnp.sum(dy, axis=batch_and_positions)


group_norm.defvjp(_forward, _backward)


class GroupNorm(nn.Module):
  """`group_norm` with float32 params `scale` and `bias` [C] (flax's names; PyTorch's weight and bias)."""
  num_groups: int = NUM_GROUPS
  epsilon: float = EPSILON
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", self.scale_init, (x.shape[-1],), jnp.float32)
    bias = self.param("bias", self.bias_init, (x.shape[-1],), jnp.float32)
    return group_norm(x, scale, bias, self.num_groups, self.epsilon)
