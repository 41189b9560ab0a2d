"""DDPM-IP training: the train state, the pmapped training step and the loop that logs, samples
and checkpoints (structure of flax `examples/imagenet`; per-device randomness as in VDM).

The loop does not know the loss formula: it hands the model to `diffusion.training_losses`, which
builds the perturbed input y_t = sqrt(abar) x0 + sqrt(1 - abar)(eps + gamma xi) and regresses onto eps
(REFERENCE.md section 1). Everything random in a step comes from
fold_in(fold_in(train_key, step), device_index), so a resumed run draws the same numbers as an
uninterrupted one and no random state is checkpointed.
"""
import functools
import os
import signal
import threading
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import flax
from flax import jax_utils
import jax
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from ddpm_ip_jax import checkpointing
from ddpm_ip_jax import config_validation
from ddpm_ip_jax import diffusion as diffusion_lib
from ddpm_ip_jax import image_grid
from ddpm_ip_jax import input_pipeline
from ddpm_ip_jax import models
from ddpm_ip_jax import sampling
from ddpm_ip_jax import timestep_sampler

AXIS = "batch"


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs (no RNG: see the module docstring)."""
  step: jax.Array          # int32 scalar: optimizer steps taken so far
  params: Any
  opt_state: Any
  ema_params: dict         # ema_key(rate) -> params, one per config.training.ema_rates
  sampler_state: Any       # timestep_sampler.SamplerState


@flax.struct.dataclass
class StepNoise:
  """The random numbers of one training step on one device (b = per-device batch)."""
  t: jax.Array             # int32 [b], original steps in [0, T)
  weights: jax.Array       # float32 [b], importance weights of the timestep sampler
  eps: jax.Array           # float32 [b, H, W, C], the regression target
  xi: jax.Array            # float32 [b, H, W, C], DDPM-IP's input perturbation noise
  dropout_rng: jax.Array
  gamma_rng: jax.Array     # for the per-example gamma of the "uniform" perturbation variant


def ema_key(rate):
  """The key of an EMA rate in TrainState.ema_params, e.g. 0.9999 -> "0.9999"."""
  return str(float(rate))


def create_optimizer(*, learning_rate, b1, b2, eps, weight_decay, warmup_steps=0, grad_clip=0.0):
  """AdamW (REFERENCE.md section 2: lr 1e-4, betas (0.9, 0.999), eps 1e-8, no decay), with an optional
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


def optimizer_from_config(training_config):
  t = training_config
  return create_optimizer(learning_rate=t.learning_rate, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                          weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, grad_clip=t.grad_clip)


def create_train_state(rng, model, image_shape, tx, *, ema_rates, schedule_sampler, num_timesteps,
                       class_cond=False):
  """A fresh state: parameters from `model.init` on zeros [1, *image_shape], EMA copies equal to them
  (the reference starts its EMA from the initial parameters), and an empty sampler history."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  y = jnp.zeros((1,), jnp.int32) if class_cond else None
  params = jax.jit(model.init)({"params": rng}, x, t, y)["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params={ema_key(r): params for r in ema_rates},
      sampler_state=timestep_sampler.init_sampler_state(schedule_sampler, num_timesteps),
  )


def draw_step_noise(train_rng, step, device_index, sampler_state, image_shape):
  """The random numbers of `step` on device `device_index`: timesteps from the sampler, eps and xi
  (independent standard normals, REFERENCE.md section 1) and a dropout key.

  image_shape: the per-device batch shape [b, H, W, C]."""
  key = jax.random.fold_in(jax.random.fold_in(train_rng, step), device_index)
  k_t, k_eps, k_xi, k_dropout, k_gamma = jax.random.split(key, 5)
  t, weights = timestep_sampler.sample_timesteps(sampler_state, k_t, image_shape[0])
  return StepNoise(t=t, weights=weights,
                   eps=jax.random.normal(k_eps, image_shape, jnp.float32),
                   xi=jax.random.normal(k_xi, image_shape, jnp.float32),
                   dropout_rng=k_dropout, gamma_rng=k_gamma)


def psum_tree(tree, axis_name, flat=None):
  """lax.psum of every leaf of `tree`; on XLA:CPU as one flat float32 vector (one all-reduce).

  The same numbers either way (int leaves round-trip through float32 exactly below 2**24). flat=None picks the
  flat vector on the CPU backend over more than one device: XLA:CPU runs every collective as a blocking
  rendezvous of the device threads, and one all-reduce of everything the step sums makes the reduced CIFAR-10
  step 10% faster than the per-leaf collectives (docs/performance.md), at the price of ~20 s more
  compilation. GPU and TPU compilers combine and schedule per-leaf all-reduces themselves, overlapping them
  with the backward pass, which a concatenation would prevent."""
  if flat is None:
    flat = jax.default_backend() == "cpu" and lax.axis_size(axis_name) > 1
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


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradient norm became NaN/Inf; the message says where and what to change."""


def apply_step(state, batch, noise, *, model, diff, tx, gamma, ema_rates, class_cond, axis_name=AXIS,
               gamma_kind="constant", gamma_start=0.0, skip_nonfinite=False):
  """One optimizer step from given noise; runs inside pmap over `axis_name`.

  batch: {"image": float32 [b, H, W, C] in [-1, 1], "label": int32 [b]}. Returns the new state and
  metrics summed over all devices' examples (sums and counts, so the host can average over steps).
  metrics["nonfinite"] is 1 where the global loss or gradient norm is NaN/Inf (the same on every
  device and host). With `skip_nonfinite` such a step keeps the previous params, optimizer state, EMA
  and sampler history (only the step counter moves on) and leaves its losses out of the metrics.
  """
  x0 = batch["image"]
  y = batch["label"] if class_cond else None

  # DDPM-IP's gamma per example: the paper's constant, or a variant (diffusion.perturbation_gamma).
  gammas = diffusion_lib.perturbation_gamma(gamma_kind, gamma, noise.t, diff.num_timesteps, key=noise.gamma_rng,
                                            gamma_start=gamma_start)

  def loss_fn(params):
    def model_fn(x_t, t):
      return model.apply({"params": params}, x_t, t, y=y, train=True,
                         rngs={"dropout": noise.dropout_rng})
    losses = diffusion_lib.training_losses(diff, model_fn, x0, noise.t, noise.eps, noise.xi, gammas)
    return jnp.mean(noise.weights * losses["loss"]), losses

  (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)

  # As the reference logs them: each term weighted like the loss, overall and per quarter of [0, T).
  quarter = noise.t * 4 // diff.num_timesteps
  metrics = {"count": jnp.float32(x0.shape[0])}
  for name, value in losses.items():
    weighted = noise.weights * value
    metrics[name] = jnp.sum(weighted)
    for q in range(4):
      metrics[f"{name}_q{q}"] = jnp.sum(jnp.where(quarter == q, weighted, 0.0))
  for q in range(4):
    metrics[f"count_q{q}"] = jnp.sum(quarter == q).astype(jnp.float32)

  # Everything the devices exchange, in one all-reduce (psum_tree): the gradients and loss (their mean is
  # the sum / n, as lax.pmean computes it), the metric sums, and every device's timesteps and unweighted
  # losses for the loss-second-moment history (gathered through own_slot).
  totals = psum_tree({"grads": grads, "loss": loss, "metrics": metrics,
                      "t": own_slot(noise.t, axis_name),
                      "losses": own_slot(lax.stop_gradient(losses["loss"]), axis_name)}, axis_name)
  n_devices = lax.axis_size(axis_name)
  grads = jax.tree.map(lambda g: g / n_devices, totals["grads"])
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(grad_norm) & jnp.isfinite(totals["loss"])
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = {
      ema_key(r): jax.tree.map(lambda e, p, r=r: r * e + (1.0 - r) * p, state.ema_params[ema_key(r)], params)
      for r in ema_rates}
  sampler_state = timestep_sampler.update_sampler_state(
      state.sampler_state, totals["t"].reshape(-1), totals["losses"].reshape(-1))
  if skip_nonfinite:
    params, opt_state, ema_params, sampler_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), (params, opt_state, ema_params, sampler_state),
        (state.params, state.opt_state, state.ema_params, state.sampler_state))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema_params, sampler_state=sampler_state)

  metrics = dict(totals["metrics"], steps=jnp.float32(1.0), grad_norm=grad_norm)
  if skip_nonfinite:  # a skipped step counts in no average
    metrics = {k: jnp.where(finite, v, 0.0) for k, v in metrics.items()}
  # Global and identical on every device: every host stops (or skips) at the same step.
  metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
  metrics["first_nonfinite_step"] = jnp.where(finite, jnp.iinfo(jnp.int32).max, state.step + 1)
  return new_state, metrics


def train_step(state, batch, *, train_rng, axis_name=AXIS, **step_kwargs):
  """k optimizer steps in one device call, k the leading axis of `batch`.

  batch: {"image": [k, b, H, W, C], "label": [k, b]}. Each step draws its noise from
  (train_rng, state.step, device index), so k steps per call equal k calls of one step. k > 1 runs a
  lax.scan, which saves dispatch overhead on accelerators; k = 1 calls the step directly (XLA:CPU runs
  the UNet inside a scan's while loop ~25x slower). Returns the new state and the metrics summed over
  the k steps.
  """
  device_index = lax.axis_index(axis_name)

  def one_step(state, step_batch):
    noise = draw_step_noise(train_rng, state.step, device_index, state.sampler_state,
                            step_batch["image"].shape)
    return apply_step(state, step_batch, noise, axis_name=axis_name, **step_kwargs)

  if batch["image"].shape[0] == 1:
    return one_step(state, jax.tree.map(lambda x: x[0], batch))
  state, metrics = lax.scan(one_step, state, batch)
  return state, {k: jnp.min(m, axis=0) if k == "first_nonfinite_step" else jnp.sum(m, axis=0)
                 for k, m in metrics.items()}


def make_step_kwargs(config, model, diff, tx):
  """The static arguments of `apply_step`/`train_step` taken from the config."""
  return dict(model=model, diff=diff, tx=tx, gamma=float(config.diffusion.input_perturbation),
              gamma_kind=config.diffusion.input_perturbation_kind,
              gamma_start=float(config.diffusion.input_perturbation_start),
              ema_rates=tuple(config.training.ema_rates), class_cond=config.model.num_classes > 0,
              skip_nonfinite=bool(config.training.skip_nonfinite_updates))


def replicate_state(state):
  """The state copied to every local device, laid out exactly as `p_train_step` returns it.

  Through a pmapped identity over the step's axis name: straight from `jax_utils.replicate` the arrays carry
  another device mesh than the step's outputs, and the second call would compile the whole step again.
  """
  return jax.pmap(lambda x: x, axis_name=AXIS)(jax_utils.replicate(state))


def make_p_train_step(train_rng, step_kwargs):
  """train_step pmapped over the local devices (the state buffers are donated)."""
  return jax.pmap(functools.partial(train_step, train_rng=train_rng, **step_kwargs),
                  axis_name=AXIS, donate_argnums=(0,))


def summarize_metrics(metric_sums):
  """Averages of the summed metrics: loss/mse/vb per example, per quarter `<name>_q0..q3`
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


def _chunks(iterator, sizes):
  """Stacks the next `size` batches of `iterator` on a new axis 1 ([devices, size, b, ...]) for each
  size in `sizes`."""
  for size in sizes:
    batches = [next(iterator) for _ in range(size)]
    yield jax.tree.map(lambda *xs: np.stack(xs, axis=1), *batches)


def _crossed(prev_step, step, every):
  """Whether a multiple of `every` lies in (prev_step, step]."""
  return every > 0 and step // every > prev_step // every


def _stop_requests():
  """A function of the device-call index that says whether to checkpoint and stop after that call.

  One process: after a SIGTERM. Several processes: jax's preemption service (on by default with
  jax.distributed) takes SIGTERM as the preemption notice of any one host, tells the others, and all
  agree on the same call, so every host saves the same step and none is left waiting in a collective.
  """
  if jax.process_count() > 1:
    return multihost_utils.reached_preemption_sync_point
  terminate = threading.Event()
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, lambda *_: terminate.set())
  return lambda call_index: terminate.is_set()


def _write_config(config, workdir):
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir`, resuming from its latest checkpoint; writes metrics (TensorBoard
  events), EMA sample grids (TensorBoard and workdir/samples/*.png), checkpoints
  (workdir/checkpoints/<step>) and the config used (workdir/config.json). Returns the final state
  (replicated over the local devices). The SIGTERM handler of the training is removed again on return,
  so a program that trains and then does other work (the study, a notebook) can still be terminated."""
  in_main_thread = threading.current_thread() is threading.main_thread()
  previous_handler = signal.getsignal(signal.SIGTERM) if in_main_thread else None
  try:
    return _train_and_evaluate(config, workdir)
  finally:
    if in_main_thread:
      signal.signal(signal.SIGTERM, previous_handler)


def _train_and_evaluate(config, workdir):
  # Everything that can be wrong with the config or the data fails here, before any compilation.
  config_validation.validate_config(config, num_devices=jax.device_count())
  try:
    input_pipeline.check_dataset(config.data, config.model.image_size)
    data_channels = input_pipeline.num_channels(config.data)
  except ValueError as e:
    raise config_validation.ConfigError(f"config.data: {e}") from e
  if data_channels != config.model.in_channels:
    raise config_validation.ConfigError(
        f"config.model.in_channels={config.model.in_channels} but dataset {config.data.dataset!r} has "
        f"{data_channels} channel(s); set --config.model.in_channels={data_channels}.")

  # SIGTERM (preemption, scancel, the launch/ scripts' stop) ends the run after the next device call
  # with a checkpoint; re-running the same command resumes from it.
  stop_requested = _stop_requests()

  tcfg = config.training
  is_chief = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  if is_chief:
    _write_config(config, workdir)

  image_shape = (config.model.image_size, config.model.image_size, config.model.in_channels)
  model = models.create_model(config)
  diff = diffusion_lib.create_diffusion(config.diffusion, learn_sigma=config.model.learn_sigma)
  grid_diff = diffusion_lib.create_diffusion(config.diffusion, learn_sigma=config.model.learn_sigma,
                                             timestep_respacing=tcfg.grid_sampling_steps)
  tx = optimizer_from_config(tcfg)
  init_rng, train_rng, sample_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)

  state = create_train_state(init_rng, model, image_shape, tx, ema_rates=tcfg.ema_rates,
                             schedule_sampler=tcfg.schedule_sampler, num_timesteps=diff.num_timesteps,
                             class_cond=config.model.num_classes > 0)
  manager = checkpointing.create_manager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                         max_to_keep=tcfg.keep_checkpoints,
                                         keep_period=tcfg.keep_every_steps)
  state, restored_step = checkpointing.restore_latest(manager, state)
  start_step = int(state.step)
  if restored_step is None:
    logging.info("No checkpoint in %s: starting from scratch.", manager.directory)
    parameter_overview.log_parameter_overview(state.params)
  else:
    logging.info("Resuming from the checkpoint of step %d.", start_step)
  if start_step >= tcfg.num_train_steps:
    logging.info("Already trained %d >= num_train_steps=%d steps.", start_step, tcfg.num_train_steps)
    manager.close()
    return replicate_state(state)

  p_train_step = make_p_train_step(train_rng, make_step_kwargs(config, model, diff, tx))
  sample_fn = sampling.make_sample_fn(model, grid_diff, (tcfg.num_grid_samples, *image_shape),
                                      sampler=config.sampling.sampler, eta=config.sampling.eta,
                                      clip_denoised=config.sampling.clip_denoised)
  # Class-conditional models sample the classes in turn.
  grid_labels = (jnp.arange(tcfg.num_grid_samples) % config.model.num_classes
                 if config.model.num_classes > 0 else None)
  state = replicate_state(state)

  # A resumed run continues the data order where it stopped (exactly for in-memory datasets).
  batches = input_pipeline.create_input_iter(config.data, config.model.image_size, tcfg.batch_size,
                                             seed=config.seed, start_step=start_step)
  sizes = [min(tcfg.steps_per_call, tcfg.num_train_steps - s)
           for s in range(start_step, tcfg.num_train_steps, tcfg.steps_per_call)]
  batches = input_pipeline.prefetch_to_device(_chunks(batches, sizes), size=2)

  report_progress = periodic_actions.ReportProgress(
      num_train_steps=tcfg.num_train_steps, writer=writer if is_chief else None,
      every_steps=tcfg.log_every_steps)

  periodic_fid = None
  if tcfg.fid_every_steps > 0 and is_chief:
    from ddpm_ip_jax import evaluate  # pylint: disable=import-outside-toplevel
    periodic_fid = evaluate.PeriodicFid(config, workdir)

  def write_samples(step):
    """EMA sample grids of every rate, to TensorBoard and workdir/samples/ (process 0 only)."""
    for rate_key, ema in state.ema_params.items():
      x0 = sample_fn(jax_utils.unreplicate(ema), jax.random.fold_in(sample_rng, step), grid_labels)
      grid = image_grid.make_grid(sampling.to_uint8(x0))
      writer.write_images(step, {f"samples/ema_{rate_key}": grid[None]})
      image_grid.save_png(os.path.join(workdir, "samples", f"ema_{rate_key}_step_{step:08d}.png"),
                          grid, upscale=max(1, 64 // config.model.image_size))

  logging.info("Training steps %d..%d, %d per device call.", start_step, tcfg.num_train_steps,
               tcfg.steps_per_call)
  def check_finite(metrics):
    """Stops the run, saving nothing more, if the call of `metrics` had a NaN/Inf loss or gradient norm
    (the flag is global: every host stops at the same call)."""
    if tcfg.skip_nonfinite_updates or float(metrics["nonfinite"]) == 0.0:
      return
    manager.wait_until_finished()  # the previous checkpoint, from before the bad step, is complete
    good = manager.latest_step()
    manager.close()
    raise NonFiniteLossError(
        f"The loss became {float(metrics['loss']):.4g} (gradient norm {float(metrics['grad_norm']):.4g}) at "
        f"step {int(metrics['first_nonfinite_step'])}; the run stopped without saving it. "
        + (f"The last good checkpoint is step {good} in {manager.directory}; rerunning resumes from it. "
           if good is not None else f"There is no checkpoint in {manager.directory} yet. ")
        + "Lower config.training.learning_rate, enable gradient clipping (config.training.grad_clip=1.0) "
        "or a warm-up (config.training.warmup_steps), check the data for NaN/Inf, or skip such updates "
        "with config.training.skip_nonfinite_updates=True.")

  step, metric_sums = start_step, []
  log_time, log_step = time.monotonic(), start_step
  unchecked = None  # the metrics of the previous call, checked while the current one runs
  for call_index, size in enumerate(sizes):
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      state, metrics = p_train_step(state, next(batches))
    metrics = jax_utils.unreplicate(metrics)
    if unchecked is not None:
      check_finite(unchecked)
    unchecked = metrics
    metric_sums.append(metrics)
    prev_step, step = step, step + size
    for s in range(prev_step + 1, step + 1):
      report_progress(s)
    is_last = step == tcfg.num_train_steps
    stop = stop_requested(call_index)
    is_log = _crossed(prev_step, step, tcfg.log_every_steps) or is_last
    is_save = _crossed(prev_step, step, tcfg.checkpoint_every_steps) or is_last or stop
    if is_log or is_save:  # nothing non-finite reaches the logs or a checkpoint
      check_finite(metrics)
      unchecked = None

    if is_log:
      scalars = summarize_metrics(jax.device_get(metric_sums))
      now = time.monotonic()
      steps_per_sec = (step - log_step) / (now - log_time)
      scalars["images_per_sec"] = steps_per_sec * tcfg.batch_size
      writer.write_scalars(step, scalars)
      if scalars.get("skipped_steps"):
        logging.warning("Skipped %d update(s) with a NaN/Inf loss or gradient norm in steps %d..%d.",
                        scalars["skipped_steps"], log_step + 1, step)
      logging.info("step %d: loss %.4f, %.2f steps/s, %.1f images/s, ETA %.0f s", step, scalars.get("loss", np.nan),
                   steps_per_sec, scalars["images_per_sec"],
                   (tcfg.num_train_steps - step) / max(steps_per_sec, 1e-9))
      metric_sums, log_time, log_step = [], now, step

    if is_save:
      with report_progress.timed("checkpoint"):
        checkpointing.save(manager, step, jax_utils.unreplicate(state))
    if stop:
      logging.warning("SIGTERM: saved the checkpoint of step %d and stopping.", step)
      break

    if is_chief and (_crossed(prev_step, step, tcfg.sample_every_steps) or is_last):
      with report_progress.timed("sample"):
        write_samples(step)
    if periodic_fid is not None and (_crossed(prev_step, step, tcfg.fid_every_steps) or is_last):
      with report_progress.timed("fid"):
        rate_key, ema = next(iter(state.ema_params.items()))
        scores = periodic_fid(jax_utils.unreplicate(ema))
        writer.write_scalars(step, {f"eval/ema_{rate_key}/{k}": v for k, v in scores.items()})
        logging.info("step %d: EMA %s %s", step, rate_key, scores)
    writer.flush()

  manager.wait_until_finished()
  manager.close()
  writer.flush()
  return state
