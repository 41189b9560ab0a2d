"""Where the training step's time and memory go: a per-kind breakdown of one traced step, the compiled memory,
XLA's FLOP count against the analytic model FLOPs, and this CPU's measured float32 peak.

  python benchmarks/profile_step.py --config=configs/cifar10.py --config.model.model_channels=64 \
      --config.training.batch_size=32 --config.model.dtype=float32 [--steps=2] [--out=profile_out]

The step is built exactly as training builds it (`benchmark_lib.build_benchmark_step`). Prints one JSON line:

- `memory_per_device`: `compiled.memory_analysis()` of the pmapped step (arguments, outputs, temporaries,
  generated code), beside the process's peak RSS after compiling and after the traced steps;
- `flops`: `model_flops_per_image` counted from the network's convolutions, matmuls and attention products
  (multiply-adds x 2, forward; x 3 for forward + backward), against `xla_flops_per_image`
  (`compiled.cost_analysis()`, the whole step per image); their ratio shows recomputation or wasted work;
- `peak_f32_gflops`: a 2048^3 float32 matmul on one device, the best of 5; `model_gflops` and `utilisation`
  of the step against `devices x` that peak;
- `breakdown`: the traced step's device time by kind (forward / backward-data / backward-filter convolutions,
  attention, other matmuls, GroupNorm, dropout, the other elementwise and reduction work of the network, AdamW +
  EMA + losses + sampler, transposes, collectives, other), in seconds per step summed over the device threads,
  and as fractions (kinds come from the optimized HLO: fusion contents and JAX's op_name metadata).

On the CPU it needs `--xla_cpu_enable_xprof_traceme=true` in XLA_FLAGS (set here when missing) for the
per-op trace; the trace is written under `--out` (open it in Perfetto or TensorBoard's profile plugin).
"""
import collections
import gzip
import json
import os
import re
import resource
import sys
import time

if "--xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddpm_ip_jax import benchmark_lib  # noqa: E402

FLAGS = flags.FLAGS


def peak_rss_gb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measured_peak_gflops(n=2048, repeats=5):
  """float32 GFLOP/s of an n^3 matmul on the first device (best of `repeats`)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best / 1e9


def analytic_forward_flops(model, params, batch=1):
  """2 x multiply-adds of the forward pass per `batch` images: every convolution and dense layer (from the jaxpr
  of the forward pass: the lhs/rhs shapes of conv_general_dilated and dot_general), attention products included."""
  x = jnp.zeros((batch, model.image_size, model.image_size, model.in_channels), jnp.float32)
  t = jnp.zeros((batch,), jnp.int32)
  y = jnp.zeros((batch,), jnp.int32) if model.num_classes > 0 else None
  jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, t, y=y))(params)
  total = 0

  def walk(jpr):
    nonlocal total
    for eqn in jpr.eqns:
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)
      if eqn.primitive.name == "conv_general_dilated":
        out = eqn.outvars[0].aval.shape
        rhs = eqn.invars[1].aval.shape
        dn = eqn.params["dimension_numbers"]
        kernel_in = rhs[dn.rhs_spec[1]]
        window = int(np.prod([rhs[d] for d in dn.rhs_spec[2:]]))
        total += 2 * int(np.prod(out)) * kernel_in * window
      elif eqn.primitive.name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        contracted = int(np.prod([lhs[d] for d in lc]))
        total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * contracted

  walk(jaxpr.jaxpr)
  return total / batch


# Kinds of ops, from the optimized HLO (fusion contents and the op_name metadata JAX writes).
def classify_instructions(hlo_text):
  """{instruction name: kind} for every instruction of the optimized module that can run as its own kernel."""
  computations = {}
  current = None
  for line in hlo_text.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      current = m.group(1)
      computations[current] = []
      continue
    if current is not None and line.startswith("  "):
      computations[current].append(line)
  kinds = {}
  for lines in computations.values():
    for line in lines:
      m = re.match(r"\s+(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", line)
      if not m:
        m = re.match(r"\s+(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\(", line)
      if not m:
        continue
      name, opcode = m.groups()
      text = line
      if opcode == "fusion":
        called = re.search(r"calls=%?([\w.\-]+)", line)
        if called and called.group(1) in computations:
          text = line + "\n" + "\n".join(computations[called.group(1)])
      kinds[name] = _kind(opcode, text)
  return kinds


def _kind(opcode, text):
  op_names = " ".join(re.findall(r'op_name="([^"]*)"', text))
  backward = "transpose(" in op_names
  if opcode in ("all-reduce", "all-gather", "all-reduce-start", "all-reduce-done", "collective-permute",
                "reduce-scatter", "all-to-all"):
    return "collectives"
  if " convolution(" in text or opcode == "convolution":
    # XLA:CPU runs every convolution in the canonical NHWC x HWIO form; the filter gradient is the one whose
    # output has the kernel's tiny spatial size (1x1 or 3x3) while its input has the image's. The others are
    # told apart by the op_name of JAX's transpose (the backward pass), where the fusion kept it.
    conv = re.search(r"= f32\[(\d+),(\d+),(\d+),(\d+)\]\S* convolution\(", text)
    if conv and int(conv.group(2)) <= 3 and int(conv.group(3)) <= 3:
      return "conv_backward_filter"
    return "conv_backward_data" if backward else "conv_forward"
  if "dot_product_attention" in op_names or "bhts" in op_names or "softmax" in op_names:
    return "attention"  # the two attention products and the softmax (forward and backward)
  if " dot(" in text or opcode == "dot":
    return "matmul"
  if "Dropout" in op_names:
    return "dropout"  # the masks' random bits (threefry) and their products, forward and backward
  # The UNet's GroupNorms are named after the reference's modules: in_layers_0, out_layers_0, norm, out_0.
  if re.search(r"/(in_layers_0|out_layers_0|norm|out_0)/", op_names):
    return "groupnorm"
  if op_names and "UNet" not in op_names and opcode == "fusion":
    return "optimizer_loss_sampler"  # AdamW + EMA, the losses, the timestep sampler: outside the network
  if opcode in ("transpose", "copy") or " transpose(" in text and "fusion" not in opcode:
    return "transpose_copy"
  if opcode == "fusion" or opcode in ("add", "multiply", "select", "reduce", "broadcast", "exponential"):
    return "elementwise_reduce"
  return "other"


def breakdown_from_trace(trace_dir, kinds, steps):
  """Seconds per step by kind, summed over device threads, from the Perfetto trace under `trace_dir`."""
  paths = [os.path.join(root, f) for root, _, files in os.walk(trace_dir) for f in files
           if f.endswith(".trace.json.gz") or f == "perfetto_trace.json.gz"]
  if not paths:
    return {"error": f"no trace file under {trace_dir}"}
  with gzip.open(sorted(paths)[-1]) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  by_kind = collections.Counter()
  by_op = collections.Counter()
  unmatched = collections.Counter()
  for e in events:
    if e.get("ph") != "X":
      continue
    name = e.get("name", "")
    base = name.split(":")[0].strip()
    kind = kinds.get(base)
    if kind is None:
      unmatched[base] += e.get("dur", 0)
      continue
    by_kind[kind] += e["dur"] / 1e6
    by_op[base] += e["dur"] / 1e6
  total = sum(by_kind.values())
  return {"seconds_per_step": {k: round(v / steps, 4) for k, v in by_kind.most_common()},
          "fraction": {k: round(v / total, 3) for k, v in by_kind.most_common()} if total else {},
          "total_device_s_per_step": round(total / steps, 4),
          "top_ops": [(k, round(v / steps, 4), kinds[k]) for k, v in by_op.most_common(15)],
          "unmatched_top": [(k, round(v / 1e6 / steps, 4)) for k, v in unmatched.most_common(8)]}


def main(argv):
  del argv
  config = FLAGS.config
  out = FLAGS.out
  os.makedirs(out, exist_ok=True)
  built = benchmark_lib.build_benchmark_step(config)
  state, batch, p_step = built["state"], built["batch"], built["p_step"]
  t0 = time.perf_counter()
  compiled = p_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  rss_after_compile = peak_rss_gb()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = compiled.as_text()
  with open(os.path.join(out, "step_optimized.hlo.txt"), "w") as f:
    f.write(hlo)
  kinds = classify_instructions(hlo)
  for _ in range(2):  # warm: allocator, page mappings
    state, _ = p_step(state, batch)
  jax.block_until_ready(state)
  trace_dir = os.path.join(out, "trace")
  t0 = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(FLAGS.steps):
      state, _ = p_step(state, batch)
    jax.block_until_ready(state)
  traced_step_s = (time.perf_counter() - t0) / FLAGS.steps
  n_dev = jax.local_device_count()
  global_batch = config.training.batch_size
  per_device = global_batch // jax.device_count()
  forward = analytic_forward_flops(built["model"], jax.tree.map(lambda x: x[0], state.params))
  xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
  peak = measured_peak_gflops()
  result = {
      "what": "profile_step", "devices": n_dev, "global_batch": global_batch, "params": built["params"],
      "model_channels": config.model.model_channels, "dtype": config.model.dtype, "compile_s": round(compile_s, 1),
      "traced_step_s": round(traced_step_s, 4),
      "memory_per_device": {k: round(getattr(mem, k) / 2**20, 1) for k in (
          "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
          "generated_code_size_in_bytes")} if mem is not None else None,
      "memory_unit": "MiB",
      "peak_rss_gb_after_compile": round(rss_after_compile, 2), "peak_rss_gb_after_steps": round(peak_rss_gb(), 2),
      "flops": {"model_forward_per_image": forward, "model_flops_per_image": 3 * forward,
                "xla_flops_per_image": xla_flops / per_device if xla_flops else None,
                "xla_over_model": round(xla_flops / per_device / (3 * forward), 3) if xla_flops else None},
      "peak_f32_gflops_one_device": round(peak, 1),
      "model_gflops": round(3 * forward * global_batch / traced_step_s / 1e9, 1),
      "utilisation": round(3 * forward * global_batch / traced_step_s / 1e9 / (peak * n_dev), 3),
      "breakdown": breakdown_from_trace(trace_dir, kinds, FLAGS.steps),
  }
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
  flags.mark_flag_as_required("config")
  flags.DEFINE_integer("steps", 2, "Steps to trace.", lower_bound=1)
  flags.DEFINE_string("out", "profile_out", "Folder for the trace and the optimized HLO.")
  app.run(main)
