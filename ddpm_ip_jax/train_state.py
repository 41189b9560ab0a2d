"""The train state of DDPM-IP: parameters, AdamW state, the EMA copies and the timestep sampler's history.

No random state: every random number of a step comes from (seed, step, device), so a resumed run draws what an
uninterrupted one draws (`objective.step_key`). `TrainState.apply_gradients` is the optimizer step and the EMA
update, as flax's `TrainState` and VDM's do it.
"""
from typing import Any

import flax
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
import optax

from ddpm_ip_jax import models
from ddpm_ip_jax import timestep_sampler

AXIS = "batch"  # the pmap axis of the training step


def ema_key(rate):
  """The key of an EMA rate in TrainState.ema_params (and in the checkpoints), e.g. 0.9999 -> "0.9999".

  float(ema_key(r)) == r: the key gives the rate back exactly (shortest round-trip repr)."""
  return str(float(rate))


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs; `tx` is static (not checkpointed)."""
  step: jax.Array          # int32 scalar: optimizer steps taken so far
  params: Any
  opt_state: Any           # the optimizer's state over the params as one flat vector (see apply_gradients)
  ema_params: dict         # ema_key(rate) -> params, one per config.training.ema_rates
  sampler_state: Any       # timestep_sampler.SamplerState
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  def apply_gradients(self, grads, **changes):
    """One AdamW step on `grads` (a params-shaped tree or, flattened as `jax.flatten_util.ravel_pytree` orders
    it, one vector), then every EMA moves towards the new params: ema <- r ema + (1 - r) params (the reference
    updates its EMA after each optimizer step it takes).

    The optimizer runs on one flat vector (the moments are flat): the same numbers as leaf by leaf (every
    operation is elementwise), but a few fused loops instead of several per parameter array, which is what XLA
    spends most of the step's compile time on otherwise (docs/performance.md). Its updates are then added leaf
    by leaf, and the EMA moves leaf by leaf, so that no flat copy of the params or of the EMA is made (two
    parameter-sized buffers per device; the flat params are read only by a weight decay other than 0)."""
    flat_params, unravel = ravel_pytree(self.params)
    flat_grads = grads if isinstance(grads, jax.Array) and grads.ndim == 1 else ravel_pytree(grads)[0]
    updates, opt_state = self.tx.update(flat_grads, self.opt_state, flat_params)
    params = optax.apply_updates(self.params, unravel(updates))
    ema_params = {key: jax.tree.map(lambda e, p, r=float(key): r * e + (1.0 - r) * p, ema, params)
                  for key, ema in self.ema_params.items()}
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state,
                        ema_params=ema_params, **changes)


def make_optimizer(*, learning_rate, b1, b2, eps, weight_decay, warmup_steps=0, grad_clip=0.0):
  """AdamW (docs/method.md section 2: lr 1e-4, betas (0.9, 0.999), eps 1e-8, no decay), with an optional
  linear warm-up from 0 over `warmup_steps` and optional clipping of the global gradient norm."""
  lr = learning_rate
  if warmup_steps > 0:
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)],
        boundaries=[warmup_steps])
  adamw = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  if grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)
  return adamw


def create_optimizer(training_config):
  """`make_optimizer` with the settings of `config.training`."""
  tr = training_config
  return make_optimizer(learning_rate=tr.learning_rate, b1=tr.adam_b1, b2=tr.adam_b2, eps=tr.adam_eps,
                        weight_decay=tr.weight_decay, warmup_steps=tr.warmup_steps, grad_clip=tr.grad_clip)


def make_train_state(rng, model, tx, *, ema_rates, schedule_sampler, num_timesteps):
  """A fresh state: `models.init_params` of `model`, EMA copies equal to them (the reference starts its EMA
  from the initial parameters), and an empty sampler history."""
  params = models.init_params(model, rng)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      # The optimizer's state is flat (apply_gradients); AdamW's init reads only the vector's shape, so a zero
      # vector of the parameter count stands in for the flattened params (ravel_pytree compiles a reshape per
      # parameter shape and a concatenation of ~330 arrays: 0.3-0.5 s of a start).
      opt_state=tx.init(jnp.zeros((models.count_params(params),), jnp.float32)),
      ema_params={ema_key(r): params for r in ema_rates},
      sampler_state=timestep_sampler.init_sampler_state(schedule_sampler, num_timesteps),
      tx=tx,
  )


def _identity_of_second(_, tree):
  return tree


# The state broadcast (in_axes None) to every local device by one program. The first argument is a dummy
# [num_local_devices] range: pmap needs one mapped input to know its size.
_broadcast_to_devices = jax.pmap(_identity_of_second, in_axes=(0, None), axis_name=AXIS)


def replicate_state(state):
  """The state copied to every local device, laid out exactly as the pmapped step returns it (the same device
  mesh: otherwise the step's second call would compile the whole step again).

  One pmapped program with the state broadcast to the devices, not `jax_utils.replicate` (a copy per array and
  device, then a second pass to get the step's mesh): for the ~1,000 arrays of the 64-channel CIFAR-10 state
  3.7 s (plus 0.5-0.7 s) against 0.8 s with the program in the compilation cache.
  """
  return _broadcast_to_devices(np.arange(jax.local_device_count()), state)


def device_sharding():
  """How the pmapped step's arguments lie: dimension 0 split over the local devices (mesh axis `AXIS`), as
  `replicate_state` returns the state and `input_pipeline.prefetch_to_device` puts the batches."""
  return NamedSharding(Mesh(np.array(jax.local_devices()), (AXIS,)), PartitionSpec(AXIS))


def abstract_on_devices(tree, leading=None):
  """ShapeDtypeStructs of `tree`'s arrays with a leading device axis (or the given `leading` dimensions ahead of
  it, e.g. (devices, steps per call)) and `device_sharding()`: what the step is compiled for before the state and
  the batches exist (`host_memory.BackgroundCompile`). The same shapes, dtypes, weak types and sharding as the
  real arguments, so their first call finds the compiled step (not tracing or compiling it again)."""
  leading = (jax.local_device_count(),) if leading is None else tuple(leading)
  sharding = device_sharding()
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(leading + tuple(a.shape), a.dtype, sharding=sharding,
                                                     weak_type=bool(getattr(a, "weak_type", False))), tree)
