"""benchmarks/device_check.sh rehearsed on the CPU (`--rehearse`): the same script as on a GPU, end to end, with
the toy config, TensorFlow blocked and one device, installing carried wheels with no index; and its bad
arguments answered with one line."""
import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow  # the rehearsal compiles and runs every part in its own process

SCRIPT = str(REPO / "benchmarks" / "device_check.sh")


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
  env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
  return subprocess.run(["bash", SCRIPT, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=timeout)


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


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--wheels=EMPTY"], "holds no .whl files"),
    (["--rehearse", "--reference_repo=EMPTY"], "has no guided_diffusion/ folder"),
])
def test_bad_arguments_are_one_line(tmp_path, args, message):
  (tmp_path / "empty").mkdir()
  proc = _run([a.replace("EMPTY", str(tmp_path / "empty")) for a in args], tmp_path, timeout=120)
  assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
