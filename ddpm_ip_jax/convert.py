"""PyTorch DDPM-IP / guided-diffusion checkpoints -> a ddpm-ip-jax directory, and back:
`python -m ddpm_ip_jax.convert`.

  python -m ddpm_ip_jax.convert --flags='{"image_size": 32, ...}' --input=model.pt --output=DIR
  python -m ddpm_ip_jax.convert --flags_file=unet_config.json --input=model.pt --output=DIR
  python -m ddpm_ip_jax.convert --export --input=DIR --output=model.npz   # a PyTorch-layout state_dict

DIR holds config.json and the params (`workdir.save_converted`); the sample and evaluation commands read it with
--checkpoint=DIR. The conversion itself: `ddpm_ip_jax/reference_checkpoints.py`.
"""
import argparse
import json
import os
import pathlib
import sys

from ddpm_ip_jax import cli
from ddpm_ip_jax import config_validation
from ddpm_ip_jax import fileio
from ddpm_ip_jax import reference_checkpoints
from ddpm_ip_jax import workdir


def main(argv=None):
  """Exit code 0; bad input (flags, files, a mismatching or non-finite checkpoint) is one 'FATAL' line."""
  try:
    return _main(argv)
  except (OSError, ValueError, ImportError) as e:
    sys.exit(f"FATAL {cli.fatal_message(e)}")


class _Parser(argparse.ArgumentParser):
  """argparse whose errors (its own and ours) are ValueErrors, so that they end as the one FATAL line and exit code
  1 of every command, not argparse's usage text and exit code 2."""

  def error(self, message):
    raise ValueError(f"{message} (python -m ddpm_ip_jax.convert --help)")


def _main(argv):
  parser = _Parser(
      prog="python -m ddpm_ip_jax.convert",
      description="Convert a PyTorch DDPM-IP checkpoint to a ddpm-ip-jax directory, or back (--export).")
  parser.add_argument("--flags", default=None, help="reference flags as JSON, e.g. '{\"image_size\": 32}'")
  parser.add_argument("--flags_file", default=None, help="a JSON file of reference flags")
  parser.add_argument("--input", required=True, help=".pt/.npz state_dict, or with --export a DIR")
  parser.add_argument("--output", required=True, help="output DIR, or with --export an .npz file")
  parser.add_argument("--export", action="store_true", help="DIR -> PyTorch-layout .npz state_dict")
  args = parser.parse_args(argv)
  for name in ("input", "output"):  # '' (an unset shell variable) would be the current directory
    if not getattr(args, name).strip():
      parser.error(cli.empty_path_message(name))
  if args.export:
    if args.flags or args.flags_file:
      parser.error("--export reads the config from DIR/config.json; do not pass --flags/--flags_file.")
    if not args.output.endswith(".npz"):  # np.savez's archive under a .pt name would fool torch.load's users
      parser.error(f"--output {args.output}: --export writes an .npz archive of the state_dict (load it with "
                   "numpy.load, then torch.from_numpy); name it *.npz.")
    config, params = workdir.load_converted(args.input)
    reference_checkpoints.save_state_dict_npz(params, config, args.output)
    print(f"wrote {args.output}")
    return 0
  if (args.flags is None) == (args.flags_file is None):
    parser.error("give exactly one of --flags and --flags_file.")
  if args.flags_file is not None:
    if not os.path.isfile(args.flags_file):
      parser.error(f"--flags_file {args.flags_file} " + ("is a directory, not a JSON file." if
                                                         os.path.isdir(args.flags_file) else "not found."))
    text, source = pathlib.Path(args.flags_file).read_text(), f"--flags_file {args.flags_file}"
  else:
    text, source = args.flags, "--flags"
  try:
    flags = json.loads(text)
  except json.JSONDecodeError as e:
    parser.error(f"{source} is not JSON ({e}); e.g. '{{\"image_size\": 32, \"num_channels\": 128}}'.")
  if not isinstance(flags, dict):
    parser.error(f"{source} must be a JSON object of reference flags, got {type(flags).__name__}.")
  if fileio.exists(args.output) and not fileio.is_dir(args.output):
    parser.error(f"--output {args.output} is a file; give a directory.")
  config = reference_checkpoints.config_from_reference_flags(flags)
  _check_like_a_training_config(config, source)
  params = reference_checkpoints.load_reference_checkpoint(args.input, config)
  workdir.save_converted(config, params, args.output)
  print(f"wrote {args.output}/config.json and {args.output}/params")
  return 0


# Config fields that come from a reference flag of another name, for the error message.
_REFERENCE_NAMES = {"diffusion.steps": "diffusion_steps", "diffusion.input_perturbation": "input_pertub",
                    "sampling.timestep_respacing": "timestep_respacing", "diffusion.noise_schedule": "noise_schedule"}


def _check_like_a_training_config(config, source):
  """The converted model's config passes the training config's checks (config_validation), so that a flag such
  as noise_schedule "cosin", diffusion_steps 0 or an impossible timestep_respacing fails here, not in `sample`."""
  try:
    config_validation.validate_config(config)
  except config_validation.ConfigError as e:
    text = str(e)
    hint = next((f" (reference flag {flag!r})" for field, flag in _REFERENCE_NAMES.items()
                 if text.startswith(f"config.{field}")), "")
    raise ValueError(f"{source}: {text}{hint}") from None


if __name__ == "__main__":
  sys.exit(main())
