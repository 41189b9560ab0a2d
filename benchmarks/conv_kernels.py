"""The convolution kernels of the CPU step, one at a time: XLA's forward, input-gradient and filter-gradient
convolutions at the CIFAR-10 UNet's level shapes, the filter gradient summed over batch chunks
(`ddpm_ip_jax/models/conv.py`), and PyTorch's (oneDNN) kernels at the same shapes; then the UNet's forward and
backward with the chunked filter gradient against without, alternating in one process.

  taskset -c 0 python benchmarks/conv_kernels.py [--batch=16] [--channels=64] [--repeats=10] [--network_pairs=3] \
      [--config=configs/cifar10.py]

Run it on one core (taskset) to compare per-core kernels: XLA:CPU runs an op on one thread, torch is set to one.
Prints one JSON line per measurement: GFLOP/s (2 x multiply-adds / the best of `repeats` calls) or seconds.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def best_seconds(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def jax_kernels(batch, size, channels, repeats):
  import jax  # pylint: disable=import-outside-toplevel
  from jax import lax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from ddpm_ip_jax.models import conv  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, size, size, channels)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, channels, channels)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((batch, size, size, channels)), jnp.float32)
  kwargs = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  flops = 2 * batch * size * size * channels * channels * 9

  def run(fn):
    return flops / best_seconds(lambda: jax.block_until_ready(fn(x, w, g)), repeats) / 1e9

  out = {"forward": run(jax.jit(lambda x, w, g: lax.conv_general_dilated(x, w, **kwargs))),
         "input_grad": run(jax.jit(lambda x, w, g: jax.vjp(
             lambda x_: lax.conv_general_dilated(x_, w, **kwargs), x)[1](g)[0])),
         "filter_grad": run(jax.jit(lambda x, w, g: jax.vjp(
             lambda w_: lax.conv_general_dilated(x, w_, **kwargs), w)[1](g)[0]))}
  default = conv.FILTER_GRAD_CHUNK_BYTES
  try:
    for images in (1, 2, 4, 8):
      if images < batch:
        conv.FILTER_GRAD_CHUNK_BYTES = images * size * size * 2 * channels * 4  # read when traced
        out[f"filter_grad_chunks_of_{images}"] = run(jax.jit(lambda x, w, g: jax.vjp(
            lambda w_: conv.conv_general_dilated(x, w_, **kwargs), w)[1](g)[0]))
  finally:
    conv.FILTER_GRAD_CHUNK_BYTES = default  # the network comparison below chunks by the default
  return out


def torch_kernels(batch, size, channels, repeats, channels_last):
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(1)
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  x = torch.randn(batch, channels, size, size).to(memory_format=memory_format)
  w = torch.randn(channels, channels, 3, 3).to(memory_format=memory_format)
  g = torch.nn.functional.conv2d(x, w, padding=1)
  flops = 2 * batch * size * size * channels * channels * 9

  def backward(mask):
    return lambda: torch.ops.aten.convolution_backward(g, x, w, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1,
                                                       mask)

  return {name: flops / best_seconds(fn, repeats) / 1e9 for name, fn in (
      ("forward", lambda: torch.nn.functional.conv2d(x, w, padding=1)),
      ("input_grad", backward((True, False, False))), ("filter_grad", backward((False, True, False))))}


def network_pairs(config_path, batch, channels, pairs):
  """The UNet's forward and backward (dropout on), the filter gradient chunked against whole, alternating."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from ddpm_ip_jax import models  # pylint: disable=import-outside-toplevel
  from ddpm_ip_jax.models import conv  # pylint: disable=import-outside-toplevel

  spec = importlib.util.spec_from_file_location("network_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.model_channels = channels
  config.model.dtype = "float32"
  model = models.create_model(config)
  params = models.init_params(model, jax.random.key(0))
  size, in_channels = config.model.image_size, config.model.in_channels
  x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, in_channels)), jnp.float32)
  t = jnp.arange(batch, dtype=jnp.int32) * (1000 // batch)
  default = conv.FILTER_GRAD_CHUNK_BYTES
  steps = {}
  for name, chunk_bytes in (("whole", 1 << 60), ("chunked", default)):
    conv.FILTER_GRAD_CHUNK_BYTES = chunk_bytes  # read when the step is traced
    loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.key(1)}) ** 2)
    steps[name] = jax.jit(jax.grad(loss))
    jax.block_until_ready(steps[name](params))
  conv.FILTER_GRAD_CHUNK_BYTES = default
  times = {name: [] for name in steps}
  for _ in range(pairs):
    for name, step in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step(params))
      times[name].append(time.perf_counter() - start)
  return {f"{name}_s": sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=16, help="images (per device in the step)")
  parser.add_argument("--channels", type=int, default=64, help="base channels of the CIFAR-10 UNet")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--network_pairs", type=int, default=3, help="0: skip the whole-network comparison")
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "cifar10.py"),
                      help="the network of the whole-network comparison (its model section, at --channels)")
  args = parser.parse_args()
  sys.path.insert(0, REPO)
  mc = args.channels
  for size, channels in ((32, mc), (16, 2 * mc), (8, 2 * mc), (4, 2 * mc)):
    shape = {"batch": args.batch, "size": size, "channels": channels}
    print(json.dumps({"what": "jax_gflops", **shape, **{k: round(v, 1) for k, v in jax_kernels(
        args.batch, size, channels, args.repeats).items()}}), flush=True)
    try:
      for channels_last in (False, True):
        print(json.dumps({"what": "torch_gflops", "layout": "NHWC" if channels_last else "NCHW", **shape,
                          **{k: round(v, 1) for k, v in torch_kernels(
                              args.batch, size, channels, args.repeats, channels_last).items()}}), flush=True)
    except ImportError:
      print(json.dumps({"what": "torch_gflops", "skipped": "torch is not installed"}), flush=True)
  if args.network_pairs:
    print(json.dumps({"what": "unet_forward_backward", "batch": args.batch, "channels": mc,
                      **network_pairs(args.config, args.batch, mc, args.network_pairs)}), flush=True)


if __name__ == "__main__":
  main()
