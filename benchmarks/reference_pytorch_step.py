"""Times one training step of the PyTorch reference (forever208/DDPM-IP) for comparison with our benchmark.

The reference is not part of this repository: fetch it anywhere and point `--reference_repo` at the folder
that holds its `guided_diffusion` package, e.g.

  git clone https://github.com/forever208/DDPM-IP /tmp/DDPM-IP
  python benchmarks/reference_pytorch_step.py --reference_repo=/tmp/DDPM-IP --num_channels=32 --batch_size=8

The model and diffusion come from the reference's own `create_model_and_diffusion` with the CIFAR-10 flags of its
README (docs/method.md section 2), `--num_channels` aside. The timed call is the reference's `TrainLoop.run_step`
on a fixed random batch: forward + backward through `training_losses` (input perturbation included), the
loss-second-moment sampler update, AdamW (through its fp16 `MixedPrecisionTrainer` when `--fp16`), the EMA update
and its logging. Its distributed calls run in a one-process gloo (CPU) or NCCL (GPU) group on localhost.
`mpi4py` and `blobfile` are imported by the reference's modules but used only for multi-process setup and
checkpoint files, which the timed step never touches, so empty stand-in modules are registered for them when they
are not installed; and `np.int` (removed in NumPy 1.24, used by its resample.py) is set back to `int`. Prints one
JSON line with the same fields as `python -m ddpm_ip_jax.benchmark`.
"""
import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
import types


def _stub_missing_modules():
  """Registers empty `mpi4py` (with `mpi4py.MPI`) and `blobfile` modules when they are not installed."""
  for name in ("mpi4py", "blobfile"):
    try:
      __import__(name)
    except ImportError:
      sys.modules[name] = types.ModuleType(name)
      if name == "mpi4py":
        sys.modules["mpi4py.MPI"] = sys.modules["mpi4py"].MPI = types.ModuleType("mpi4py.MPI")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reference_repo", required=True, help="Folder holding the reference's guided_diffusion/.")
  p.add_argument("--num_channels", type=int, default=128, help="Base channels (CIFAR-10 paper model: 128).")
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--steps", type=int, default=10, help="Timed steps after the warm-up ones.")
  p.add_argument("--warmup_steps", type=int, default=2, help="Untimed first steps (allocator, cuDNN autotune).")
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU (0: leave torch's default).")
  p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
  p.add_argument("--fp16", action="store_true", help="The reference's fp16 training (CUDA only, as in its README).")
  args = p.parse_args(argv)
  if not os.path.isdir(os.path.join(args.reference_repo, "guided_diffusion")):
    p.error(f"{args.reference_repo} has no guided_diffusion/ folder: pass the root of the DDPM-IP repository")
  if args.fp16 and args.device != "cuda":
    p.error("--fp16 needs --device=cuda (the reference's fp16 path is a GPU path)")
  if args.steps < 1 or args.batch_size < 1:
    p.error("--steps and --batch_size must be positive")
  return args


def main(argv=None):
  args = parse_args(argv)
  _stub_missing_modules()
  sys.path.insert(0, os.path.abspath(args.reference_repo))
  import numpy as np
  import torch as th
  import torch.distributed as dist
  if not hasattr(np, "int"):
    np.int = int  # resample.py uses the alias that NumPy 1.24 removed
  if args.device == "cuda" and not th.cuda.is_available():
    raise SystemExit("--device=cuda but torch sees no GPU")
  if args.device == "cpu":
    # The reference picks CUDA whenever it is visible; hide it so that --device=cpu means CPU.
    th.cuda.is_available = lambda: False
    if args.threads > 0:
      th.set_num_threads(args.threads)
  from guided_diffusion import logger
  from guided_diffusion import resample
  from guided_diffusion import script_util
  from guided_diffusion import train_util

  dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                          init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
  logger.configure(dir=tempfile.mkdtemp(prefix="ddpm_ip_ref_"), format_strs=[])
  th.manual_seed(0)
  np.random.seed(0)

  # The reference README's CIFAR-10 command (docs/method.md section 2), --num_channels aside.
  flags = script_util.model_and_diffusion_defaults()
  flags.update(image_size=32, num_channels=args.num_channels, num_res_blocks=3, num_head_channels=32,
               attention_resolutions="16,8", resblock_updown=True, use_new_attention_order=True, learn_sigma=True,
               dropout=0.3, diffusion_steps=1000, noise_schedule="cosine", use_scale_shift_norm=True,
               rescale_learned_sigmas=True, input_pertub=0.15, use_fp16=args.fp16)
  model, diffusion = script_util.create_model_and_diffusion(**flags)
  model.to(args.device)
  loop = train_util.TrainLoop(
      model=model, diffusion=diffusion, data=None, batch_size=args.batch_size, microbatch=-1, lr=1e-4,
      ema_rate="0.9999", log_interval=10**9, save_interval=10**9, resume_checkpoint="", use_fp16=args.fp16,
      schedule_sampler=resample.create_named_schedule_sampler("loss-second-moment", diffusion))
  batch = th.rand(args.batch_size, 3, 32, 32) * 2 - 1  # NCHW in [-1, 1]

  def step():
    t0 = time.perf_counter()
    loop.run_step(batch, {})
    if args.device == "cuda":
      th.cuda.synchronize()
    return time.perf_counter() - t0

  warm = [step() for _ in range(args.warmup_steps)]
  times = [step() for _ in range(args.steps)]
  step_s = statistics.median(times)
  if args.device == "cuda":
    peak = th.cuda.max_memory_allocated()
    kind = th.cuda.get_device_name()
  else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kind = "cpu"
  print(json.dumps({
      "what": "reference_train", "device_kind": kind, "threads": th.get_num_threads(),
      "params": sum(p.numel() for p in model.parameters()), "global_batch": args.batch_size,
      "num_channels": args.num_channels, "dtype": "float16" if args.fp16 else "float32",
      "first_step_s": round(warm[0], 3) if warm else None, "step_s": round(step_s, 5),
      "step_s_min": round(min(times), 5), "step_s_max": round(max(times), 5),
      "images_per_s": round(args.batch_size / step_s, 2), "peak_memory_gb": round(peak / 2**30, 3)}), flush=True)
  dist.destroy_process_group()


if __name__ == "__main__":
  main()
