"""The loss-second-moment sampler against a direct sequential port of the reference's semantics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_ip_jax import timestep_sampler as ts


class SequentialResampler:
  """The reference's LossSecondMomentResampler, written plainly: one loss at a time, in order."""

  def __init__(self, T, history=10, uniform_prob=0.001):
    self.history = np.zeros((T, history))
    self.counts = np.zeros(T, int)
    self.n, self.uniform_prob = history, uniform_prob

  def update(self, t, losses):
    for step, loss in zip(t, losses):
      if self.counts[step] == self.n:
        self.history[step, :-1] = self.history[step, 1:]
        self.history[step, -1] = loss
      else:
        self.history[step, self.counts[step]] = loss
        self.counts[step] += 1

  def probs(self):
    T = len(self.counts)
    if not (self.counts == self.n).all():
      return np.full(T, 1.0 / T)
    w = np.sqrt(np.mean(self.history ** 2, axis=-1))
    w = w / w.sum() * (1 - self.uniform_prob) + self.uniform_prob / T
    return w / w.sum()


def test_updates_match_sequential_reference_with_repeats_and_shifts():
  T = 7
  rng = np.random.default_rng(0)
  ref = SequentialResampler(T)
  state = ts.init_sampler_state("loss-second-moment", T)
  update = jax.jit(ts.update_sampler_state)
  for _ in range(12):
    # Batches with many repeated steps (24 draws over 7 steps), so shifting out the oldest is exercised.
    t = rng.integers(0, T, size=24)
    losses = rng.random(24).astype(np.float32) * 3
    ref.update(t, losses)
    state = update(state, jnp.asarray(t), jnp.asarray(losses))
    np.testing.assert_array_equal(np.asarray(state.counts), ref.counts)
    np.testing.assert_allclose(np.asarray(state.history), ref.history, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ts.timestep_probs(state)), ref.probs(), rtol=1e-5)
  assert ref.counts.min() == 10  # warmed up: the importance distribution is in use


def test_uniform_until_warm_and_weights_are_inverse_probabilities():
  T = 5
  state = ts.init_sampler_state("loss-second-moment", T)
  state = ts.update_sampler_state(state, jnp.arange(T).repeat(9), jnp.ones(9 * T))
  np.testing.assert_allclose(np.asarray(ts.timestep_probs(state)), 0.2)  # 9 < 10 losses each: still uniform
  # Step 4 has 100x larger losses: once warm it is drawn far more often.
  losses = jnp.where(jnp.arange(T) == 4, 100.0, 1.0)
  state = ts.update_sampler_state(state, jnp.arange(T), losses)
  p = np.asarray(ts.timestep_probs(state))
  rms4 = np.sqrt((9 * 1.0 + 100.0 ** 2) / 10)  # its history: nine 1s, then 100
  expected4 = (rms4 / (rms4 + 4)) * 0.999 + 0.001 / T
  np.testing.assert_allclose(p[4], expected4, rtol=1e-5)
  t, w = ts.sample_timesteps(state, jax.random.key(0), 4000)
  np.testing.assert_allclose(np.asarray(w), 1.0 / (T * p[np.asarray(t)]), rtol=1e-6)
  assert abs(np.mean(np.asarray(t) == 4) - expected4) < 0.03


def test_uniform_sampler():
  state = ts.init_sampler_state("uniform", 10)
  t, w = ts.sample_timesteps(state, jax.random.key(0), 1000)
  assert t.dtype == jnp.int32 and 0 <= int(t.min()) and int(t.max()) <= 9
  assert len(np.unique(np.asarray(t))) == 10
  np.testing.assert_array_equal(np.asarray(w), 1.0)
  assert ts.update_sampler_state(state, t, jnp.ones(1000)) is state
  with pytest.raises(ValueError, match="unknown timestep sampler"):
    ts.init_sampler_state("importance", 10)
