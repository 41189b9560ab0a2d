"""pytorch-fid's FID Inception weights (.pth, needs torch) -> an .npz keyed by state_dict name (no torch
needed to read it), checked strictly against the Flax FID InceptionV3 before writing.

  python -m ddpm_ip_jax.evaluation.convert_inception \
      --input=pt_inception-2015-12-05-6726825d.pth --output=inception_fid.npz

The .npz holds the state_dict unchanged (float32, PyTorch layout, BatchNorm not folded), so it can be
converted back to a .pth; `inception.load_inception_params` reads either file.
"""
import argparse
import pathlib
import sys

import numpy as np

from ddpm_ip_jax.evaluation import inception


def convert(input_path, output_path):
  """Reads `input_path` (.pth or .npz), checks it, writes float32 arrays to `output_path` (.npz)."""
  state = inception.read_state_dict(input_path)
  inception.check_state_dict(state)
  arrays = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()
            if not k.endswith("num_batches_tracked")}
  output_path = pathlib.Path(output_path)
  if output_path.suffix != ".npz":
    raise ValueError(f"--output must end in .npz, got {output_path}.")
  output_path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(output_path, **arrays)
  return arrays


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m ddpm_ip_jax.evaluation.convert_inception",
      description="Convert pytorch-fid's FID Inception weights (.pth) to an .npz read without torch.")
  parser.add_argument("--input", required=True, help=f"the user-supplied {inception.WEIGHTS_FILE}")
  parser.add_argument("--output", required=True, help="the .npz to write, e.g. inception_fid.npz")
  args = parser.parse_args(argv)
  arrays = convert(args.input, args.output)
  print(f"wrote {args.output}: {len(arrays)} arrays, "
        f"{sum(a.size for a in arrays.values()):,} weights")
  return 0


if __name__ == "__main__":
  sys.exit(main())
