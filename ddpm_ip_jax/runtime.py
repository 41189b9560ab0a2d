"""How every command sets up its process before JAX computes anything: the CPU defaults, the persistent
compilation cache, and TensorFlow (when a command uses it) kept off the accelerators.

**CPU defaults** (docs/performance.md, "What a CPU run needs"). XLA:CPU runs each op on one thread, so a CPU run
gets one XLA device per core (`--xla_force_host_platform_device_count`, the pmapped step splits the batch over
them), and XLA:CPU allocates the step's temporary buffer anew at every call, which without huge pages is
page-faulted in again at every step (`host_memory`), so glibc is asked for transparent huge pages
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`). glibc reads its tunables when a process starts, so a command started
without it re-executes itself once with it (`reexec_with_cpu_defaults`, called by the package's `__init__` when
the process was started as `python -m ddpm_ip_jax.<command>`, before anything heavy is imported);
the device count is set after the flags are parsed (`set_cpu_devices`), so that it can divide the training
batch. Neither is touched when the user set it, when an accelerator plugin is installed (unless
JAX_PLATFORMS=cpu), or with DDPM_IP_JAX_CPU_DEFAULTS=0. The command logs once what it set.

**Compilation cache.** JAX's persistent cache is on for every command, in `default_cache_dir()` (a local folder
of the user's, so it works with a read-only or bucket workdir): a resumed run, a second sample or evaluate call
and a preempted TPU worker coming back load their programs instead of compiling them. `--compilation_cache_dir`
(or `config.compilation_cache_dir` for training) moves it; "none" turns it off; JAX_COMPILATION_CACHE_DIR, when
set, is left as it is. A CPU run of several processes (jax.distributed on one machine, a rehearsal of a
multi-host run) turns it off after start-up (`no_cache_across_cpu_processes`).

This module imports only the standard library and absl at import time: it runs before JAX is loaded.
"""
import functools
import importlib.util
import os
import sys

from ddpm_ip_jax import host_memory

OPT_OUT = "DDPM_IP_JAX_CPU_DEFAULTS"     # "0": leave XLA_FLAGS and GLIBC_TUNABLES alone
_REEXECUTED = "DDPM_IP_JAX_REEXECUTED"   # set in the re-executed process: never loop
HUGETLB = host_memory.TUNABLE                 # glibc.malloc.hugetlb=1
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
                        "libtpu", "jax_plugins")


@functools.cache
def tensorflow_cpu():
  """TensorFlow, imported on first use, with every GPU hidden from it: it must take no accelerator memory from
  JAX. Quiets it first (no C++ info logs, no oneDNN banner: its custom ops speed up TF matmuls/convolutions, which
  are not used here), unless those variables are set; effective only if tensorflow was not imported before."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  return tf


def cpu_cores():
  """Cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def runs_on_cpu(environ=None):
  """Whether JAX will pick the CPU: JAX_PLATFORMS says only cpu, or no accelerator plugin is installed."""
  environ = os.environ if environ is None else environ
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def _applies(environ):
  return environ.get(OPT_OUT, "1") != "0" and runs_on_cpu(environ)


def tunables_to_add(environ, mode):
  """The GLIBC_TUNABLES value a CPU command should run with, or None when nothing is to change
  (`host_memory.advice`: already set, or the kernel's THP `mode` makes it useless)."""
  if host_memory.advice(environ, mode) is None:
    return None
  return ":".join(filter(None, [environ.get("GLIBC_TUNABLES", ""), HUGETLB]))


def reexec_with_cpu_defaults():
  """On a CPU run without glibc's huge-page tunable, re-executes this command once with it (same arguments,
  same interpreter). Call before anything heavy is imported; returns only when nothing was to change."""
  if os.environ.get(_REEXECUTED) or not _applies(os.environ):
    return
  value = tunables_to_add(os.environ, host_memory.thp_mode())
  if value is None:
    return
  env = dict(os.environ, GLIBC_TUNABLES=value, **{_REEXECUTED: HUGETLB})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def device_count_for(cores, batch_size=None):
  """The CPU device count: the most devices, at most one per core, that divide `batch_size` (any count when
  None)."""
  for n in range(max(1, cores), 0, -1):
    if batch_size is None or batch_size % n == 0:
      return n
  return 1


def set_cpu_devices(batch_size=None, environ=None):
  """Puts one XLA device per core (dividing `batch_size`) into XLA_FLAGS for a CPU run, unless the user gave a
  device count. Must run before JAX starts its backend. Returns a description of what this process runs with
  on the CPU defaults (for one log line), or None when they do not apply."""
  environ = os.environ if environ is None else environ
  if not _applies(environ):
    return None
  said = []
  if DEVICE_COUNT_FLAG not in environ.get("XLA_FLAGS", ""):
    n = device_count_for(cpu_cores(), batch_size)
    environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} {DEVICE_COUNT_FLAG}={n}".strip()
    said.append(f"{n} XLA CPU device(s), one per core (XLA_FLAGS={DEVICE_COUNT_FLAG}={n})")
  if environ.get(_REEXECUTED):
    said.append(f"glibc huge pages for XLA's buffers (GLIBC_TUNABLES={HUGETLB}, re-executed once)")
  if not said:
    return None
  return ("CPU defaults: " + "; ".join(said) + f". Set them yourself to change them, or {OPT_OUT}=0 to leave "
          "them alone (docs/performance.md).")


def default_cache_dir(environ=None):
  """$XDG_CACHE_HOME/ddpm_ip_jax/xla (~/.cache/ddpm_ip_jax/xla by default)."""
  environ = os.environ if environ is None else environ
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "ddpm_ip_jax", "xla")


def no_cache_across_cpu_processes():
  """In a CPU run of several processes, turns the persistent compilation cache off, and returns whether it did
  (call after jax.distributed.initialize, before anything compiles).

  With XLA:CPU's collectives (gloo), JAX 0.12 runs a program loaded from the cache into a deadlock at its first
  all-reduce: both processes wait to receive, for gloo's 30 minutes (tests/test_multihost.py's second run in one
  cache; whether process 1 loads process 0's entry, as JAX has it, or compiles its own). JAX 0.10.2 runs the same
  programs. A CPU run of several processes is a rehearsal of a multi-host one, so it compiles at every start;
  accelerator runs keep the cache."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1 or jax.default_backend() != "cpu" or not jax.config.jax_enable_compilation_cache:
    return False
  jax.config.update("jax_enable_compilation_cache", False)
  return True


def enable_compilation_cache(path="auto"):
  """Turns on JAX's persistent compilation cache in `path` ("auto": `default_cache_dir()`; "none" or "": off).
  JAX_COMPILATION_CACHE_DIR in the environment wins over "auto". Returns the folder used, or None (off, or not
  writable: then a warning says so and the run compiles as without a cache)."""
  import jax  # pylint: disable=import-outside-toplevel
  from absl import logging  # pylint: disable=import-outside-toplevel
  if path in ("", "none"):
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if path == "auto":
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_cache_dir()
  if "://" not in path:
    try:
      os.makedirs(path, exist_ok=True)
      probe = os.path.join(path, f".probe_{os.getpid()}")
      with open(probe, "w"):
        pass
      os.remove(probe)
    except OSError as e:
      logging.warning("Compilation cache %s cannot be written (%s): compiling without it; move it with "
                      "--compilation_cache_dir=DIR or turn it off with --compilation_cache_dir=none.", path, e)
      jax.config.update("jax_enable_compilation_cache", False)
      return None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  # Every program that took a second to compile (the steps and chains take tens of seconds on a CPU).
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 1.0)))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
