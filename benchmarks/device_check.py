"""The one-shot device check behind `benchmarks/device_check.sh` (what it measures: docs/performance.md,
"Device check").

The driver (`--out=DIR`) never imports JAX itself: every part runs in its own process, so that each one gets the
whole accelerator (XLA reserves most of a GPU's memory when it starts, PyTorch would find none left), a crash or a
hang costs one part, not the check, and `DIR/device_check.json` is rewritten after every part, so whatever finished
is kept if the machine is taken away. TensorFlow and tensorflow_datasets are blocked from importing in every JAX
part: the core has to run without them (a GPU machine may have neither). In the rehearsal, every package the GPU
machine does not have is blocked too (`guard_imports`), so that a test or part that needs one fails on the CPU
first.

Parts, in order: `env` (versions, devices), `parity` (the golden-number tests of tests/ on this backend, float32
at the highest matmul precision; the bfloat16 ones within their tolerances), `parity_errors` (the toy UNet's and
the ten-step chains' largest errors against the reference's outputs, at the highest and at the default matmul
precision and in bfloat16), `reference_fp16` / `reference_fp32` (the PyTorch reference's own training step,
benchmarks/reference_pytorch_step.py, when `--reference_repo` is given and torch is installed), `train` (the
paper's CIFAR-10 model in bfloat16, batch 128, 10 steps per call, with its model FLOP utilisation), `sample`
(the whole-chain sampler at 100 and 1000 respaced steps, batch 256), then `summary` (JAX / reference images/s
and the targets). `--rehearse` runs the same parts on the CPU with the toy config (configs/test.py) and small
sizes, so that the script is known to work before any device time is spent.
"""
import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALWAYS_BLOCKED = ("tensorflow", "tensorflow_datasets")

# What a bare GPU machine has (distribution names): its JAX stack (with the CUDA plugin), flax, optax, orbax,
# absl, etils, numpy, scipy, pillow, torch and pytest, and the wheels of benchmarks/fetch_device_wheels.sh. In the
# rehearsal, the JAX parts can import only these, what they require (transitively, as installed), the standard
# library and the repository's own modules; everything else is blocked as if it were not installed.
DEVICE_DISTRIBUTIONS = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
                        "jax-cuda13-pjrt", "flax", "optax", "orbax-checkpoint", "absl-py", "etils", "numpy", "scipy",
                        "pillow", "torch", "pytest", "ml_collections", "PyYAML")
# The environment that carries the guard to the parts: the importable top-level modules (comma-separated; unset
# on the device, where only ALWAYS_BLOCKED is blocked), and a file to which each refused top-level name is added.
ALLOWED_ENV = "DDPM_IP_JAX_DEVICE_IMPORTS"
BLOCKED_LOG_ENV = "DDPM_IP_JAX_BLOCKED_IMPORTS"

# The tests that compare against the reference's golden numbers (tests/data/reference) or state a bfloat16
# tolerance, and the paper models' parameter counts.
PARITY_TESTS = (
    "tests/test_unet.py::test_paper_parameter_counts",
    "tests/test_unet.py::test_low_precision_compute_close_to_float32_with_float32_params",
    "tests/test_diffusion.py::test_schedule_tables_match_reference_float64",
    "tests/test_diffusion.py::test_respacing_matches_reference",
    "tests/test_diffusion.py::test_losses_match_reference_with_fixed_model_output",
    "tests/test_sampling.py::test_p_mean_variance_per_step_matches_reference",
    "tests/test_sampling.py::test_ten_step_chains_match_reference",
    "tests/test_sampling.py::test_unet_loss_case_matches_reference",
    "tests/test_convert.py::test_toy_checkpoint_matches_the_reference_output",
    "tests/test_mixed_precision.py",
    "tests/test_train.py::test_one_step_feeds_the_perturbed_input_and_regresses_onto_eps",
)

# Dense bfloat16 peak FLOP/s per chip, from the vendors' data sheets (substring of `device_kind`, lower case).
PEAK_BF16_FLOPS = (
    ("h200", 989e12), ("h100 pcie", 756e12), ("h100", 989e12), ("gh200", 989e12), ("a100", 312e12),
    ("l40s", 362e12), ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v4", 275e12),
)

# What the parts run at: on the device, and in the CPU rehearsal.
SETTINGS = {
    "device": {"config": "configs/cifar10.py", "batch": 128, "steps_per_call": 10, "timed_calls": 5,
               "dtype": "bfloat16", "respacings": (100, 1000), "sample_batch": 256,
               "reference": {"num_channels": 128, "batch_size": 128, "steps": 10, "warmup_steps": 3},
               "reference_dtypes": ("fp16", "fp32")},
    "rehearse": {"config": "configs/test.py", "batch": 8, "steps_per_call": 2, "timed_calls": 2,
                 "dtype": "bfloat16", "respacings": (5, 10), "sample_batch": 4,
                 "reference": {"num_channels": 32, "batch_size": 8, "steps": 2, "warmup_steps": 1},
                 "reference_dtypes": ("fp32",)},
}

# Seconds each part may take (the whole check is meant to finish within 8 minutes on one H100/H200).
TIMEOUTS = {"env": 60, "parity": 150, "parity_errors": 90, "reference_fp16": 90, "reference_fp32": 90,
            "train": 240, "sample": 150}

# The targets: bfloat16 JAX at least 1.5x the reference's fp16 images/s, at least 40% MFU.
TARGET_SPEEDUP, TARGET_MFU = 1.5, 0.40


def device_allowlist(roots=DEVICE_DISTRIBUTIONS):
  """The top-level modules that the GPU machine's packages bring, computed from what is installed here.

  Follows each installed root's requirements (with the extras they name, markers evaluated for this Python),
  then the requirements of those, and so on; roots that are not installed are left out.

  Args:
    roots: distribution names.

  Returns:
    (sorted top-level module names, sorted names of the installed distributions they come from).
  """
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  from packaging.requirements import Requirement  # pylint: disable=import-outside-toplevel  # pytest needs it
  from packaging.utils import canonicalize_name  # pylint: disable=import-outside-toplevel
  modules_of = collections.defaultdict(set)
  for module, dists in metadata.packages_distributions().items():
    for dist in dists:
      modules_of[canonicalize_name(dist)].add(module)
  found, seen, todo = set(), set(), [(canonicalize_name(r), ()) for r in roots]
  while todo:
    name, extras = todo.pop()
    if (name, extras) in seen:
      continue
    seen.add((name, extras))
    try:
      requires = metadata.distribution(name).requires or ()
    except metadata.PackageNotFoundError:
      continue
    found.add(name)
    for line in requires:
      req = Requirement(line)
      if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or ("",)):
        todo.append((canonicalize_name(req.name), tuple(sorted(req.extras))))
  modules = set().union(*(modules_of[d] for d in found)) - set(ALWAYS_BLOCKED)
  return sorted(modules), sorted(found)


class _ImportGuard:
  """A meta-path finder that makes the refused top-level modules look not installed."""

  def __init__(self, refused, log_path):
    self.refused, self.log_path, self.logged = refused, log_path, set()

  def record(self, top):
    if self.log_path and top not in self.logged:
      self.logged.add(top)
      with open(self.log_path, "a") as f:
        f.write(top + "\n")

  def find_spec(self, name, path=None, target=None):
    del path, target
    top = name.partition(".")[0]
    if not self.refused(top):
      return None
    self.record(top)
    raise ModuleNotFoundError(f"No module named {name!r} (blocked: not on the GPU machine)", name=name)


def _refuser(allowed):
  """refused(top) for guard_imports: ALWAYS_BLOCKED, and where `allowed` is not None, every module that is
  neither in it, nor in the standard library (its names, its folders), nor the repository's, nor imported."""
  import importlib.machinery  # pylint: disable=import-outside-toplevel
  import sysconfig  # pylint: disable=import-outside-toplevel
  if allowed is None:
    return frozenset(ALWAYS_BLOCKED).__contains__
  keep = (set(allowed) | set(sys.stdlib_module_names) | {"ddpm_ip_jax"}
          | {m.partition(".")[0] for m in sys.modules}) - set(ALWAYS_BLOCKED)
  roots = {os.path.realpath(p) for p in (REPO, *(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")))}
  answers = {}

  def ours(location):  # in the standard library's folders or the repository, outside any site-packages in them
    path = os.path.realpath(location)
    parts = path.split(os.sep)
    return ("site-packages" not in parts and "dist-packages" not in parts
            and any(path.startswith(root + os.sep) for root in roots))

  def refused(top):
    if top in keep:
      return False
    if top not in answers:
      spec = None if top in ALWAYS_BLOCKED else importlib.machinery.PathFinder.find_spec(top)
      # A module found nowhere is left to fail as it would anyway (jax probes for plugins that way).
      locations = [] if spec is None else [*(spec.submodule_search_locations or ()),
                                          *([spec.origin] if spec.has_location else [])]
      answers[top] = top in ALWAYS_BLOCKED or (spec is not None and not all(map(ours, locations)))
    return answers[top]

  return refused


def guard_imports():
  """Blocks in this process what the GPU machine may lack: importing it raises ModuleNotFoundError and
  `importlib.util.find_spec` answers None (libraries such as etils ask that before choosing a backend).

  Always tensorflow and tensorflow_datasets (the core has to run without them); where ALLOWED_ENV is set (the
  rehearsal) every installed top-level module that is not in it, in the standard library, in the repository or
  already imported. Each refused name is added to the file BLOCKED_LOG_ENV names, if set.
  """
  import importlib.util  # pylint: disable=import-outside-toplevel
  allowed = os.environ.get(ALLOWED_ENV)
  refused = _refuser(None if allowed is None else filter(None, allowed.split(",")))
  guard = _ImportGuard(refused, os.environ.get(BLOCKED_LOG_ENV))
  sys.meta_path.insert(0, guard)
  real_find_spec = importlib.util.find_spec

  def find_spec(name, package=None):
    top = (importlib.util.resolve_name(name, package) if name.startswith(".") else name).partition(".")[0]
    if top not in sys.modules and refused(top):
      guard.record(top)
      return None
    return real_find_spec(name, package)

  importlib.util.find_spec = find_spec


# ---------------------------------------------------------------------------------------------------------------
# The parts that run JAX (each in its own process: `--part=NAME`; prints one JSON object on its last line)
# ---------------------------------------------------------------------------------------------------------------

def _load_config(settings):
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("device_check_config", os.path.join(REPO, settings["config"]))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.dtype = settings["dtype"]
  config.training.batch_size = settings["batch"]
  config.training.steps_per_call = settings["steps_per_call"]
  return config


def part_env(settings):
  del settings
  import jax  # pylint: disable=import-outside-toplevel
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  versions = {}
  for dist in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint",
               "numpy", "ml_collections", "torch"):
    try:
      versions[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
      pass
  devices = jax.local_devices()
  return {"python": platform.python_version(), "versions": versions, "backend": jax.default_backend(),
          "platform": devices[0].platform,
          "device_count": len(devices), "device_kind": devices[0].device_kind,
          "tensorflow_importable": _importable("tensorflow")}


def _importable(name):
  try:
    __import__(name)
    return True
  except ImportError:
    return False


def part_parity(settings):
  """The golden-number tests (PARITY_TESTS) under pytest, in this process so that the import guard holds in them:
  pytest's exit code and the outcome of each test that ran, or of each module that failed to be collected."""
  del settings
  import pytest  # pylint: disable=import-outside-toplevel
  results = {}

  class _Collect:

    def pytest_collectreport(self, report):
      if report.failed:
        results[report.nodeid] = "failed"

    def pytest_runtest_logreport(self, report):
      if report.when == "call" or report.outcome != "passed":
        results[report.nodeid] = report.outcome

  code = pytest.main(["-q", "-p", "no:cacheprovider", *PARITY_TESTS], plugins=[_Collect()])
  return {"exit_code": int(code), "results": results}


def part_parity_errors(settings):
  """Largest absolute errors against the reference's outputs: the toy UNet (unet_io) and the ten-step chains."""
  del settings
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from ddpm_ip_jax import diffusion, reference_checkpoints, sampling  # pylint: disable=import-outside-toplevel
  from ddpm_ip_jax.models import create_model  # pylint: disable=import-outside-toplevel
  ref = os.path.join(REPO, "tests", "data", "reference")
  with open(os.path.join(ref, "unet_config.json")) as f:
    flags = json.load(f)
  io, chains = np.load(os.path.join(ref, "unet_io.npz")), np.load(os.path.join(ref, "sampling.npz"))
  nhwc = lambda a: jnp.asarray(np.transpose(a, (0, 2, 3, 1)))  # noqa: E731
  nchw = lambda a: np.transpose(np.asarray(a, np.float32), (0, 3, 1, 2))  # noqa: E731
  out = {}
  for precision in ("highest", "default"):
    with jax.default_matmul_precision(precision):
      for dtype in ("float32", "bfloat16"):
        config = reference_checkpoints.config_from_reference_flags(flags)
        config.model.dtype = dtype
        params = reference_checkpoints.load_reference_checkpoint(os.path.join(ref, "unet_state_dict.npz"), config)
        model = create_model(config)
        y = jax.jit(model.apply)({"params": params}, nhwc(io["x"]), jnp.asarray(io["t"]))
        out[f"unet_{dtype}_{precision}"] = float(np.abs(nchw(y) - io["out"]).max())
      # The chains use the sampling fixtures' variant of the toy (cosine schedule, rescaled learned sigmas).
      config = reference_checkpoints.config_from_reference_flags(
          {**flags, "noise_schedule": "cosine", "rescale_learned_sigmas": True})
      params = reference_checkpoints.load_reference_checkpoint(os.path.join(ref, "unet_state_dict.npz"), config)
      model = create_model(config)
      model_fn = lambda x, t, m=model, p=params: m.apply({"params": p}, x, t)  # noqa: E731
      for case in ("10_eta0.0", "ddim10_eta0.0", "ddim10_eta0.5"):
        spec, eta = case.split("_")[0], float(case.split("eta")[1])
        diff = diffusion.create_diffusion(config.diffusion, learn_sigma=True, timestep_respacing=spec)
        noise = jnp.asarray(np.transpose(chains[f"{case}/step_noise"], (0, 1, 3, 4, 2)))
        x_T = nhwc(chains["x_T"])
        run = jax.jit(lambda key, n, x, d=diff, s=spec, e=eta: sampling.sample_loop(
            d, model_fn, key, x.shape, sampler="ancestral" if s == "10" else "ddim", eta=e, step_noise=n, x_T=x))
        sample = run(jax.random.key(0), noise, x_T)
        out[f"chain_{case}_{precision}"] = float(np.abs(nchw(sample) - chains[f"{case}/sample"]).max())
  return out


def _peak_flops(device_kind):
  kind = device_kind.lower()
  return next((peak for name, peak in PEAK_BF16_FLOPS if name in kind), None)


def _flops(compiled):
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0] if cost else {}
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def part_train(settings):
  """benchmark_lib.benchmark_training of the config, plus the model FLOPs per image and the MFU.

  Model FLOPs per image: 3x the forward pass's FLOPs as XLA counts them (the backward pass costs twice the
  forward; the usual convention for MFU), measured on one compiled forward pass at the per-device batch."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from ddpm_ip_jax import benchmark_lib, models  # pylint: disable=import-outside-toplevel
  config = _load_config(settings)
  result = benchmark_lib.benchmark_training(config, settings["timed_calls"])
  model = models.create_model(config)
  per_device = config.training.batch_size // jax.device_count()
  size, channels = config.model.image_size, config.model.in_channels
  params = models.abstract_params(model)  # shapes only (init_params draws on the host)
  x = jax.ShapeDtypeStruct((per_device, size, size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((per_device,), jnp.int32)
  forward = _flops(jax.jit(lambda p, x, t: model.apply({"params": p}, x, t)).lower(params, x, t).compile())
  peak = _peak_flops(result["device_kind"]) if jax.default_backend() != "cpu" else None
  result["model_flops_per_image"] = 3 * forward / per_device if forward else None
  if result["model_flops_per_image"]:
    per_device_flops = result["model_flops_per_image"] * result["pipelined_images_per_s"] / result["devices"]
    result["model_tflops_per_s_per_device"] = round(per_device_flops / 1e12, 2)
    result["peak_bf16_tflops_per_device"] = peak / 1e12 if peak else None
    result["mfu"] = round(per_device_flops / peak, 4) if peak else None
  return result


def part_sample(settings):
  import jax  # pylint: disable=import-outside-toplevel
  from ddpm_ip_jax import benchmark_lib, models  # pylint: disable=import-outside-toplevel
  config = _load_config(settings)
  params = models.init_params(models.create_model(config), jax.random.key(config.seed))
  per_device = max(settings["sample_batch"] // jax.local_device_count(), 1)
  return {"runs": [benchmark_lib.benchmark_sampling(config, params, r, per_device)
                   for r in settings["respacings"]]}


PARTS = {"env": part_env, "parity": part_parity, "parity_errors": part_parity_errors, "train": part_train,
         "sample": part_sample}


# ---------------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------------

def _last_json(text):
  for line in reversed(text.strip().splitlines()):
    if line.startswith("{"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  return None


def _run(name, argv, env, log, timeout):
  """Runs one part as a subprocess, its output appended to the log; returns (status dict, stdout)."""
  t0 = time.perf_counter()
  log.write(f"\n===== {name}: {' '.join(argv)}\n")
  log.flush()
  try:
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    log.write((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
    return {"ok": False, "error": f"timed out after {timeout} s", "seconds": round(time.perf_counter() - t0, 1)}, ""
  log.write(proc.stdout)
  log.write(proc.stderr)
  log.flush()
  status = {"ok": proc.returncode == 0, "seconds": round(time.perf_counter() - t0, 1)}
  if proc.returncode:
    tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
    status["error"] = f"exit code {proc.returncode}: {tail[0][:500]}"
  return status, proc.stdout


def _parity_status(status, out):
  """The parity part's status with passed/failed/skipped counts and the failing test (or module) ids."""
  results = (out or {}).get("results", {})
  counts = {k: sum(v == k for v in results.values()) for k in ("passed", "failed", "skipped")}
  status.update(counts, failures=sorted(k for k, v in results.items() if v == "failed"))
  status["ok"] = status["ok"] and out is not None and out.get("exit_code") == 0 and counts["passed"] > 0
  status["ok"] = status["ok"] and not counts["failed"]
  return status


def _summary(result):
  train = result.get("train", {})
  jax_ips = train.get("pipelined_images_per_s")
  summary = {"jax_images_per_s": jax_ips, "mfu": train.get("mfu")}
  for dtype in ("fp16", "fp32"):
    ref = result.get(f"reference_{dtype}", {})
    if jax_ips and ref.get("images_per_s"):
      summary[f"jax_over_reference_{dtype}"] = round(jax_ips / ref["images_per_s"], 3)
  if "jax_over_reference_fp16" in summary:
    summary["speedup_target_met"] = summary["jax_over_reference_fp16"] >= TARGET_SPEEDUP
  if summary["mfu"] is not None:
    summary["mfu_target_met"] = summary["mfu"] >= TARGET_MFU
  summary["all_parts_ok"] = all(v.get("ok", False) for k, v in result.items()
                                if isinstance(v, dict) and "ok" in v and not v.get("skipped"))
  return summary


def drive(args):
  mode = "rehearse" if args.rehearse else "device"
  settings = SETTINGS[mode]
  os.makedirs(args.out, exist_ok=True)
  json_path = os.path.join(args.out, "device_check.json")
  env = dict(os.environ)
  if args.rehearse:
    env["JAX_PLATFORMS"] = "cpu"
  else:
    env.pop("JAX_PLATFORMS", None)  # the accelerator's plugin decides
  # One device as on a one-GPU machine, also in the rehearsal (the tests' conftest would simulate two CPU ones).
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "force_host_platform_device_count" not in f)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  result = {"mode": mode, "settings": dict(settings), "started": time.strftime("%FT%T%z"),
            "tensorflow_blocked": True, "import_guard": {"always_blocked": list(ALWAYS_BLOCKED)}}
  # The JAX parts' environment: the import guard (guard_imports), in the rehearsal the GPU machine's packages only.
  blocked_log = os.path.join(args.out, ".blocked_imports")
  jax_env = {**env, BLOCKED_LOG_ENV: blocked_log}
  jax_env.pop(ALLOWED_ENV, None)
  if args.rehearse:
    allowed, distributions = device_allowlist()
    jax_env[ALLOWED_ENV] = ",".join(allowed)
    result["import_guard"]["allowlist_distributions"] = distributions
  t_start = time.perf_counter()

  def save():
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(result, f, indent=1, default=str)
    os.replace(tmp, json_path)

  def jax_part(name, part_env=None):
    argv = [sys.executable, os.path.abspath(__file__), f"--part={name}"] + (["--rehearse"] if args.rehearse else [])
    open(blocked_log, "w").close()
    status, stdout = _run(name, argv, part_env or jax_env, log, TIMEOUTS[name])
    with open(blocked_log) as f:
      status["blocked_imports"] = sorted(set(f.read().split()))
    os.remove(blocked_log)
    log.write(f"blocked imports in {name}: {' '.join(status['blocked_imports']) or '(none)'}\n")
    out = _last_json(stdout)
    if name == "parity":
      return _parity_status(status, out)
    if status["ok"] and out is None:
      status.update(ok=False, error="the part printed no JSON result")
    return {**status, **(out or {})}

  with open(os.path.join(args.out, "device_check.log"), "a") as log:
    if args.rehearse:
      log.write(f"rehearsal: importable besides the standard library and the repository: {' '.join(allowed)}\n")
    result["env"] = jax_part("env")
    save()
    # Float32 means float32 in the parity tests: on GPUs JAX's default precision runs float32 matmuls and
    # convolutions in TF32 (`parity_errors` measures both precisions). JAX_PLATFORMS is set because the tests'
    # conftest would otherwise pick the CPU. No pytest plugins are loaded but pytest's own (a GPU machine has
    # none), so that the tests are collected the same way in the rehearsal.
    parity_env = {**jax_env, "JAX_DEFAULT_MATMUL_PRECISION": "highest", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
                  "JAX_PLATFORMS": result["env"].get("platform", "cpu")}
    result["parity"] = jax_part("parity", parity_env)
    save()
    result["parity_errors"] = jax_part("parity_errors")
    save()
    for dtype in settings["reference_dtypes"]:
      name = f"reference_{dtype}"
      if not args.reference_repo:
        result[name] = {"skipped": True, "reason": "no --reference_repo given"}
      elif not _importable_in(env, "torch"):
        result[name] = {"skipped": True, "reason": "torch is not installed"}
      else:
        ref = settings["reference"]
        argv = [sys.executable, os.path.join(REPO, "benchmarks", "reference_pytorch_step.py"),
                f"--reference_repo={args.reference_repo}", f"--device={'cpu' if args.rehearse else 'cuda'}",
                *(f"--{k}={v}" for k, v in ref.items())] + (["--fp16"] if dtype == "fp16" else [])
        status, stdout = _run(name, argv, env, log, TIMEOUTS[name])
        result[name] = {**status, **(_last_json(stdout) or {})}
      save()
    result["train"] = jax_part("train")
    save()
    result["sample"] = jax_part("sample")
    result["summary"] = _summary(result)
    save()
  print(json.dumps(result["summary"]))
  return 0 if result["summary"]["all_parts_ok"] else 1


def _importable_in(env, name):
  return subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True).returncode == 0


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", help="Folder for device_check.json and device_check.log (driver).")
  p.add_argument("--part", choices=sorted(PARTS), help="Run one JAX part in this process (used by the driver).")
  p.add_argument("--rehearse", action="store_true", help="CPU, toy config, small sizes.")
  p.add_argument("--reference_repo", help="Folder holding the reference's guided_diffusion/ (optional).")
  args = p.parse_args(argv)
  if args.part:
    guard_imports()
    out = PARTS[args.part](SETTINGS["rehearse" if args.rehearse else "device"])
    print(json.dumps(out, default=str), flush=True)
    return 0
  if not args.out:
    p.error("--out is required")
  if args.reference_repo and not os.path.isdir(os.path.join(args.reference_repo, "guided_diffusion")):
    p.error(f"--reference_repo={args.reference_repo} has no guided_diffusion/ folder: give the root of the "
            "DDPM-IP repository (git clone https://github.com/forever208/DDPM-IP)")
  return drive(args)


if __name__ == "__main__":
  sys.exit(main())
