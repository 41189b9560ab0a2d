"""benchmarks/device_check.sh rehearsed on the CPU (`--rehearse`): the same script as on a GPU, end to end, with
the toy config, only the GPU machine's packages importable and one device, installing carried wheels with no
index; its import guard; and its bad arguments answered with one line."""
import base64
import hashlib
import importlib.util
import json
import os
import sys
import zipfile

import pytest

from helpers import REPO, run

pytestmark = pytest.mark.slow  # the rehearsal compiles and runs every part in its own process

SCRIPT = str(REPO / "benchmarks" / "device_check.sh")
# Installed here (the test extras), absent from the GPU machine.
NOT_ON_THE_DEVICE = ("sklearn", "tensorflow", "tensorflow_datasets", "clu", "matplotlib", "cv2", "skimage", "gcsfs")
# The GPU machine has torch; here the test extras install it on Python 3.11 only, and the allowlist holds only what
# is installed.
TORCH = {"torch"} if importlib.util.find_spec("torch") is not None else set()


def _device_check():
  """benchmarks/device_check.py as a module (it imports only the standard library)."""
  spec = importlib.util.spec_from_file_location("device_check", REPO / "benchmarks" / "device_check.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _wheel(directory, name="ddpm_ip_jax_probe", version="1.0"):
  """A minimal pure-Python wheel (one module), as pip builds them: a zip with METADATA, WHEEL and RECORD."""
  dist = f"{name}-{version}.dist-info"
  files = {f"{name}.py": "VALUE = 42\n",
           f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
           f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
  record = []
  for path, text in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
    record.append(f"{path},sha256={digest},{len(text.encode())}")
  files[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
  path = directory / f"{name}-{version}-py3-none-any.whl"
  with zipfile.ZipFile(path, "w") as z:
    for member, text in files.items():
      z.writestr(member, text)
  return path


def _run(args, tmp_path, timeout=600):
  """benchmarks/device_check.sh with `args`, in tmp_path (its $OUT and $TMPDIR under it)."""
  env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
  return run(["bash", SCRIPT, *args], cwd=tmp_path, env=env, timeout=timeout)


def test_rehearsal_runs_every_part_and_writes_the_documented_json(tmp_path):
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  _wheel(wheels)
  proc = _run(["--rehearse", f"--wheels={wheels}"], tmp_path)
  out = tmp_path / "out"
  log = (out / "device_check.log").read_text()
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + log[-4000:]
  assert (tmp_path / "ddpm_ip_jax_device_site" / "ddpm_ip_jax_probe.py").is_file()  # installed with --no-index
  result = json.loads((out / "device_check.json").read_text())
  assert result["mode"] == "rehearse" and result["tensorflow_blocked"]
  assert {"flax", "orbax-checkpoint", "pytest"} | TORCH <= set(result["import_guard"]["allowlist_distributions"])
  assert "scikit-learn" not in result["import_guard"]["allowlist_distributions"]
  assert all(isinstance(result[p]["blocked_imports"], list) for p in ("env", "parity", "parity_errors", "train"))
  assert result["env"]["tensorflow_importable"] is False and result["env"]["device_count"] == 1
  parity = result["parity"]
  assert parity["ok"] and parity["failed"] == 0 and parity["passed"] >= 30, parity
  errors = result["parity_errors"]
  assert errors["unet_float32_highest"] < 1e-4 and errors["unet_bfloat16_highest"] < 0.2
  assert all(errors[f"chain_{c}_highest"] < 1e-3 for c in ("10_eta0.0", "ddim10_eta0.0", "ddim10_eta0.5"))
  train = result["train"]
  for field in ("compile_s", "step_s", "images_per_s", "pipelined_images_per_s", "peak_memory_gb", "params"):
    assert train[field] > 0, field
  assert train["dtype"] == "bfloat16" and train["steps_per_call"] == 2 and train["model_flops_per_image"] > 0
  assert train["mfu"] is None  # no peak FLOP/s for a CPU
  assert [r["steps"] for r in result["sample"]["runs"]] == [5, 10]
  assert all(r["samples_per_s"] > 0 for r in result["sample"]["runs"])
  assert result["reference_fp32"] == {"skipped": True, "reason": "no --reference_repo given"}
  assert result["summary"]["all_parts_ok"] and result["summary"]["jax_images_per_s"] > 0
  assert "===== train" in log


def test_allowlist_follows_the_requirements_of_the_gpu_machines_packages():
  device_check = _device_check()
  modules, distributions = device_check.device_allowlist()
  # flax's and orbax's own requirements come with them; the packages the machine lacks do not.
  assert {"jax", "flax", "optax", "orbax", "absl", "etils", "numpy", "scipy", "PIL", "pytest", "_pytest",
          "ml_collections", "yaml", "msgpack", "tensorstore", "ml_dtypes"} | TORCH <= set(modules)
  assert not set(NOT_ON_THE_DEVICE) & set(modules)
  assert "orbax-checkpoint" in distributions and "scikit-learn" not in distributions
  # Transitive: optax requires jax, which requires ml_dtypes; flax is not among them.
  optax_modules, _ = device_check.device_allowlist(("optax",))
  assert {"optax", "absl", "jax", "jaxlib", "ml_dtypes", "numpy"} <= set(optax_modules)
  assert "flax" not in optax_modules
  assert device_check.device_allowlist(("no-such-distribution",)) == ([], [])


GUARDED = r"""
import importlib.util, json, sys
sys.path.insert(0, sys.argv[1])
import device_check
device_check.guard_imports()
import numpy, yaml, ml_collections, absl.flags, PIL.Image, msgpack, ddpm_ip_jax, sysconfig, decimal
out = {}
for name in sys.argv[2].split(","):
  try:
    __import__(name)
    out[name] = ["imported", importlib.util.find_spec(name) is not None]
  except ModuleNotFoundError as e:
    out[name] = [str(e), importlib.util.find_spec(name) is not None]
print(json.dumps({"refused": out, "found": [importlib.util.find_spec(n) is not None for n in sys.argv[3].split(",")]}))
"""


@pytest.mark.parametrize("rehearse", [True, False])
def test_guard_blocks_what_the_gpu_machine_lacks(tmp_path, rehearse):
  device_check = _device_check()
  log = tmp_path / "blocked.txt"
  env = {**os.environ, "PYTHONPATH": str(REPO), device_check.BLOCKED_LOG_ENV: str(log)}
  env.pop(device_check.ALLOWED_ENV, None)
  if rehearse:
    env[device_check.ALLOWED_ENV] = ",".join(device_check.device_allowlist()[0])
    refused, found = ["tensorflow", "sklearn", "matplotlib", "skimage"], ["flax", "orbax", *TORCH, "_pytest"]
  else:  # on the device only TensorFlow and tfds are blocked: whatever else is installed stays importable
    refused, found = ["tensorflow", "tensorflow_datasets"], ["flax", "sklearn", "matplotlib"]
  proc = run([sys.executable, "-c", GUARDED, REPO / "benchmarks", ",".join(refused), ",".join(found)], cwd=tmp_path,
             env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  # As if not installed: the import fails as a missing module's does, find_spec answers None; each name logged.
  assert out["refused"] == {n: [f"No module named '{n}' (blocked: not on the GPU machine)", False] for n in refused}
  assert out["found"] == [True] * len(found)
  assert set(log.read_text().split()) == set(refused)


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--wheels=EMPTY"], "holds no .whl files"),
    (["--rehearse", "--reference_repo=EMPTY"], "has no guided_diffusion/ folder"),
])
def test_bad_arguments_are_one_line(tmp_path, args, message):
  (tmp_path / "empty").mkdir()
  proc = _run([a.replace("EMPTY", str(tmp_path / "empty")) for a in args], tmp_path, timeout=120)
  assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
