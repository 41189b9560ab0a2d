"""The process set-up of the commands (ddpm_ip_jax/runtime.py): the CPU defaults they apply by themselves and the
persistent compilation cache, which a second start of the same command uses instead of compiling."""
import json
import os
import subprocess
import sys

import jax
import pytest

from ddpm_ip_jax import host_memory
from ddpm_ip_jax import runtime
from helpers import REPO


@pytest.mark.parametrize("cores, batch, expected", [(2, 32, 2), (6, 128, 4), (4, 6, 3), (2, None, 2), (2, 1, 1),
                                                    (1, 8, 1)])
def test_device_count_is_the_most_devices_per_core_that_divide_the_batch(cores, batch, expected):
  assert runtime.device_count_for(cores, batch) == expected


def test_cpu_device_count_is_set_unless_the_user_chose_or_an_accelerator_runs():
  env = {"JAX_PLATFORMS": "cpu"}
  said = runtime.set_cpu_devices(batch_size=None, environ=env)
  n = runtime.device_count_for(runtime.cpu_cores())
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count={n}" and "XLA CPU device" in said
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=3 --xla_foo=1"}
  assert runtime.set_cpu_devices(8, environ=env) is None and env["XLA_FLAGS"].endswith("=3 --xla_foo=1")
  for env in ({"JAX_PLATFORMS": "cuda"}, {"JAX_PLATFORMS": "cpu", runtime.OPT_OUT: "0"}):
    assert runtime.set_cpu_devices(8, environ=env) is None and "XLA_FLAGS" not in env


def test_glibc_tunable_is_added_only_where_it_helps():
  assert runtime.tunables_to_add({}, "madvise") == runtime.HUGETLB
  assert runtime.tunables_to_add({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise") == (
      "glibc.malloc.arena_max=2:" + runtime.HUGETLB)
  assert runtime.tunables_to_add({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise") is None  # user's choice
  assert runtime.tunables_to_add({}, "always") is None and runtime.tunables_to_add({}, None) is None


def test_an_unwritable_cache_folder_turns_the_cache_off_with_a_warning(tmp_path):
  (tmp_path / "file").write_text("")
  before = jax.config.jax_enable_compilation_cache
  try:
    assert runtime.enable_compilation_cache(str(tmp_path / "file" / "cache")) is None
    assert not jax.config.jax_enable_compilation_cache
  finally:
    jax.config.update("jax_enable_compilation_cache", before)


@pytest.mark.slow
def test_a_command_applies_the_cpu_defaults_and_a_second_start_loads_the_compiled_step(tmp_path):
  """The benchmark command with none of the settings in its environment: it runs on one device per core (that
  divides the batch), with glibc's tunable where the kernel offers huge pages, and writes the compilation cache
  under XDG_CACHE_HOME; the same command again loads the step from there."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "GLIBC_TUNABLES", "JAX_COMPILATION_CACHE_DIR", runtime.OPT_OUT)}
  env.update(XDG_CACHE_HOME=str(tmp_path), JAX_LOG_COMPILES="1")
  cmd = [sys.executable, "-m", "ddpm_ip_jax.benchmark", "--config=configs/test.py", "--train_steps=1",
         "--sample_steps="]
  runs = [subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600) for _ in range(2)]
  for proc in runs:
    assert proc.returncode == 0, proc.stderr[-3000:]
  train = [json.loads(line) for line in runs[0].stdout.splitlines() if line.startswith("{")][0]
  assert train["devices"] == runtime.device_count_for(runtime.cpu_cores(), 8)
  expected_tunable = runtime.HUGETLB if host_memory.thp_mode() == "madvise" else ""
  assert train["glibc_tunables"] == expected_tunable
  assert "CPU defaults:" in runs[0].stderr
  cache = tmp_path / "ddpm_ip_jax" / "xla"
  assert any(cache.iterdir())
  hits = [line for line in runs[1].stderr.splitlines() if "Persistent compilation cache hit" in line]
  assert hits and "Persistent compilation cache hit" not in runs[0].stderr
