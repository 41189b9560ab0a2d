"""Speed measurements: train step time, images/s, compile time, peak memory, and the sampler's samples/s.
The command is `python -m ddpm_ip_jax.benchmark`.

Synthetic data (random images), so only the pmapped step and the compiled chain are timed; every local device
is used. Compile time is what the first call adds to the init and a step (the step compiles, or loads from the
cache, in the background while the state is replicated, as in training); step time is the median (with min and
max) of `--train_steps` timed calls after it, each ended by `block_until_ready` and divided by `steps_per_call`;
the pipelined step time is `--train_steps` calls dispatched back to back with one wait at the end, as the
training loop runs them (the next call's dispatch overlaps the current call). Peak memory is the device
allocator's peak (GPU/TPU), or on CPU the process's peak resident memory so far (the sampler lines include what
the training part used).
Prints one JSON line per measurement. Measured figures: docs/performance.md.

"""
import os
import resource
import statistics
import time

import jax
import numpy as np

from ddpm_ip_jax import config_validation
from ddpm_ip_jax import diffusion as diffusion_lib
from ddpm_ip_jax import generation
from ddpm_ip_jax import host_memory
from ddpm_ip_jax import models
from ddpm_ip_jax import train_state as train_state_lib
from ddpm_ip_jax import train_step as train_step_lib


def peak_memory_bytes():
  """Peak bytes in use on the first device (GPU/TPU), or this process's peak RSS on CPU."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _timed(fn, *args):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


def process_age_s():
  """Seconds since this process was started (from /proc; None where there is none)."""
  try:
    with open("/proc/self/stat") as f:
      start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
  except (OSError, ValueError, IndexError):
    return None
  return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def build_benchmark_step(config, compile_in_background=False):
  """The training of `config` as training builds it (`train_step.create_training`), its state replicated as
  the step returns it (so the step compiles once) and a random batch already on the devices (the timed calls
  move no data). Returns a dict: model, params (count), state, batch, p_step, init_s, and with
  `compile_in_background` "compiling": the step's `host_memory.BackgroundCompile`, started before the state is
  replicated and the batch made (as the training loop starts it; None otherwise)."""
  config_validation.validate_config(config, num_devices=jax.device_count())
  n_dev = jax.local_device_count()
  tcfg = config.training
  per_device = tcfg.batch_size // jax.device_count()
  k = tcfg.steps_per_call
  size, channels = config.model.image_size, config.model.in_channels
  t0 = time.perf_counter()
  training = train_step_lib.create_training(config)
  state = jax.block_until_ready(training.state)
  init_s = time.perf_counter() - t0
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (n_dev, k, per_device, size, size, channels)).astype(np.float32),
           "label": rng.integers(0, max(config.model.num_classes, 1), (n_dev, k, per_device)).astype(np.int32)}
  compiling = None
  if compile_in_background and jax.process_count() == 1:  # (as the training loop: one process only)
    compiling = host_memory.BackgroundCompile(training.p_train_steps,
                                              *train_step_lib.abstract_step_args(config, state, k))
  return {"model": training.model, "params": models.count_params(state.params),
          "state": train_state_lib.replicate_state(state), "p_step": training.p_train_steps,
          "batch": jax.device_put(batch, train_state_lib.device_sharding()), "init_s": init_s,
          "compiling": compiling}


def benchmark_training(config, num_steps):
  """Init, compile and per-step times (median, min, max) and images/s of the pmapped training step."""
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps}: time at least one step after the compiling one")
  t0 = time.perf_counter()
  built = build_benchmark_step(config, compile_in_background=True)
  state, batch, p_step, init_s, n_params = (built[k] for k in ("state", "batch", "p_step", "init_s", "params"))
  n_dev = jax.local_device_count()
  tcfg = config.training
  k = tcfg.steps_per_call
  # As the training loop: the step compiled while the state is replicated, the compiler's memory released first.
  if built["compiling"] is not None:
    built["compiling"].wait()
  host_memory.compile_ahead(p_step, state, batch)  # finds the executable the background compile made
  state, _ = jax.block_until_ready(p_step(state, batch))
  first_s = time.perf_counter() - t0
  first_step_since_start_s = process_age_s()
  times = []
  for _ in range(num_steps):
    (state, _), dt = _timed(p_step, state, batch)
    times.append(dt / k)
  step_s = statistics.median(times)
  # As the training loop runs: each call dispatched while the previous one computes, one wait at the end.
  t0 = time.perf_counter()
  for _ in range(num_steps):
    state, _ = p_step(state, batch)
  jax.block_until_ready(state)
  pipelined_s = (time.perf_counter() - t0) / (num_steps * k)
  return {"what": "train", "devices": n_dev, "device_kind": jax.local_devices()[0].device_kind,
          "params": n_params, "global_batch": tcfg.batch_size, "steps_per_call": k, "dtype": config.model.dtype,
          "init_s": round(init_s, 2), "compile_s": round(first_s - init_s - k * step_s, 2), "step_s": round(step_s, 5),
          "step_s_min": round(min(times), 5), "step_s_max": round(max(times), 5),
          "images_per_s": round(tcfg.batch_size / step_s, 2), "pipelined_step_s": round(pipelined_s, 5),
          "pipelined_images_per_s": round(tcfg.batch_size / pipelined_s, 2),
          "peak_memory_gb": round(peak_memory_bytes() / 2**30, 3),
          "first_step_since_start_s": (round(first_step_since_start_s, 2)
                                       if first_step_since_start_s is not None else None),
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def benchmark_sampling(config, params, respacing, per_device_batch, sampler="ancestral"):
  """Compile time and samples/s of the pmapped whole-chain sampler (one `fori_loop`) for one respacing.

  params: the (unreplicated) network parameters; random ones time the same as trained ones."""
  if per_device_batch < 1:
    raise ValueError(f"per_device_batch={per_device_batch} must be positive")
  devices = jax.local_devices()
  steps = diffusion_lib.create_diffusion(config.diffusion, config.model.learn_sigma, respacing).num_timesteps
  p_sample = generation.create_pmapped_sampler(config, respacing=respacing, sampler=sampler, devices=devices)
  indices = np.arange(len(devices) * per_device_batch, dtype=np.int32).reshape(len(devices), per_device_batch)
  _, first_s = _timed(p_sample, params, indices)
  _, run_s = _timed(p_sample, params, indices)
  n = indices.size
  return {"what": "sample", "sampler": sampler, "steps": steps, "devices": len(devices), "batch": n,
          "dtype": config.model.dtype, "compile_s": round(first_s - run_s, 2), "chain_s": round(run_s, 4),
          "samples_per_s": round(n / run_s, 3), "network_evals_per_s": round(n * steps / run_s, 1),
          "peak_memory_gb": round(peak_memory_bytes() / 2**30, 3)}
