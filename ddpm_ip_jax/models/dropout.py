"""Dropout whose mask is drawn once, in a loop of vectorised Threefry blocks: the same masks as flax's.

flax's `nn.Dropout` draws its mask with `jax.random.bernoulli`, whose Threefry-2x32 hash JAX lowers on the CPU as
a `fori_loop` over the 20 rounds, each a pass over the whole mask's two words: 29-31 ms for one 16x32x32x128 mask
on one core, 10% of the 64-channel training step. The same hash with its rounds unrolled takes 3.2 ms, but inside
the UNet XLA:CPU fuses it into the mask's consumers (forward and backward), recomputing it there unvectorised,
and the step got slower (docs/performance.md). Here the unrolled hash fills the mask chunk by chunk in a
`lax.map` (a loop whose body is one vectorised fusion), so it is computed once and materialised.

The bits are Threefry-2x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011: 20 rounds,
rotations 13 15 26 6 / 17 29 16 24, a key injection every 4 rounds) of the element's flat index as a 64-bit
counter (high word 0), the two output words xor'ed, as JAX's partitionable Threefry draws them; the keep test is
`jax.random.uniform`'s (23 bits as a float in [0, 1)) against keep_prob, so `keep_mask(key, p, shape)` equals
`jax.random.bernoulli(key, p, shape)` bit for bit (tests/test_dropout.py) and the model's numbers do not change.
On GPUs and TPUs (where JAX unrolls the hash already), with another key implementation, or with
`jax_threefry_partitionable` off, it is `jax.random.bernoulli` itself.
"""
import functools
import math

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# Elements per loop iteration: a quarter of a MiB of mask bits per pass, each iteration ~0.1 ms of hashing, so the
# loop's own cost (microseconds per iteration) does not count.
CHUNK = 1 << 16
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x, r):
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(k0, k1, x0, x1):
  """Threefry-2x32 with 20 rounds, unrolled: uint32 key words k0, k1 (scalars), counter words x0, x1 (arrays of
  one shape) -> the two output words."""
  ks = (k0, k1, k0 ^ k1 ^ _KEY_PARITY)
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, r) ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def _keep(key_words, index, keep_prob):
  """bool[...]: whether the elements at flat `index` (uint32) are kept, as `jax.random.bernoulli` decides it."""
  b0, b1 = threefry2x32(key_words[0], key_words[1], jnp.zeros_like(index), index)
  bits = b0 ^ b1
  # jax.random.uniform: 23 random mantissa bits under the exponent of 1.0, minus 1.0.
  uniform = lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32) - 1.0
  return uniform < keep_prob


def _threefry_words(key):
  """The two uint32 words of a Threefry key (raw uint32[2] or typed), or None for another implementation or when
  JAX draws its bits in the non-partitionable way."""
  if not jax.config.jax_threefry_partitionable:
    return None
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if str(jax.random.key_impl(key)) != "threefry2x32":
      return None
    return jax.random.key_data(key)
  if key.shape != (2,) or key.dtype != jnp.uint32 or jax.config.jax_default_prng_impl != "threefry2x32":
    return None
  return key


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def keep_mask(key, keep_prob, shape, chunk=CHUNK):
  """bool[shape]: `jax.random.bernoulli(key, keep_prob, shape)`, for a Threefry key, drawn in chunks of `chunk`
  elements by a loop (see the module's docstring). Jitted so that each mask shape is traced once, not once per
  layer (the unrolled hash is ~150 operations)."""
  words = _threefry_words(key)
  n = math.prod(shape)
  # GPUs and TPUs get JAX's own unrolled hash, and a loop of small blocks would only serialise them.
  if words is None or n >= 2 ** 32 or jax.default_backend() != "cpu":
    return jax.random.bernoulli(key, keep_prob, shape)
  keep_prob = jnp.float32(keep_prob)
  if n <= chunk:
    return _keep(words, lax.iota(jnp.uint32, n), keep_prob).reshape(shape)
  rows = -(-n // chunk)
  offsets = jnp.arange(rows, dtype=jnp.uint32) * np.uint32(chunk)
  lanes = lax.iota(jnp.uint32, chunk)
  mask = lax.map(lambda offset: _keep(words, offset + lanes, keep_prob), offsets)  # [rows, chunk]
  mask = mask.reshape(-1)
  return (mask if rows * chunk == n else mask[:n]).reshape(shape)


class Dropout(nn.Module):
  """`nn.Dropout` (no broadcast dimensions) with the mask of `keep_mask`: the same rng stream ("dropout", drawn
  in this module's scope, auto-named `Dropout_0` like flax's), so the same numbers."""
  rate: float
  deterministic: bool

  @nn.compact
  def __call__(self, x):
    if self.deterministic or self.rate == 0.0:
      return x
    keep_prob = 1.0 - self.rate
    mask = keep_mask(self.make_rng("dropout"), keep_prob, tuple(x.shape))
    return lax.select(mask, x / keep_prob, jnp.zeros_like(x))
