"""Checks a full config before anything is built or compiled, so that a typo or an impossible
value fails at start with a message naming the field, not deep inside a traced function."""
import math
import numbers

from ddpm_ip_jax import diffusion as diffusion_lib
from ddpm_ip_jax import input_pipeline
from ddpm_ip_jax import models
from ddpm_ip_jax import sampling
from ddpm_ip_jax import timestep_sampler
from ddpm_ip_jax.evaluation import extractors


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and what is allowed."""


def _check(ok, message):
  if not ok:
    raise ConfigError(message)


def _is_int(x):
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x):
  """A finite real number (inf and NaN are never a valid setting: they surface as a NaN loss steps later)."""
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


# jax.random.key takes a seed that fits a signed 64-bit integer; a larger one is an OverflowError deep inside.
MAX_SEED = 2**63 - 1


def check_seed(value, name):
  """ConfigError unless `value` is an integer seed in [0, MAX_SEED]; `name` is the flag or field."""
  _check(_is_int(value) and 0 <= value <= MAX_SEED, f"{name}={value!r} must be an integer in [0, 2**63 - 1].")


def check_eta(value, shown):
  """ConfigError unless `value` is a DDIM eta in [0, 1]; `shown` is the field or flag with its value."""
  _check(_is_number(value) and 0.0 <= value <= 1.0, f"{shown} must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like "
         "noise; above 1 the DDIM variance exceeds what the step allows and the samples turn to NaN).")


def _one_of(value, name, allowed):
  _check(value in allowed, f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}.")


def _int_at_least(value, name, low):
  _check(_is_int(value) and value >= low, f"{name}={value!r} must be an integer >= {low}.")


def _number_at_least(value, name, low):
  _check(_is_number(value) and value >= low, f"{name}={value!r} must be a finite number >= {low}.")


def check_respacing(value, name, num_timesteps):
  """A respacing of `num_timesteps` steps (docs/method.md section 4), as `diffusion.space_timesteps` parses it;
  ConfigError naming `name` otherwise."""
  try:
    diffusion_lib.space_timesteps(num_timesteps, value)
  except (ValueError, TypeError, AttributeError) as e:
    raise ConfigError(f"{name}={value!r} is not a respacing of {num_timesteps} steps: {e}") from None


def validate_config(config, num_devices=None):
  """Raises ConfigError for the first invalid value of `config` (config_base.py's schema).

  `num_devices` is the number of devices of all hosts; the global batch must split evenly over them.
  """
  d, tr, s = config.diffusion, config.training, config.sampling

  try:  # the UNet's own checks (models.check_model_args), with the config path in front
    models.create_model(config)
  except (ValueError, TypeError) as e:
    message = str(e)
    raise ConfigError(f"config.{message}" if message.startswith("model.") else f"config.model: {message}") from None

  _int_at_least(d.steps, "config.diffusion.steps", 1)
  _one_of(d.noise_schedule, "config.diffusion.noise_schedule", diffusion_lib.SCHEDULES)
  _one_of(d.loss_type, "config.diffusion.loss_type", diffusion_lib.LOSS_TYPES)
  _number_at_least(d.input_perturbation, "config.diffusion.input_perturbation (gamma)", 0.0)
  _one_of(d.input_perturbation_kind, "config.diffusion.input_perturbation_kind", diffusion_lib.GAMMA_KINDS)
  _number_at_least(d.input_perturbation_start, "config.diffusion.input_perturbation_start", 0.0)
  _check(isinstance(d.rescale_timesteps, bool),
         f"config.diffusion.rescale_timesteps={d.rescale_timesteps!r} must be True or False.")

  _int_at_least(tr.batch_size, "config.training.batch_size", 1)
  if num_devices is not None:
    _check(tr.batch_size % num_devices == 0,
           f"config.training.batch_size={tr.batch_size} does not divide over the {num_devices} "
           f"devices; use a multiple of {num_devices}.")
  _int_at_least(tr.num_train_steps, "config.training.num_train_steps", 1)
  _check(_is_number(tr.learning_rate) and tr.learning_rate > 0,
         f"config.training.learning_rate={tr.learning_rate!r} must be a finite number > 0.")
  for name in ("adam_b1", "adam_b2"):
    value = tr[name]
    _check(_is_number(value) and 0.0 <= value < 1.0, f"config.training.{name}={value!r} must be in [0, 1).")
  _check(_is_number(tr.adam_eps) and tr.adam_eps > 0,
         f"config.training.adam_eps={tr.adam_eps!r} must be a finite number > 0.")
  _number_at_least(tr.weight_decay, "config.training.weight_decay", 0.0)
  _int_at_least(tr.warmup_steps, "config.training.warmup_steps", 0)
  _number_at_least(tr.grad_clip, "config.training.grad_clip (0 = off)", 0.0)
  _check(isinstance(tr.skip_nonfinite_updates, bool),
         f"config.training.skip_nonfinite_updates={tr.skip_nonfinite_updates!r} must be True or False.")
  rates = tuple(tr.ema_rates) if isinstance(tr.ema_rates, (tuple, list)) else None
  # At least one: sampling and evaluation use the EMA parameters (the reference's ema_rate 0.9999).
  _check(bool(rates) and all(_is_number(r) and 0.0 <= r < 1.0 for r in rates) and len(set(rates)) == len(rates),
         f"config.training.ema_rates={tr.ema_rates!r} must be one or more distinct numbers in [0, 1), "
         "e.g. (0.9999,).")
  _one_of(tr.schedule_sampler, "config.training.schedule_sampler", timestep_sampler.SAMPLER_KINDS)
  _int_at_least(tr.steps_per_call, "config.training.steps_per_call", 1)
  _int_at_least(tr.microbatch, "config.training.microbatch (0 = automatic, -1 = the whole per-device batch)", -1)
  if num_devices is not None and tr.microbatch > 0 and tr.batch_size % num_devices == 0:
    per_device = tr.batch_size // num_devices
    _check(per_device % tr.microbatch == 0,
           f"config.training.microbatch={tr.microbatch} does not divide the per-device batch of {per_device} "
           f"(config.training.batch_size={tr.batch_size} over {num_devices} devices); use a divisor of "
           f"{per_device}, 0 (automatic) or -1 (the whole per-device batch).")
  _int_at_least(tr.log_every_steps, "config.training.log_every_steps", 1)
  _check(isinstance(tr.tensorboard, bool), f"config.training.tensorboard={tr.tensorboard!r} must be True or False.")
  _int_at_least(tr.checkpoint_every_steps, "config.training.checkpoint_every_steps", 1)
  _int_at_least(tr.keep_checkpoints, "config.training.keep_checkpoints", 1)
  _int_at_least(tr.keep_every_steps, "config.training.keep_every_steps (0 = none)", 0)
  _int_at_least(tr.sample_every_steps, "config.training.sample_every_steps (0 = only at the end)", 0)
  _int_at_least(tr.num_grid_samples, "config.training.num_grid_samples", 1)
  check_respacing(tr.grid_sampling_steps, "config.training.grid_sampling_steps", d.steps)
  _int_at_least(tr.fid_every_steps, "config.training.fid_every_steps (0 = off)", 0)
  if tr.fid_every_steps > 0:
    _int_at_least(tr.fid_num_samples, "config.training.fid_num_samples", 2)
    _int_at_least(tr.fid_batch_size, "config.training.fid_batch_size", 1)
    check_respacing(tr.fid_sampling_steps, "config.training.fid_sampling_steps", d.steps)
    _one_of(tr.fid_extractor, "config.training.fid_extractor", extractors.EXTRACTORS)
    _check(bool(tr.fid_weights), "config.training.fid_weights must name the extractor's weights file when "
           "fid_every_steps > 0 (the Inception .pth/.npz, or the digits classifier from "
           "python -m ddpm_ip_jax.evaluation.digits_classifier).")

  _one_of(s.sampler, "config.sampling.sampler", sampling.SAMPLERS)
  check_respacing(s.timestep_respacing, "config.sampling.timestep_respacing", d.steps)
  check_eta(s.eta, f"config.sampling.eta={s.eta!r}")

  _check(isinstance(config.data.dataset, str) and config.data.dataset,
         "config.data.dataset must name a dataset.")
  check_seed(config.seed, "config.seed")


def validate_training(config, num_devices, process_count):
  """`validate_config`, then what a training run needs beyond a valid config: no periodic FID on several hosts,
  and a dataset that exists with the config's image size, labels (class-conditional models) and channels. Raises
  ConfigError naming the field; `num_devices` counts the devices of all `process_count` hosts."""
  validate_config(config, num_devices=num_devices)
  fid_every = config.training.fid_every_steps
  _check(fid_every == 0 or process_count == 1,
         f"config.training.fid_every_steps={fid_every}: the periodic FID samples on one process, which would hold "
         f"the other {process_count - 1} at the next step; set it to 0 on several hosts and score the checkpoints "
         "with python -m ddpm_ip_jax.evaluate --distributed=true.")
  try:
    input_pipeline.check_dataset(config.data, config.model.image_size)
    input_pipeline.check_labels(config.data, config.model.num_classes)
    data_channels = input_pipeline.num_channels(config.data)
  except ValueError as e:
    raise ConfigError(f"config.data: {e}") from e
  _check(data_channels == config.model.in_channels,
         f"config.model.in_channels={config.model.in_channels} but dataset {config.data.dataset!r} has "
         f"{data_channels} channel(s); set --config.model.in_channels={data_channels}.")
