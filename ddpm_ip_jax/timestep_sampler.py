"""Timestep samplers for training: uniform, and ADM's "loss-second-moment" importance sampler, as functional state.

Loss-second-moment (docs/method.md section 4, the reference's `LossSecondMomentResampler`): each step t keeps the
last 10 total losses recorded at t. Until every step has 10, t is drawn uniformly; then
p_t ~ sqrt(mean of the last 10 squared losses at t), mixed with 0.001 of the uniform. Each example's loss is
weighted by 1 / (T p_t) so the expected loss is unchanged. The history is fed the losses of ALL devices, in device
order, exactly as the reference feeds it the all-gathered losses of every rank.
"""
import flax
import jax
import jax.numpy as jnp

SAMPLER_KINDS = ("uniform", "loss-second-moment")
HISTORY_PER_TERM = 10
UNIFORM_PROB = 0.001


@flax.struct.dataclass
class SamplerState:
  """history: [T, 10] float32 recorded losses (oldest first); counts: [T] int32 number recorded (<= 10)."""
  history: jnp.ndarray
  counts: jnp.ndarray
  kind: str = flax.struct.field(pytree_node=False)


def init_sampler_state(kind: str, num_timesteps: int) -> SamplerState:
  if kind not in SAMPLER_KINDS:
    raise ValueError(f"unknown timestep sampler {kind!r}; expected one of {SAMPLER_KINDS}")
  return SamplerState(history=jnp.zeros((num_timesteps, HISTORY_PER_TERM), jnp.float32),
                      counts=jnp.zeros((num_timesteps,), jnp.int32), kind=kind)


def timestep_probs(state: SamplerState) -> jnp.ndarray:
  """p_t [T]: uniform, or the warmed-up loss-second-moment distribution."""
  num_timesteps = state.counts.shape[0]
  uniform = jnp.full((num_timesteps,), 1.0 / num_timesteps, jnp.float32)
  if state.kind == "uniform":
    return uniform
  w = jnp.sqrt(jnp.mean(state.history ** 2, axis=-1))
  w = w / jnp.sum(w) * (1 - UNIFORM_PROB) + UNIFORM_PROB / num_timesteps
  warmed_up = jnp.all(state.counts == HISTORY_PER_TERM)
  return jnp.where(warmed_up, w / jnp.sum(w), uniform)


def sample_timesteps(state: SamplerState, key, batch_size: int):
  """(t [B] int32, weights [B] float32 = 1 / (T p_t)); the training loss is mean(weights * losses)."""
  p = timestep_probs(state)
  t = jax.random.choice(key, p.shape[0], shape=(batch_size,), p=p).astype(jnp.int32)
  return t, 1.0 / (p.shape[0] * p[t])


def update_sampler_state(state: SamplerState, t, losses) -> SamplerState:
  """Records losses [N] at steps t [N], in order, as the reference's sequential loop does.

  Vectorised: a step that receives k new losses keeps the last 10 of (its old history, then the k losses in
  order). Call it with t and losses gathered from all devices.
  """
  if state.kind == "uniform":
    return state
  num_timesteps, hist_len = state.history.shape
  t = t.reshape(-1).astype(jnp.int32)
  losses = losses.reshape(-1).astype(jnp.float32)
  n = t.shape[0]
  # rank[j] = how many earlier entries share t[j]; new[t, r] = the r-th new loss at t.
  same = t[:, None] == t[None, :]
  rank = jnp.sum(jnp.tril(same, k=-1), axis=1)
  new = jnp.zeros((num_timesteps, n), jnp.float32).at[t, rank].set(losses)
  k = jnp.zeros((num_timesteps,), jnp.int32).at[t].add(1)
  c = state.counts
  total = c + k
  # Slot s of the new row holds element e = max(total - 10, 0) + s of the concatenation (old[:c], new[:k]).
  e = jnp.maximum(total - hist_len, 0)[:, None] + jnp.arange(hist_len)[None, :]
  from_old = jnp.take_along_axis(state.history, jnp.clip(e, 0, hist_len - 1), axis=1)
  from_new = jnp.take_along_axis(new, jnp.clip(e - c[:, None], 0, n - 1), axis=1)
  row = jnp.where(e < c[:, None], from_old, from_new)
  row = jnp.where(e < total[:, None], row, 0.0)
  return state.replace(history=row, counts=jnp.minimum(total, hist_len))
