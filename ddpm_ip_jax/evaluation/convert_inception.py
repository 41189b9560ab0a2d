"""pytorch-fid's FID Inception weights (.pth, needs torch) -> an .npz keyed by state_dict name (no torch
needed to read it), checked strictly against the Flax FID InceptionV3 before writing.

  python -m ddpm_ip_jax.evaluation.convert_inception \
      --input=pt_inception-2015-12-05-6726825d.pth --output=inception_fid.npz

The .npz holds the state_dict unchanged (float32, PyTorch layout, BatchNorm not folded), so it can be
converted back to a .pth; `inception.load_inception_params` reads either file.
"""
import argparse
import sys

from ddpm_ip_jax import cli
from ddpm_ip_jax.evaluation import inception


def main(argv=None):
  """Converts; returns 0. A missing, damaged or foreign weights file raises an error naming it (`_run` prints it)."""
  parser = argparse.ArgumentParser(
      prog="python -m ddpm_ip_jax.evaluation.convert_inception",
      description="Convert pytorch-fid's FID Inception weights (.pth) to an .npz read without torch.")
  parser.add_argument("--input", required=True, help=f"the user-supplied {inception.WEIGHTS_FILE}")
  parser.add_argument("--output", required=True, help="the .npz to write, e.g. inception_fid.npz")
  args = parser.parse_args(argv)
  arrays = inception.save_weights_npz(args.input, args.output)
  print(f"wrote {args.output}: {len(arrays)} arrays, "
        f"{sum(a.size for a in arrays.values()):,} weights")
  return 0


def _run():
  """`main` on the command line: a missing, damaged or foreign weights file (or an --output not ending in .npz)
  is one 'FATAL' line naming it and exit code 1, without a traceback."""
  try:
    return main()
  except cli.USER_ERRORS as e:
    sys.exit(f"FATAL {cli.fatal_message(e)}")


if __name__ == "__main__":
  sys.exit(_run())
