"""host_memory: reading the kernel's THP mode and when the CPU runs advise the glibc huge-page tunable."""
import logging

import numpy as np
import pytest

from helpers import compiles_logged
from helpers import step_compiles
from ddpm_ip_jax import host_memory


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  f = tmp_path / "enabled"
  for text, mode in (("always [madvise] never\n", "madvise"), ("[always] madvise never\n", "always"),
                     ("always madvise [never]\n", "never"), ("garbage\n", None)):
    f.write_text(text)
    assert host_memory.thp_mode(str(f)) == mode
  assert host_memory.thp_mode(str(tmp_path / "missing")) is None


def test_advice_only_where_the_tunable_would_help():
  message = host_memory.advice({}, "madvise")
  assert f"GLIBC_TUNABLES={host_memory.TUNABLE}" in message
  assert host_memory.advice({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "madvise") is None
  # Another tunable already set: still advised (the user adds ours with a colon).
  assert host_memory.advice({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise") == message
  # Any explicit hugetlb choice is the user's; "always" already gives huge pages; "never" cannot.
  assert host_memory.advice({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise") is None
  for mode in ("always", "never", None):
    assert host_memory.advice({}, mode) is None


def test_warn_if_slow_logs_on_cpu_only(monkeypatch, caplog):
  monkeypatch.setattr(host_memory, "thp_mode", lambda: "madvise")
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  with caplog.at_level(logging.WARNING):
    assert host_memory.warn_if_slow("gpu") is None
    assert not caplog.records
    message = host_memory.warn_if_slow("cpu")
  assert message and message in caplog.text
  monkeypatch.setenv("GLIBC_TUNABLES", host_memory.TUNABLE)
  assert host_memory.warn_if_slow("cpu") is None


_FRAGMENTED_HEAP = """
import ctypes, ctypes.util, sys
from ddpm_ip_jax import host_memory
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss_mb():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * 4096 / 2**20
blocks = [libc.malloc(64 * 1024) for _ in range(3200)]  # 200 MB below the mmap threshold: from the heap
for b in blocks:
  ctypes.memset(b, 1, 64 * 1024)
pin = libc.malloc(64 * 1024)  # keeps the freed blocks below the heap's top, where free() alone returns nothing
for b in blocks:
  libc.free(b)
before = rss_mb()
released = host_memory.release_free_memory()
print(released, before, rss_mb())
"""


def test_release_free_memory_hands_freed_heap_back():
  """What compile_ahead relies on: memory that malloc keeps after a free (here 200 MB of small blocks below a
  live one) leaves the process's resident set."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  out = subprocess.run([sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True, text=True, check=True)
  released, before, after = out.stdout.split()
  assert released == "True"
  assert float(before) - float(after) > 150, out.stdout  # MB


def test_compile_ahead_compiles_once_for_the_calls_after_it():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  traces = []

  def double(x):
    traces.append(x.shape)
    return 2 * x

  p = jax.pmap(double)
  x = jnp.ones((jax.local_device_count(), 3))
  with compiles_logged() as seen:
    host_memory.compile_ahead(p, x)
    compiled_ahead = list(seen)
    seen.clear()
    outs = jax.block_until_ready([p(x), p(x)])
  assert len(compiled_ahead) == 1
  assert not step_compiles(seen), seen
  assert len(traces) == 1
  for out in outs:
    np.testing.assert_array_equal(out, 2 * np.ones(x.shape))


def test_background_compile_serves_the_call_and_raises_its_error_in_the_caller():
  """BackgroundCompile of abstract arguments with the real ones' sharding: the later call traces and compiles
  nothing; an error of the thread (here a shape the function rejects) comes out of wait()."""
  import jax  # pylint: disable=import-outside-toplevel
  from ddpm_ip_jax import train_state  # pylint: disable=import-outside-toplevel
  traces = []

  def double(x):
    traces.append(x.shape)
    if x.shape[-1] != 3:
      raise ValueError(f"want 3 channels, got {x.shape[-1]}")
    return 2 * x

  p = jax.pmap(double, axis_name=train_state.AXIS)
  n = jax.local_device_count()
  compiling = host_memory.BackgroundCompile(p, train_state.abstract_on_devices(np.zeros(3, np.float32)))
  compiling.wait()
  assert len(traces) == 1
  x = jax.device_put(np.ones((n, 3), np.float32), train_state.device_sharding())
  with compiles_logged() as seen:
    out = jax.block_until_ready(p(x))
  assert len(traces) == 1
  assert not step_compiles(seen), seen
  np.testing.assert_array_equal(out, 2 * np.ones((n, 3)))

  failing = host_memory.BackgroundCompile(p, train_state.abstract_on_devices(np.zeros(4, np.float32)))
  with pytest.raises(ValueError, match="want 3 channels, got 4"):
    failing.wait()
