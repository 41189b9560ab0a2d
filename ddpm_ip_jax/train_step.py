"""The pmapped DDPM-IP training step: one optimizer step (`train_step`) and k steps in one device call
(`train_steps`), both built by a factory that binds the static settings (structure of flax `examples/imagenet`).

The step does not know the loss formula or how the noise is drawn: `objective` does. It averages the gradients
over the devices of axis "batch", applies them with `TrainState.apply_gradients` (AdamW and the EMA), and feeds
every device's timesteps and losses to the loss-second-moment sampler.
"""
import dataclasses
from typing import Any

import jax
from jax import lax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

from ddpm_ip_jax import diffusion as diffusion_lib
from ddpm_ip_jax import models
from ddpm_ip_jax import objective
from ddpm_ip_jax import timestep_sampler
from ddpm_ip_jax import train_state as train_state_lib
from ddpm_ip_jax.train_state import AXIS


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradient norm became NaN/Inf; the message says where and what to change."""


@dataclasses.dataclass(frozen=True, eq=False)
class StepSettings:
  """The static settings of the training step."""
  model: Any                                    # the Flax UNet
  diff: diffusion_lib.Diffusion                 # the training diffusion (not respaced)
  perturbation: objective.InputPerturbation = objective.InputPerturbation()
  class_cond: bool = False
  skip_nonfinite: bool = False                  # skip (True) or report (False) a NaN/Inf update
  microbatch: int = 0                           # images per forward/backward pass; 0: the per-device batch
  axis_name: str = AXIS

  @classmethod
  def from_config(cls, config, model, diff):
    per_device = config.training.batch_size // jax.device_count()  # the global batch over every host's devices
    return cls(model=model, diff=diff, perturbation=objective.InputPerturbation.from_config(config.diffusion),
               class_cond=config.model.num_classes > 0,
               skip_nonfinite=bool(config.training.skip_nonfinite_updates),
               microbatch=resolve_microbatch(config, per_device))


# The automatic micro-batch on a CPU: at least CPU_MICROBATCH_IMAGES images, more while their first-level
# activations (image_size^2 x model_channels x itemsize each) fit CPU_MICROBATCH_BYTES. Measured on the CIFAR-10
# UNet, global batch 32 on 2 CPU devices, in process pairs (docs/performance.md, "Micro-batches"): at 64 channels
# micro-batches of 4 images 3.25 s per step, of 2 3.33 s (peak 2.08 against 2.31 GB), the whole 16 3.6-3.8 s
# (4.1 GB); at 128 channels (the paper's width) of 4 11.1 s, of 1 14.5 s, the whole 16 12.1 s. Small images go
# in larger micro-batches (the digits at 16x16x32: 16 images, the run 358 s against 403 s whole).
CPU_MICROBATCH_IMAGES = 4
CPU_MICROBATCH_BYTES = 512 * 1024


def resolve_microbatch(config, per_device_batch, backend=None):
  """Images per forward/backward pass for `config.training.microbatch` (0 automatic, -1 the whole per-device
  batch, n > 0 itself): automatic is, on a CPU, the largest divisor of the per-device batch up to
  max(`CPU_MICROBATCH_IMAGES`, the images within `CPU_MICROBATCH_BYTES`), and elsewhere the whole per-device
  batch."""
  requested = int(config.training.microbatch)
  if requested > 0:
    return requested
  if requested < 0 or (backend or jax.default_backend()) != "cpu":
    return per_device_batch
  m = config.model
  image_bytes = m.image_size * m.image_size * m.model_channels * jnp.dtype(m.dtype).itemsize
  fits = max(CPU_MICROBATCH_IMAGES, CPU_MICROBATCH_BYTES // image_bytes)
  return max(d for d in range(1, per_device_batch + 1) if per_device_batch % d == 0 and d <= fits)


def flat_collectives(axis_name):
  """Whether the step sums everything as one flat vector: on the CPU backend over more than one device, where
  every collective is a blocking rendezvous of the device threads; elsewhere the compiler combines and overlaps
  per-leaf all-reduces itself (docs/performance.md)."""
  return jax.default_backend() == "cpu" and lax.axis_size(axis_name) > 1


def psum_tree(tree, axis_name, flat=None):
  """lax.psum of every leaf of `tree`, or of all of them as one flat float32 vector (one all-reduce; flat=None:
  `flat_collectives`). The same numbers either way (int leaves round-trip through float32 exactly below 2**24)."""
  if flat is None:
    flat = flat_collectives(axis_name)
  if not flat:
    return lax.psum(tree, axis_name)
  vector, unravel = ravel_pytree(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree))
  summed = unravel(lax.psum(vector, axis_name))
  return jax.tree.map(lambda x, like: x.astype(jnp.asarray(like).dtype), summed, tree)


def own_slot(x, axis_name):
  """x [b, ...] in this device's row of zeros [n_devices, b, ...]: psum of it is all_gather(x) (any
  dtype, exact: the other rows add zeros), so a gather can ride in the same all-reduce as the gradients."""
  n = lax.axis_size(axis_name)
  return jnp.zeros((n,) + x.shape, x.dtype).at[lax.axis_index(axis_name)].set(x)


def make_train_step(settings):
  """train_step(state, batch, noise) -> (state, metrics): one optimizer step from given noise, inside pmap.

  batch: {"image": float32 [b, H, W, C] in [-1, 1], "label": int32 [b]}; noise: `objective.StepNoise`. The
  metrics are sums over all devices' examples (so the host can average over steps); metrics["nonfinite"] is 1
  where the global loss or gradient norm is NaN/Inf (the same on every device and host). With
  `settings.skip_nonfinite` such a step keeps the previous params, optimizer state, EMA and sampler history
  (only the step counter moves on) and leaves its losses out of the metrics.
  """
  s = settings
  axis = s.axis_name

  def loss_fn(params, x0, y, noise, share):
    """The weighted loss of the examples x0 (`share` of the device's batch) and their per-example losses."""
    def model_fn(x_t, t):
      return s.model.apply({"params": params}, x_t, t, y=y, train=True, rngs={"dropout": noise.dropout_rng})
    loss, losses = objective.weighted_loss(s.diff, model_fn, x0, noise)
    return loss * share, losses

  def device_gradients(params, x0, y, noise):
    """(loss, per-example losses [b], gradients) of the device's batch. With micro-batches (s.microbatch < b)
    a lax.scan sums the gradients of each micro-batch's share of the batch's mean loss: the same gradient as
    the whole batch's (up to float32 summation order), with the activations of one micro-batch alive at a time.
    Micro-batch i draws its dropout masks from the i-th split of the step's dropout key."""
    b = x0.shape[0]
    m = s.microbatch if 0 < s.microbatch < b else b
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if m == b:
      (loss, losses), grads = grad_fn(params, x0, y, noise, 1.0)
      return loss, losses, grads
    k = b // m
    split = lambda a: a.reshape((k, m) + a.shape[1:])
    micro = (split(x0), None if y is None else split(y),
             noise.replace(t=split(noise.t), weights=split(noise.weights), eps=split(noise.eps),
                           xi=split(noise.xi), gamma=split(noise.gamma),
                           dropout_rng=jax.random.split(noise.dropout_rng, k)))

    def accumulate(grad_sum, one):
      (loss, losses), grads = grad_fn(params, *one, m / b)
      return jax.tree.map(jnp.add, grad_sum, grads), (loss, losses)

    grads, (loss, losses) = lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), micro)
    return jnp.sum(loss), jax.tree.map(lambda v: v.reshape(b), losses), grads

  def train_step(state, batch, noise):
    y = batch["label"] if s.class_cond else None
    loss, losses, grads = device_gradients(state.params, batch["image"], y, noise)
    # What the devices exchange, in two all-reduces: the gradients (one flat vector where the collective is flat
    # anyway; the optimizer takes them flat, TrainState.apply_gradients), and in a second one (psum_tree) the
    # loss (the mean of both is the sum / n, as lax.pmean computes it), the logging sums, and every device's
    # timesteps and unweighted losses for the loss-second-moment history (gathered through own_slot). The
    # gradients apart, their sum is what the optimizer reads: no parameter-sized slice of a longer vector is
    # copied out and kept alive while the metrics are read from it (docs/performance.md).
    flat = flat_collectives(axis)
    grad_sum = lax.psum(ravel_pytree(grads)[0] if flat else grads, axis)
    if not flat:
      grad_sum = ravel_pytree(grad_sum)[0]
    totals = psum_tree({"loss": loss, "metrics": objective.loss_sums(losses, noise, s.diff.num_timesteps),
                        "t": own_slot(noise.t, axis),
                        "losses": own_slot(lax.stop_gradient(losses["loss"]), axis)}, axis, flat=flat)
    n_devices = lax.axis_size(axis)
    grad_norm = jnp.sqrt(jnp.sum(jnp.square(grad_sum / n_devices)))
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(totals["loss"])
    sampler_state = timestep_sampler.update_sampler_state(
        state.sampler_state, totals["t"].reshape(-1), totals["losses"].reshape(-1))
    # The optimizer step runs in a conditional on a predicate XLA cannot evaluate ahead (the step counter is
    # never negative). Without it XLA:CPU copied both Adam moments (the update reads the old ones while the new
    # ones overwrite them in place) before the backward pass, and kept the copies alive through all of the
    # micro-batches' activations: two parameter-sized buffers per device (docs/performance.md).
    new_state = lax.cond(state.step >= 0,
                         lambda st, g: st.apply_gradients(g / n_devices, sampler_state=sampler_state),
                         lambda st, g: st.replace(step=st.step + 1, sampler_state=sampler_state),
                         state, grad_sum)
    if s.skip_nonfinite:
      kept = ("params", "opt_state", "ema_params", "sampler_state")
      new_state = new_state.replace(**{
          name: jax.tree.map(lambda new, old: jnp.where(finite, new, old), getattr(new_state, name),
                             getattr(state, name)) for name in kept})

    metrics = dict(totals["metrics"], steps=jnp.float32(1.0), grad_norm=grad_norm)
    if s.skip_nonfinite:  # a skipped step counts in no average
      metrics = {k: jnp.where(finite, v, 0.0) for k, v in metrics.items()}
    # Global and identical on every device: every host stops (or skips) at the same step.
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    metrics["first_nonfinite_step"] = jnp.where(finite, jnp.iinfo(jnp.int32).max, state.step + 1)
    return new_state, metrics

  return train_step


def make_train_steps(settings, train_rng):
  """train_steps(state, batch) -> (state, metric sums): k optimizer steps in one device call, inside pmap.

  batch: {"image": [k, b, H, W, C], "label": [k, b]}. Each step draws its noise from
  `objective.step_key(train_rng, state.step, device index)`, so k steps per call equal k calls of one step.
  k > 1 runs a lax.scan (less dispatch overhead); k = 1 calls the step directly. On XLA:CPU k = 2 runs at k = 1's
  speed since the convolution gradients are channels-last (models/conv.py; before, the UNet inside a scan ran many
  times slower there). The metrics are summed over the k steps.
  """
  train_step = make_train_step(settings)
  s = settings

  def one_step(state, step_batch):
    key = objective.step_key(train_rng, state.step, lax.axis_index(s.axis_name))
    noise = objective.draw_step_noise(key, state.sampler_state, step_batch["image"].shape, s.perturbation,
                                      s.diff.num_timesteps)
    return train_step(state, step_batch, noise)

  def train_steps(state, batch):
    if batch["image"].shape[0] == 1:
      return one_step(state, jax.tree.map(lambda x: x[0], batch))
    state, metrics = lax.scan(one_step, state, batch)
    return state, {k: jnp.min(m, axis=0) if k == "first_nonfinite_step" else jnp.sum(m, axis=0)
                   for k, m in metrics.items()}

  return train_steps


def make_p_train_steps(settings, train_rng):
  """`make_train_steps` pmapped over the local devices (the state buffers are donated)."""
  return jax.pmap(make_train_steps(settings, train_rng), axis_name=settings.axis_name, donate_argnums=(0,))


@dataclasses.dataclass(frozen=True, eq=False)
class Training:
  """Everything a training run builds from its config (`create_training`)."""
  model: Any                      # the Flax UNet
  diffusion: diffusion_lib.Diffusion  # the training diffusion (not respaced)
  tx: Any                         # the optax optimizer
  state: train_state_lib.TrainState  # fresh and unreplicated (restore a checkpoint into it, then replicate)
  p_train_steps: Any              # make_p_train_steps of the config's settings
  train_rng: jax.Array            # the step's noise root key (objective.step_key)
  sample_rng: jax.Array           # the training loop's sample grids


def create_training(config):
  """The model, diffusion, optimizer, fresh state and pmapped step of `config`: the one way the training loop,
  the benchmark and the tests build a training. The keys are split from `config.seed` as (init, train, sample)."""
  tcfg = config.training
  model = models.create_model(config)
  diffusion = diffusion_lib.create_diffusion(config.diffusion, learn_sigma=config.model.learn_sigma)
  tx = train_state_lib.create_optimizer(tcfg)
  init_rng, train_rng, sample_rng = jax.random.split(jax.random.key(config.seed), 3)
  state = train_state_lib.make_train_state(init_rng, model, tx, ema_rates=tcfg.ema_rates,
                                           schedule_sampler=tcfg.schedule_sampler,
                                           num_timesteps=diffusion.num_timesteps)
  p_train_steps = make_p_train_steps(StepSettings.from_config(config, model, diffusion), train_rng)
  return Training(model=model, diffusion=diffusion, tx=tx, state=state, p_train_steps=p_train_steps,
                  train_rng=train_rng, sample_rng=sample_rng)


def abstract_step_args(config, state, steps_per_call):
  """(state, batch) of a call of the pmapped step with `steps_per_call` steps, abstract (shapes, dtypes and
  shardings: `train_state.abstract_on_devices`) for compiling the step before they exist; `state` unreplicated
  (arrays or ShapeDtypeStructs)."""
  per_device = config.training.batch_size // jax.device_count()
  size, channels = config.model.image_size, config.model.in_channels
  example = {"image": jax.ShapeDtypeStruct((per_device, size, size, channels), jnp.float32),
             "label": jax.ShapeDtypeStruct((per_device,), jnp.int32)}
  return (train_state_lib.abstract_on_devices(state),
          train_state_lib.abstract_on_devices(example, (jax.local_device_count(), steps_per_call)))


def summarize_metrics(metric_sums):
  """Averages of the summed metrics: loss/mse/vb per example, per quarter `<name>/q0..q3`
  (NaN-free: quarters with no example are left out), the mean gradient norm per step and, where
  non-finite updates were skipped, their number `skipped_steps` (averages over the other steps)."""
  sums = jax.tree.map(lambda *xs: float(np.sum(xs)), *metric_sums)
  if sums.get("steps", 0.0) == 0.0:  # every step of the interval skipped
    return {"skipped_steps": sums.get("nonfinite", 0.0)}
  out = {"grad_norm": sums["grad_norm"] / sums["steps"]}
  if sums.get("nonfinite", 0.0) > 0:
    out["skipped_steps"] = sums["nonfinite"]
  for name, value in sums.items():
    if name in ("count", "steps", "grad_norm", "nonfinite", "first_nonfinite_step") or name.startswith("count_q"):
      continue
    if name[-3:-1] == "_q":
      count = sums[f"count_{name[-2:]}"]
      if count > 0:
        out[f"{name[:-3]}/q{name[-1]}"] = value / count
    else:
      out[name] = value / sums["count"]
  return out
