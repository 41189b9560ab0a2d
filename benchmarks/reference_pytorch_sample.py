"""Times the PyTorch reference's (forever208/DDPM-IP) own sampler for comparison with our sampler benchmark.

The reference is not part of this repository: fetch it anywhere and point `--reference_repo` at the folder
that holds its `guided_diffusion` package, e.g.

  git clone https://github.com/forever208/DDPM-IP /tmp/DDPM-IP
  python benchmarks/reference_pytorch_sample.py --reference_repo=/tmp/DDPM-IP --num_channels=32 --batch_size=8 \
      --timestep_respacing=100

The timed call is what the reference's scripts/image_sample.py runs for one batch: `p_sample_loop` (or
`ddim_sample_loop` with `--use_ddim`) of the diffusion that its `create_model_and_diffusion` builds with
`--timestep_respacing`, on a random-weight model in eval mode, `clip_denoised=True`, no class labels. The model
and diffusion flags are the CIFAR-10 ones of reference_pytorch_step.py (reference_common.py). Random weights time
the same as trained ones. One untimed chain runs first (allocator, cuDNN autotune; `--no_warmup` skips it), then
one timed chain. The reference's loops already run each step under `torch.no_grad`; the whole chain is wrapped in
it as well. Prints one JSON line with the fields of `python -m ddpm_ip_jax.benchmark`'s sampler lines.
"""
import argparse
import json
import time

import reference_common


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  reference_common.add_arguments(p, default_batch=128)
  p.add_argument("--timestep_respacing", default="100",
                 help="The reference's respacing of the 1000 steps: '100' (100 evenly spaced steps), '250', "
                      "'ddim50', '' (all 1000), or sections such as '10,15,20'.")
  p.add_argument("--use_ddim", action="store_true", help="Its DDIM sampler (eta 0), as image_sample --use_ddim.")
  p.add_argument("--no_warmup", action="store_true", help="Time the first chain (no untimed chain before it).")
  args = p.parse_args(argv)
  reference_common.check_arguments(p, args)
  if args.batch_size < 1:
    p.error("--batch_size must be positive")
  return args


def main(argv=None):
  args = parse_args(argv)
  th = reference_common.import_torch(args)
  reference_common.silence_logger()
  th.manual_seed(0)
  model, diffusion = reference_common.create_model_and_diffusion(args, args.timestep_respacing)
  if args.fp16:
    model.convert_to_fp16()
  model.eval()
  loop = diffusion.ddim_sample_loop if args.use_ddim else diffusion.p_sample_loop
  shape = (args.batch_size, 3, 32, 32)

  def chain():
    t0 = time.perf_counter()
    with th.no_grad():
      out = loop(model, shape, clip_denoised=True, model_kwargs={})
    if args.device == "cuda":
      th.cuda.synchronize()
    assert tuple(out.shape) == shape
    return time.perf_counter() - t0

  first_s = None if args.no_warmup else chain()
  chain_s = chain()
  steps = diffusion.num_timesteps  # after respacing
  peak, kind = reference_common.peak_memory_and_device(th, args.device)
  print(json.dumps({
      "what": "reference_sample", "sampler": "ddim" if args.use_ddim else "ancestral", "device_kind": kind,
      "threads": th.get_num_threads(), "params": sum(p.numel() for p in model.parameters()),
      "timestep_respacing": args.timestep_respacing, "steps": steps, "batch": args.batch_size,
      "num_channels": args.num_channels, "dtype": "float16" if args.fp16 else "float32",
      "first_chain_s": round(first_s, 4) if first_s is not None else None, "chain_s": round(chain_s, 4),
      "samples_per_s": round(args.batch_size / chain_s, 3),
      "network_evals_per_s": round(args.batch_size * steps / chain_s, 1),
      "peak_memory_gb": round(peak / 2**30, 3)}), flush=True)


if __name__ == "__main__":
  main()
