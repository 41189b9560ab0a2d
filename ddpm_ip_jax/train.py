"""The DDPM-IP training loop: resumes, feeds the pmapped step, logs, samples and checkpoints (structure of
flax `examples/imagenet`; `train_and_evaluate(config, workdir)` is what the training command calls).

The loop knows neither the loss nor how a step draws its noise: `train_step` and `objective` do. Everything
random in a step comes from (seed, step, device), so a resumed run draws the same numbers as an uninterrupted
one and no random state is checkpointed.
"""
import contextlib
import dataclasses
import functools
import signal
import threading
import time
from typing import Any

from absl import logging
from clu import parameter_overview
from flax import jax_utils
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from ddpm_ip_jax import checkpointing
from ddpm_ip_jax import config_validation
from ddpm_ip_jax import diffusion as diffusion_lib
from ddpm_ip_jax import fileio
from ddpm_ip_jax import host_memory
from ddpm_ip_jax import images as images_lib
from ddpm_ip_jax import input_pipeline
from ddpm_ip_jax import metric_log
from ddpm_ip_jax import ownership
from ddpm_ip_jax import sampling
from ddpm_ip_jax import train_state as train_state_lib
from ddpm_ip_jax import train_step as train_step_lib
from ddpm_ip_jax import workdir as workdir_lib


def _chunks(iterator, sizes):
  """Stacks the next `size` batches of `iterator` on a new axis 1 ([devices, size, b, ...]) for each
  size in `sizes`."""
  for size in sizes:
    batches = [next(iterator) for _ in range(size)]
    yield jax.tree.map(lambda *xs: np.stack(xs, axis=1), *batches)


def _crossed(prev_step, step, every):
  """Whether a multiple of `every` lies in (prev_step, step]."""
  return every > 0 and step // every > prev_step // every


def _duration(seconds):
  """'42 s', '17 min', '3.2 h'."""
  if seconds < 120:
    return f"{seconds:.0f} s"
  return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _stop_requests():
  """A function of the device-call index that says whether to checkpoint and stop after that call, and the
  name of the signal that asked (None before one came).

  One process: after a SIGTERM or a SIGINT (Ctrl-C; a second Ctrl-C interrupts at once, without saving).
  Several processes: jax's preemption service (on by default with jax.distributed) takes SIGTERM as the
  preemption notice of any one host, tells the others, and all agree on the same call, so every host saves
  the same step and none is left waiting in a collective.
  """
  received = []
  if jax.process_count() > 1:
    return multihost_utils.reached_preemption_sync_point, lambda: "SIGTERM"  # the notice the service takes

  def handler(signum, frame):
    del frame
    if received and signum == signal.SIGINT:
      raise KeyboardInterrupt
    received.append(signal.Signals(signum).name)
    logging.warning("%s: stopping after the current device call, with a checkpoint (Ctrl-C again: stop now, "
                    "without one).", received[-1])

  if threading.current_thread() is threading.main_thread():
    for sig in _STOP_SIGNALS:
      signal.signal(sig, handler)
  return lambda call_index: bool(received), lambda: received[0] if received else None


def train_and_evaluate(config, workdir, allow_config_change=()):
  """Trains `config` in `workdir`, resuming from its latest checkpoint; writes metrics (TensorBoard
  events), EMA sample grids (TensorBoard and workdir/samples/*.png), checkpoints
  (workdir/checkpoints/<step>) and the config used (workdir/config.json). Returns the final state
  (replicated over the local devices). The run owns the workdir while it trains: a second one into it stops
  with `ownership.DirectoryInUseError` before it writes anything. The SIGTERM/SIGINT handlers of the training
  are removed again on return, so a program that trains and then does other work (the study, a notebook) can
  still be stopped.

  A run that resumes must have the model, diffusion and data of its `config.json` (`workdir.RESUME_FIELDS`);
  a difference stops it before anything is compiled or written, unless each changed field is named in
  `allow_config_change`."""
  in_main_thread = threading.current_thread() is threading.main_thread()
  previous = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS} if in_main_thread else {}
  try:
    # The workdir's lock and the checkpoint manager (closed however the run ends), taken by _train_and_evaluate.
    with contextlib.ExitStack() as owned:
      return _train_and_evaluate(config, workdir, tuple(allow_config_change), owned)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def _check_resume_config(config, workdir, allow):
  """ConfigError listing the fields under workdir.RESUME_FIELDS that differ from the run's config.json."""
  saved = workdir_lib.read_config(workdir)
  changes = {path: values for path, values in workdir_lib.config_changes(saved, config).items()
             if not any(path == a or path.startswith(a + ".") for a in allow)}
  if changes:
    listed = "; ".join(f"{path}: {old!r} in config.json, {new!r} now" for path, (old, new) in changes.items())
    raise config_validation.ConfigError(
        f"{workdir} holds checkpoints of a run with another config: {listed}. Resume with that run's config "
        "(the same --config and overrides as before), use a new --workdir, or, if the change is meant, allow it "
        f"with --allow_config_change={','.join(changes)}.")


def _check_output_dirs(workdir):
  """ConfigError where a directory that training writes into (checkpoints/, samples/) is a file."""
  for path in (workdir_lib.checkpoint_dir(workdir), fileio.join(workdir, "samples")):
    if fileio.exists(path) and not fileio.is_dir(path):
      raise config_validation.ConfigError(
          f"{path} is a file, but training writes a directory there; move it away or use another --workdir.")


@dataclasses.dataclass(frozen=True, eq=False)
class _Run:
  """What the loop's steps write to: the run's config and workdir, its checkpoint manager and metric writer, and
  the time spent checkpointing, sampling and scoring (in the log line)."""
  config: Any
  workdir: str
  manager: Any
  writer: Any
  sections: metric_log.SectionTimes = dataclasses.field(default_factory=metric_log.SectionTimes)


def _train_and_evaluate(config, workdir, allow_config_change, owned):
  # Everything that can be wrong with the config or the data fails here, before any compilation.
  config_validation.validate_training(config, jax.device_count(), jax.process_count())
  tcfg = config.training
  is_chief = jax.process_index() == 0
  workdir = fileio.absolute(workdir)  # a local path or a URL (gs://...): every write goes through fileio
  run = _open_workdir(config, workdir, allow_config_change, owned, is_chief)
  # SIGTERM (preemption, scancel, the launch/ scripts' stop) and SIGINT (Ctrl-C) end the run after the next
  # device call with a checkpoint; re-running the same command resumes from it.
  stop_requests = _stop_requests()
  training = train_step_lib.create_training(config)
  state = _restore(run, training.state, is_chief)  # (a checkpoint of another model fails here, before compiling)
  start_step = int(state.step)
  if start_step >= tcfg.num_train_steps:
    logging.info("Already trained %d >= num_train_steps=%d steps.", start_step, tcfg.num_train_steps)
    run.manager.close()
    return train_state_lib.replicate_state(state)

  if is_chief and tcfg.tensorboard:  # before compiling; the writer itself is opened during the compile
    _writer_error(metric_log.check_tensorboard_installed)
  # The step compiles (or loads from the cache) in a thread from here on, while the metric writer imports
  # TensorFlow, the state goes to the devices and the input pipeline starts (host_memory.BackgroundCompile). In a
  # run of several processes pmap turns each host's arguments into global arrays, which abstract ones cannot go
  # through (JAX 0.10.2: an IndexError in its tiling): there the step compiles at its first call, as before.
  compiling = None
  if jax.process_count() == 1:
    compiling = host_memory.BackgroundCompile(
        training.p_train_steps,
        *train_step_lib.abstract_step_args(config, training.state, min(tcfg.steps_per_call,
                                                                       tcfg.num_train_steps - start_step)))
  run = dataclasses.replace(run, writer=_open_writer(workdir, tcfg, is_chief))
  sample_grid = _grid_sampler(config, training.model, training.sample_rng) if is_chief else None
  state = train_state_lib.replicate_state(state)
  # A resumed run continues the data order where it stopped (exactly unless a tfds dataset is in TFRecord files).
  batches = input_pipeline.create_input_iter(config.data, config.model.image_size, tcfg.batch_size,
                                             seed=config.seed, start_step=start_step)
  sizes = [min(tcfg.steps_per_call, tcfg.num_train_steps - s)
           for s in range(start_step, tcfg.num_train_steps, tcfg.steps_per_call)]
  batches = input_pipeline.prefetch_to_device(_chunks(batches, sizes), size=2)
  periodic_fid = None
  if tcfg.fid_every_steps > 0 and is_chief:
    from ddpm_ip_jax.evaluation import scoring  # pylint: disable=import-outside-toplevel
    periodic_fid = scoring.PeriodicFid(config, workdir)
  logging.info("Training steps %d..%d, %d per device call.", start_step, tcfg.num_train_steps,
               tcfg.steps_per_call)
  state, step = _loop(run, state, training.p_train_steps, batches, sizes, start_step, stop_requests,
                      functools.partial(_sample_and_score, run, sample_grid, periodic_fid), compiling)
  checkpointing.finish(run.manager)
  run.writer.close()
  logging.info("Trained to step %d; the checkpoints are complete.", step)
  return state


def _open_workdir(config, workdir, allow_config_change, owned, is_chief):
  """Creates and owns `workdir` (its lock and checkpoint manager entered into `owned`) and checks that a resumed
  run has the config of its config.json: a `_Run` (its writer opened later, `_open_writer`)."""
  tcfg = config.training
  if fileio.exists(workdir) and not fileio.is_dir(workdir):
    raise config_validation.ConfigError(f"--workdir={workdir} is a file; give a directory (it is created).")
  _check_output_dirs(workdir)
  fileio.makedirs(workdir)
  owned.enter_context(ownership.hold(workdir, "--workdir", chief=is_chief))  # before anything is written there
  manager = checkpointing.make_manager(workdir_lib.checkpoint_dir(workdir), max_to_keep=tcfg.keep_checkpoints,
                                       keep_period=tcfg.keep_every_steps)
  owned.enter_context(checkpointing.closing(manager))  # no orbax thread outlives an error
  if manager.all_steps() and fileio.exists(fileio.join(workdir, workdir_lib.CONFIG_FILE)):
    _check_resume_config(config, workdir, allow_config_change)
  return _Run(config=config, workdir=workdir, manager=manager, writer=None)


def _open_writer(workdir, tcfg, is_chief):
  """The run's metric writer (TensorBoard events from process 0 when config.training.tensorboard)."""
  return _writer_error(metric_log.make_writer, workdir, tensorboard=is_chief and tcfg.tensorboard)


def _writer_error(fn, *args, **kwargs):
  """fn(*args, **kwargs), its ImportError (no TensorFlow for the events) a ConfigError naming the setting."""
  try:
    return fn(*args, **kwargs)
  except ImportError as e:
    raise config_validation.ConfigError(f"config.training.tensorboard=True: {e}") from e


def _restore(run, state, is_chief):
  """`state` from the newest readable checkpoint of the run (or as it is); newer unreadable steps are set aside
  and the config is written to config.json (process 0), once the checkpoint is known to fit it."""
  try:
    state, restored_step = checkpointing.restore_latest(run.manager, state)
  except ValueError as e:
    raise config_validation.ConfigError(str(e)) from e
  newer = checkpointing.unreadable_steps(run.manager, restored_step)
  if newer and is_chief:  # kept for inspection, out of the way of the next saves and deletions
    moved = checkpointing.set_aside(run.manager, newer)
    logging.warning("Set the unreadable checkpoint(s) aside: %s", ", ".join(map(str, moved)))
  if is_chief:
    workdir_lib.write_config(run.config, run.workdir)
  if restored_step is None:
    logging.info("No checkpoint in %s: starting from scratch.", run.manager.directory)
    parameter_overview.log_parameter_overview(state.params)
  else:
    logging.info("Resuming from the checkpoint of step %d.", int(state.step))
  return state


def _grid_sampler(config, model, sample_rng):
  """sample_grid(ema_params, step) -> the sample grid [H', W', C] uint8 of `config.training.num_grid_samples`
  EMA samples (the sampler of config.sampling on grid_sampling_steps; class-conditional models sample the
  classes in turn)."""
  tcfg = config.training
  grid_diff = diffusion_lib.create_diffusion(config.diffusion, learn_sigma=config.model.learn_sigma,
                                             timestep_respacing=tcfg.grid_sampling_steps)
  image_shape = (config.model.image_size, config.model.image_size, config.model.in_channels)
  sample_fn = sampling.make_sample_fn(model, grid_diff, (tcfg.num_grid_samples, *image_shape),
                                      sampler=config.sampling.sampler, eta=config.sampling.eta,
                                      clip_denoised=config.sampling.clip_denoised)
  labels = (jnp.arange(tcfg.num_grid_samples) % config.model.num_classes if config.model.num_classes > 0
            else None)

  def sample_grid(ema_params, step):
    x0 = sample_fn(ema_params, jax.random.fold_in(sample_rng, step), labels)
    return images_lib.make_grid(np.asarray(images_lib.to_uint8(x0)))

  return sample_grid


def _loop(run, state, p_train_steps, batches, sizes, step, stop_requests, after_call, compiling=None):
  """Runs the device calls of `sizes` steps each from `step`: checks, logs and checkpoints as the config asks,
  then `after_call(prev_step, step, is_last, state)`; returns (state, step) at the end or at a stop request.
  `compiling`: the step's BackgroundCompile, waited for before the first call."""
  tcfg = run.config.training
  stop_requested, stop_reason = stop_requests
  interval = _Interval(step)
  unchecked = None  # the metrics of the previous call, checked while the current one runs
  for call_index, size in enumerate(sizes):
    batch = next(batches)
    if call_index == 0:  # the compiler's memory goes back before the step's buffers come
      if compiling is not None:
        compiling.wait()
      host_memory.compile_ahead(p_train_steps, state, batch)  # (the compiled step, found, when the shapes match)
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      state, metrics = p_train_steps(state, batch)
    metrics = jax_utils.unreplicate(metrics)
    if unchecked is not None:
      _check_finite(run, unchecked)
    unchecked = metrics
    interval.metric_sums.append(metrics)
    prev_step, step = step, step + size
    is_last = step == tcfg.num_train_steps
    stop = stop_requested(call_index)
    is_log = _crossed(prev_step, step, tcfg.log_every_steps) or is_last
    is_save = _crossed(prev_step, step, tcfg.checkpoint_every_steps) or is_last or stop
    if is_log or is_save:  # nothing non-finite reaches the logs or a checkpoint
      _check_finite(run, metrics)
      unchecked = None
    if is_log:
      interval = _log(run, step, interval)
    if is_save:
      _save(run, step, state)
    if stop:
      logging.warning("%s: saved the checkpoint of step %d and stopping.", stop_reason(), step)
      break
    after_call(prev_step, step, is_last, state)
    run.writer.flush()
  return state, step


@dataclasses.dataclass
class _Interval:
  """The calls since the last log line: from `step`, started at `time` (time.monotonic), their metrics."""
  step: int
  time: float = dataclasses.field(default_factory=time.monotonic)
  metric_sums: list = dataclasses.field(default_factory=list)


def _check_finite(run, metrics):
  """Stops the run, saving nothing more, if the call of `metrics` had a NaN/Inf loss or gradient norm (the flag
  is global: every host stops at the same call)."""
  if run.config.training.skip_nonfinite_updates or float(metrics["nonfinite"]) == 0.0:
    return
  manager = run.manager
  checkpointing.wait(manager)  # the previous checkpoint, from before the bad step, is complete
  good = manager.latest_step()
  manager.close()
  raise train_step_lib.NonFiniteLossError(
      f"The loss became {float(metrics['loss']):.4g} (gradient norm {float(metrics['grad_norm']):.4g}) at "
      f"step {int(metrics['first_nonfinite_step'])}; the run stopped without saving it. "
      + (f"The last good checkpoint is step {good} in {manager.directory}; rerunning resumes from it. "
         if good is not None else f"There is no checkpoint in {manager.directory} yet. ")
      + "Lower config.training.learning_rate, enable gradient clipping (config.training.grad_clip=1.0) "
      "or a warm-up (config.training.warmup_steps), check the data for NaN/Inf, or skip such updates "
      "with config.training.skip_nonfinite_updates=True.")


def _log(run, step, interval):
  """Writes the averages of the interval's metrics, its speed and section times, and logs them; the next
  interval, from `step`."""
  tcfg = run.config.training
  scalars = train_step_lib.summarize_metrics(jax.device_get(interval.metric_sums))
  now = time.monotonic()
  steps_per_sec = (step - interval.step) / (now - interval.time)
  scalars["steps_per_sec"] = steps_per_sec
  scalars["images_per_sec"] = steps_per_sec * tcfg.batch_size
  spent = run.sections.pop()
  scalars.update({f"time/{name}_s": seconds for name, seconds in spent.items()})
  run.writer.write_scalars(step, scalars)
  if scalars.get("skipped_steps"):
    logging.warning("Skipped %d update(s) with a NaN/Inf loss or gradient norm in steps %d..%d.",
                    scalars["skipped_steps"], interval.step + 1, step)
  logging.info("step %d: loss %.4f, %.2f steps/s, %.1f images/s, ETA %s%s", step, scalars.get("loss", np.nan),
               steps_per_sec, scalars["images_per_sec"],
               _duration((tcfg.num_train_steps - step) / max(steps_per_sec, 1e-9)),
               "".join(f", {name} {seconds:.1f} s" for name, seconds in spent.items()))
  return _Interval(step, now)


def _save(run, step, state):
  """Checkpoints the replicated `state` as `step`."""
  with run.sections.timed("checkpoint"):
    checkpointing.save(run.manager, step, jax_utils.unreplicate(state))
  logging.info("step %d: checkpoint -> %s", step, fileio.join(run.manager.directory, str(step)))


def _sample_and_score(run, sample_grid, periodic_fid, prev_step, step, is_last, state):
  """The EMA sample grids (process 0: `sample_grid` is None elsewhere) and the periodic FID, when their
  interval is crossed or at the last step."""
  tcfg = run.config.training
  if sample_grid is not None and (_crossed(prev_step, step, tcfg.sample_every_steps) or is_last):
    with run.sections.timed("sample"):
      _write_samples(run, sample_grid, step, state)
    logging.info("step %d: EMA sample grids -> %s", step, fileio.join(run.workdir, "samples"))
  if periodic_fid is not None and (_crossed(prev_step, step, tcfg.fid_every_steps) or is_last):
    with run.sections.timed("fid"):
      rate_key, ema = next(iter(state.ema_params.items()))
      scores = periodic_fid(jax_utils.unreplicate(ema))
      run.writer.write_scalars(step, {f"eval/ema_{rate_key}/{k}": v for k, v in scores.items()})
      logging.info("step %d: EMA %s %s", step, rate_key, scores)


def _write_samples(run, sample_grid, step, state):
  """EMA sample grids of every rate, to TensorBoard and workdir/samples/."""
  for rate_key, ema in state.ema_params.items():
    grid = sample_grid(jax_utils.unreplicate(ema), step)
    run.writer.write_images(step, {f"samples/ema_{rate_key}": grid[None]})
    images_lib.save_png(fileio.join(run.workdir, "samples", f"ema_{rate_key}_step_{step:08d}.png"),
                        grid, upscale=max(1, 64 // run.config.model.image_size))
