"""What the sample command (and evaluate, exposure_bias) samples with: the model, the chain's settings, the class
labels and the output directory named after them, from the values of the flags (`SampleArgs`, read once by the
command), each checked before anything compiles with an `app.UsageError` naming the flag.

The chain's settings default to the run's own `config.sampling` (its config.json): a flag given on the command
line overrides that one setting.
"""
import dataclasses
import math
from typing import Optional, Sequence

from absl import app

from ddpm_ip_jax import cli
from ddpm_ip_jax import config_validation
from ddpm_ip_jax import diffusion as diffusion_lib
from ddpm_ip_jax import fileio
from ddpm_ip_jax import generation
from ddpm_ip_jax import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class SampleArgs:
  """The values of the sampling flags (`cli.define_sample_flags`); None: not given (or not a flag of the command)."""
  workdir: Optional[str] = None
  checkpoint: Optional[str] = None
  use_ema: Optional[bool] = None
  ema_rate: Optional[float] = None
  sampler: Optional[str] = None
  steps: Optional[str] = None
  eta: Optional[float] = None
  clip_denoised: Optional[bool] = None
  eps_scale: Optional[Sequence[str]] = None
  seed: int = 0
  output_dir: Optional[str] = None
  num_samples: int = 1
  batch_size: int = 1
  labels: Optional[Sequence[str]] = None

  @classmethod
  def from_flags(cls, flag_values):
    """The fields that `flag_values` (absl's FlagValues) defines, read from it."""
    return cls(**{f.name: flag_values[f.name].value for f in dataclasses.fields(cls) if f.name in flag_values})


def load_model(args):
  """The model of --workdir or --checkpoint (`workdir.load_model`)."""
  if not args.workdir and not args.checkpoint:
    raise app.UsageError("give --workdir (a training run) or --checkpoint (a converted model).")
  return workdir_lib.load_model(workdir=args.workdir, checkpoint=args.checkpoint, use_ema=args.use_ema,
                                ema_rate=args.ema_rate)


def _eps_scale(values):
  """(k, b) of --eps_scale, or None."""
  if not values:
    return None
  try:
    k, b = map(float, values)
  except ValueError:
    raise app.UsageError(f"--eps_scale wants 'k,b' (two numbers), got {','.join(values)}") from None
  return k, b


def _check_eps_scale(eps_scale, num_steps):
  """lambda_t = k t + b divides the predicted eps at every respaced step t = 0 .. num_steps - 1 (sampling.scale_eps):
  it must be finite and positive at all of them (linear in t, so at both ends), or the samples blow up."""
  if eps_scale is None:
    return
  k, b = eps_scale
  ends = (b, k * (num_steps - 1) + b)
  if not (math.isfinite(k) and all(math.isfinite(v) and v > 0 for v in ends)):
    raise app.UsageError(f"--eps_scale={k:g},{b:g}: lambda_t = k t + b must be positive at every step t = 0 .. "
                         f"{num_steps - 1}, it is {ends[0]:g} at t = 0 and {ends[1]:g} at t = {num_steps - 1} "
                         "(the follow-up paper's b is about 1.005 to 1.017, k small).")


def chain_settings(config, args):
  """{sampler, respacing, eta, clip_denoised, eps_scale} of `args`, each one not given taken from config.sampling;
  eta (`config_validation.check_eta`), the respacing (against the config's diffusion) and eps_scale checked."""
  s = config.sampling
  pick = lambda value, default: default if value is None else value
  settings = dict(sampler=pick(args.sampler, s.sampler), respacing=pick(args.steps, s.timestep_respacing),
                  eta=float(pick(args.eta, s.eta)), clip_denoised=bool(pick(args.clip_denoised, s.clip_denoised)),
                  eps_scale=_eps_scale(args.eps_scale))
  try:
    config_validation.check_eta(settings["eta"], f"--eta={settings['eta']:g}")
  except config_validation.ConfigError as e:
    raise app.UsageError(str(e)) from None
  try:
    num_steps = len(diffusion_lib.space_timesteps(config.diffusion.steps, settings["respacing"]))
  except ValueError as e:
    raise app.UsageError(f"--steps={settings['respacing']!r}: {e}") from None
  _check_eps_scale(settings["eps_scale"], num_steps)
  return settings


def output_dir(loaded, settings, args, labels=None):
  """--output_dir, or <workdir or checkpoint>/samples_<tag>_seed<seed> with a tag naming the settings."""
  tag = f"{settings['sampler']}{settings['respacing'] or loaded.config.diffusion.steps}"
  tag += f"_eta{settings['eta']:g}" if settings["sampler"] == "ddim" else ""
  eps_scale = settings["eps_scale"]
  tag += f"_es{eps_scale[0]:g},{eps_scale[1]:g}" if eps_scale else ""
  tag += "_raw" if loaded.raw else ""
  tag += f"_labels{'-'.join(map(str, labels))}" if labels else ""
  tag += f"_step{loaded.step}" if not args.checkpoint else ""
  return args.output_dir or fileio.join(args.workdir or args.checkpoint, f"samples_{tag}_seed{args.seed}")


def _labels(config, values):
  """The class labels of --labels as ints (checked against the model: `generation.check_sample_labels`), or None."""
  if not values:
    return None
  try:
    labels = [int(y) for y in values]
    generation.check_sample_labels(config, labels)
  except ValueError as e:
    raise app.UsageError(f"--labels={','.join(values)}: {e}") from None
  return labels


def generate(loaded, args, owned=None):
  """`generation.generate_into` the output directory of `args` (made and probed for writing first); returns
  (final .npz path, output dir). `owned`: an ExitStack that keeps the directory's lock until it closes."""
  for name in ("num_samples", "batch_size"):
    if getattr(args, name) < 1:
      raise app.UsageError(f"--{name} must be >= 1")
  settings = chain_settings(loaded.config, args)
  labels = _labels(loaded.config, args.labels)
  out_dir = output_dir(loaded, settings, args, labels)
  what = "--output_dir" if args.output_dir else "the output directory"
  cli.check_writable(out_dir, what)
  path = generation.generate_into(loaded, settings, out_dir, what=what, num_samples=args.num_samples,
                                  per_device_batch=args.batch_size, seed=args.seed, labels=labels, owned=owned)
  return path, out_dir
