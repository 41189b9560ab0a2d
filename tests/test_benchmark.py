"""The speed benchmark on a tiny UNet: every printed field is there, positive and consistent."""
import importlib.util
import json
import os
import sys

import jax
import pytest

from helpers import TOY_TRAIN_ARGS, cpu_env, run, run_command, toy_config
from ddpm_ip_jax import benchmark_lib as benchmark
from ddpm_ip_jax import host_memory
from ddpm_ip_jax import runtime
from ddpm_ip_jax import models


def tiny_config():
  """The toy config with 2 images per simulated device."""
  return toy_config(batch_size=4)


@pytest.fixture(scope="module")
def tiny_params():
  return models.init_params(models.create_model(tiny_config()), jax.random.key(0))


def test_sampling_counts_the_respaced_steps_and_all_devices(tiny_params):
  out = benchmark.benchmark_sampling(tiny_config(), tiny_params, "5", per_device_batch=3)
  assert (out["steps"], out["batch"], out["devices"]) == (5, 6, 2)
  for key in ("compile_s", "chain_s", "samples_per_s", "network_evals_per_s", "peak_memory_gb"):
    assert out[key] > 0, key
  assert out["samples_per_s"] == pytest.approx(6 / out["chain_s"], rel=0.01)
  assert out["network_evals_per_s"] == pytest.approx(5 * out["samples_per_s"], rel=0.01)


def test_bad_arguments_fail_before_compiling():
  config = tiny_config()
  config.training.batch_size = 3  # does not split over 2 devices
  with pytest.raises(ValueError, match="batch"):
    benchmark.benchmark_training(config, num_steps=1)
  with pytest.raises(ValueError, match="num_steps"):
    benchmark.benchmark_training(tiny_config(), num_steps=0)
  with pytest.raises(ValueError, match="per_device_batch"):
    benchmark.benchmark_sampling(tiny_config(), None, "5", per_device_batch=0)


@pytest.mark.slow
def test_command_prints_one_json_line_per_measurement(tiny_params):
  """The command on 1 device: training fields positive and consistent, one sampler line per respacing."""
  proc = run_command("benchmark", *TOY_TRAIN_ARGS, "--config.training.batch_size=2", "--train_steps=3",
                     "--sample_steps=2,5", "--sample_batch=1", env=cpu_env(1))
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert [(x["what"], x.get("steps")) for x in lines] == [("train", None), ("sample", 2), ("sample", 5)]
  assert all(x["devices"] == 1 for x in lines)
  train = lines[0]
  for key in ("init_s", "compile_s", "step_s", "step_s_min", "step_s_max", "images_per_s", "peak_memory_gb"):
    assert train[key] > 0, key
  assert train["params"] == models.count_params(tiny_params)
  assert train["step_s_min"] <= train["step_s"] <= train["step_s_max"]
  assert train["step_s_max"] < train["compile_s"] / 4, "a timed call compiled the step again"
  assert train["images_per_s"] == pytest.approx(2 / train["step_s"], rel=0.01)
  assert train["pipelined_step_s"] < train["compile_s"] / 4, "a pipelined call compiled the step again"
  assert train["pipelined_images_per_s"] == pytest.approx(2 / train["pipelined_step_s"], rel=0.01)
  # The command re-executes itself with glibc's huge-page tunable where the kernel offers them (runtime.py).
  added = runtime.tunables_to_add(os.environ, host_memory.thp_mode())
  assert train["glibc_tunables"] == (added or os.environ.get("GLIBC_TUNABLES", ""))
  assert (train["global_batch"], train["steps_per_call"]) == (2, 1)
  assert lines[2]["samples_per_s"] > 0 and lines[2]["compile_s"] > 0


@pytest.mark.slow
def test_conv_kernels_script_prints_every_kernel_and_the_network_pair():
  """benchmarks/conv_kernels.py at small sizes: XLA's three kernels and the chunked filter gradient per level,
  PyTorch's kernels in both layouts where torch is installed, and the toy network chunked against whole."""
  proc = run([sys.executable, "benchmarks/conv_kernels.py", "--batch=4", "--channels=32", "--repeats=1",
              "--network_pairs=1", "--config=configs/test.py"], env=cpu_env(1))
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  jax_lines = [x for x in lines if x["what"] == "jax_gflops"]
  assert [(x["size"], x["channels"]) for x in jax_lines] == [(32, 32), (16, 64), (8, 64), (4, 64)]
  for x in jax_lines:
    assert min(x["forward"], x["input_grad"], x["filter_grad"], x["filter_grad_chunks_of_2"]) > 0
  torch_lines = [x for x in lines if x["what"] == "torch_gflops"]
  if importlib.util.find_spec("torch") is not None:
    assert [x["layout"] for x in torch_lines] == ["NCHW", "NHWC"] * 4
    assert all(x["filter_grad"] > 0 for x in torch_lines)
  network = lines[-1]
  assert network["what"] == "unet_forward_backward" and network["whole_s"] > 0 and network["chunked_s"] > 0
