"""What the two benchmarks of the PyTorch reference (forever208/DDPM-IP) share: reference_pytorch_step.py and
reference_pytorch_sample.py.

Their common flags (--reference_repo, --num_channels, --batch_size, --threads, --device, --fp16) and checks; the
import of torch and of the reference's `guided_diffusion` package with what that package needs on a current
NumPy without MPI; its model and diffusion from its own `create_model_and_diffusion` with the CIFAR-10 flags of
its README (docs/method.md section 2), `--num_channels` aside; the peak memory that both report.

`mpi4py` and `blobfile` are imported by the reference's modules but used only for multi-process setup and
checkpoint files, which the timed calls never touch, so empty stand-in modules are registered for them when they
are not installed; and `np.int` (removed in NumPy 1.24, used by its resample.py) is set back to `int`.
"""
import atexit
import os
import resource
import shutil
import sys
import tempfile
import types


def add_arguments(parser, default_batch):
  """Adds the flags both benchmarks take to the argparse `parser`."""
  parser.add_argument("--reference_repo", required=True, help="Folder holding the reference's guided_diffusion/.")
  parser.add_argument("--num_channels", type=int, default=128, help="Base channels (CIFAR-10 paper model: 128).")
  parser.add_argument("--batch_size", type=int, default=default_batch)
  parser.add_argument("--threads", type=int, default=2,
                      help="torch.set_num_threads on CPU (0: leave torch's default).")
  parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
  parser.add_argument("--fp16", action="store_true", help="The reference's fp16 mode (CUDA only, as in its README).")


def check_arguments(parser, args):
  """Stops with a usage error (`parser.error`) when the shared flags do not make sense."""
  if not os.path.isdir(os.path.join(args.reference_repo, "guided_diffusion")):
    parser.error(f"{args.reference_repo} has no guided_diffusion/ folder: pass the root of the DDPM-IP repository")
  if args.fp16 and args.device != "cuda":
    parser.error("--fp16 needs --device=cuda (the reference's fp16 path is a GPU path)")


def _stub_missing_modules():
  """Registers empty `mpi4py` (with `mpi4py.MPI`) and `blobfile` modules when they are not installed."""
  for name in ("mpi4py", "blobfile"):
    try:
      __import__(name)
    except ImportError:
      sys.modules[name] = types.ModuleType(name)
      if name == "mpi4py":
        sys.modules["mpi4py.MPI"] = sys.modules["mpi4py"].MPI = types.ModuleType("mpi4py.MPI")


def import_torch(args):
  """Makes the reference importable and sets torch up for `args.device` and `args.threads`.

  Args:
    args: the parsed flags (`reference_repo`, `device`, `threads`).

  Returns:
    The `torch` module.
  """
  _stub_missing_modules()
  sys.path.insert(0, os.path.abspath(args.reference_repo))
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch as th  # pylint: disable=import-outside-toplevel
  if not hasattr(np, "int"):
    np.int = int  # resample.py uses the alias that NumPy 1.24 removed
  if args.device == "cuda" and not th.cuda.is_available():
    raise SystemExit("--device=cuda but torch sees no GPU")
  if args.device == "cpu":
    # The reference picks CUDA whenever it is visible; hide it so that --device=cpu means CPU.
    th.cuda.is_available = lambda: False
    if args.threads > 0:
      th.set_num_threads(args.threads)
  return th


def silence_logger():
  """Points the reference's logger at an empty temporary folder (removed at exit) with no outputs.

  Left alone, its first message (the diffusion's "input perturbation is" line) configures it to print to stdout
  and to write into a new /tmp/openai-* folder."""
  from guided_diffusion import logger  # pylint: disable=import-outside-toplevel
  folder = tempfile.mkdtemp(prefix="ddpm_ip_ref_")
  atexit.register(shutil.rmtree, folder, ignore_errors=True)
  logger.configure(dir=folder, format_strs=[])


def create_model_and_diffusion(args, timestep_respacing=""):
  """The reference's model (on `args.device`) and diffusion for CIFAR-10 at `args.num_channels` base channels.

  Args:
    args: the parsed flags (`num_channels`, `fp16`, `device`); `import_torch(args)` and `silence_logger()` must
      have run.
    timestep_respacing: the reference's respacing string ("": all 1000 steps; "100": 100 evenly spaced ones;
      "ddim100": the DDIM striding), handed to its `create_model_and_diffusion` as its scripts hand it.

  Returns:
    (model, diffusion) as the reference builds them; the model's weights are still float32 (its fp16 mode
    converts them later: `MixedPrecisionTrainer` for training, `convert_to_fp16` for sampling).
  """
  from guided_diffusion import script_util  # pylint: disable=import-outside-toplevel
  flags = script_util.model_and_diffusion_defaults()
  flags.update(image_size=32, num_channels=args.num_channels, num_res_blocks=3, num_head_channels=32,
               attention_resolutions="16,8", resblock_updown=True, use_new_attention_order=True, learn_sigma=True,
               dropout=0.3, diffusion_steps=1000, noise_schedule="cosine", use_scale_shift_norm=True,
               rescale_learned_sigmas=True, input_pertub=0.15, use_fp16=args.fp16,
               timestep_respacing=timestep_respacing)
  model, diffusion = script_util.create_model_and_diffusion(**flags)
  model.to(args.device)
  return model, diffusion


def peak_memory_and_device(th, device):
  """(peak bytes, device name): torch's allocator peak on CUDA, this process's peak resident memory on CPU."""
  if device == "cuda":
    return th.cuda.max_memory_allocated(), th.cuda.get_device_name()
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu"
