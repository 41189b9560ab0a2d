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
The set-up both reference benchmarks share (flags, imports, the model and diffusion) is in reference_common.py.
Prints one JSON line with the same fields as `python -m ddpm_ip_jax.benchmark`.

`--profile`: one more step under `torch.profiler`, printed as a second JSON line ("reference_profile"): each
operator's own CPU time per step, summed by the kinds `benchmarks/profile_step.py` gives for ours (`KINDS`:
convolutions forward and backward, GroupNorm, attention, dropout, ...), with the top operators. PyTorch's
convolution backward computes the input and filter gradients in one operator, so they are one kind here.
"""
import argparse
import collections
import json
import re
import socket
import statistics
import time

import reference_common

# (kind, pattern of the aten operator's name), first match wins; the rest is "other".
KINDS = (
    ("conv_backward", r"convolution_backward|conv.*backward"),
    ("conv_forward", r"convolution|conv2d|_conv"),
    ("groupnorm", r"group_norm"),
    ("attention", r"bmm|einsum|softmax"),
    ("dropout", r"dropout|bernoulli"),
    ("matmul", r"addmm|\bmm\b|matmul|linear"),
    ("optimizer", r"_foreach|addcdiv|lerp|sqrt|adam"),
    ("elementwise", r"add|mul|sub|div|silu|sigmoid|exp|sum|mean|pow|cat|copy|fill|zero|neg|where|abs|clamp|log"),
)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  reference_common.add_arguments(p, default_batch=128)
  p.add_argument("--steps", type=int, default=10, help="Timed steps after the warm-up ones.")
  p.add_argument("--warmup_steps", type=int, default=2, help="Untimed first steps (allocator, cuDNN autotune).")
  p.add_argument("--profile", action="store_true", help="Also break one more step down by operator kind.")
  args = p.parse_args(argv)
  reference_common.check_arguments(p, args)
  if args.steps < 1 or args.batch_size < 1:
    p.error("--steps and --batch_size must be positive")
  return args


def kind_of(name):
  for kind, pattern in KINDS:
    if re.search(pattern, name):
      return kind
  return "other"


def profile_step(th, step):
  """One step under torch.profiler -> (seconds per kind, top operators by own CPU time)."""
  with th.profiler.profile(activities=[th.profiler.ProfilerActivity.CPU]) as prof:
    step()
  by_kind, ops = collections.Counter(), []
  for event in prof.key_averages():
    seconds = event.self_cpu_time_total / 1e6
    if seconds > 0:
      kind = kind_of(event.key)
      by_kind[kind] += seconds
      ops.append((event.key, round(seconds, 4), kind))
  ops.sort(key=lambda op: -op[1])
  return dict(by_kind), ops[:15]


def main(argv=None):
  args = parse_args(argv)
  th = reference_common.import_torch(args)
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch.distributed as dist  # pylint: disable=import-outside-toplevel
  from guided_diffusion import resample  # pylint: disable=import-outside-toplevel
  from guided_diffusion import train_util  # pylint: disable=import-outside-toplevel

  dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                          init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
  reference_common.silence_logger()
  th.manual_seed(0)
  np.random.seed(0)

  model, diffusion = reference_common.create_model_and_diffusion(args)
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
  peak, kind = reference_common.peak_memory_and_device(th, args.device)
  print(json.dumps({
      "what": "reference_train", "device_kind": kind, "threads": th.get_num_threads(),
      "params": sum(p.numel() for p in model.parameters()), "global_batch": args.batch_size,
      "num_channels": args.num_channels, "dtype": "float16" if args.fp16 else "float32",
      "first_step_s": round(warm[0], 3) if warm else None, "step_s": round(step_s, 5),
      "step_s_min": round(min(times), 5), "step_s_max": round(max(times), 5),
      "images_per_s": round(args.batch_size / step_s, 2), "peak_memory_gb": round(peak / 2**30, 3)}), flush=True)
  if args.profile:
    by_kind, top = profile_step(th, step)
    total = sum(by_kind.values())
    print(json.dumps({
        "what": "reference_profile", "cpu_s_per_step": round(total, 4),
        "seconds_per_step": {k: round(v, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "fraction": {k: round(v / total, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_ops": top}), flush=True)
  dist.destroy_process_group()


if __name__ == "__main__":
  main()
