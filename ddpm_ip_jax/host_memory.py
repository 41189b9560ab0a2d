"""Host memory on XLA:CPU: transparent huge pages for the step's temporary buffer.

XLA:CPU allocates an executable's temporary buffer (the activations the backward pass keeps: 172 MB per device
for the reduced CIFAR-10 step at 4 images per device) with malloc at every call and frees it after the call.
glibc serves a block that large with a fresh `mmap`, so every step touches every page of it for the first time
again: 84,000 page faults and a quarter of the step's CPU time in the kernel (strace and getrusage, see
docs/performance.md). With glibc's `hugetlb` tunable, malloc asks for transparent huge pages on such blocks
(`madvise(MADV_HUGEPAGE)`: 2 MB pages, 70x fewer faults) and the step gets 1.3-1.4x faster. The kernel must allow
huge pages on request (`/sys/kernel/mm/transparent_hugepage/enabled` says `madvise` or `always`).

glibc reads the tunable when the process starts, so it has to be in the environment of the process: the commands
re-execute themselves once with it (`runtime.reexec_with_cpu_defaults`); code that drives the library itself
starts Python with it:

  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_script.py

The CLIs warn (`warn_if_slow`) when a CPU run would still profit from it (e.g. DDPM_IP_JAX_CPU_DEFAULTS=0); GPU
and TPU runs keep their buffers in device memory and do not need it.

Compiling the training step takes ~1.5 GB of host memory (the CIFAR-10 UNet at 64 channels on 2 CPU devices),
which malloc keeps after the compiler has freed it, so the first step's buffers came on top of it: peak 3.8 GB.
`compile_ahead` compiles a pmapped function, then hands the free memory back (`release_free_memory`, glibc's
malloc_trim) before it runs: the RSS falls from 2.8 to 1.4 GB after the compile and the peak is the compiler's.
"""
import ctypes
import ctypes.util
import os
import threading

from absl import logging

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path=THP_MODE_FILE):
  """The kernel's transparent-huge-page mode ("always", "madvise", "never"), or None where it is not known."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def advice(environ, mode):
  """The warning for a CPU run with this environment and THP mode, or None when nothing would help.

  Nothing to do when the tunable is already set (any `glibc.malloc.hugetlb` value: the user chose), when the
  kernel gives huge pages to every large mapping anyway ("always"), or when it never does ("never", unknown)."""
  if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", "") or mode != "madvise":
    return None
  return (f"XLA:CPU re-allocates the step's temporary buffer at every call, and without huge pages each step "
          f"page-faults it in again (measured 1.3-1.4x slower on the reduced CIFAR-10 step). Start the process with "
          f"GLIBC_TUNABLES={TUNABLE} (the commands do so themselves unless DDPM_IP_JAX_CPU_DEFAULTS=0; see "
          f"ddpm_ip_jax/host_memory.py).")


def warn_if_slow(backend):
  """Logs `advice` for this process when `backend` (jax.default_backend()) is the CPU; returns the message."""
  if backend != "cpu":
    return None
  message = advice(os.environ, thp_mode())
  if message:
    logging.warning(message)
  return message


def release_free_memory():
  """Returns the memory malloc holds free to the system (glibc's malloc_trim(0)); False where there is no glibc."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    trim = libc.malloc_trim
  except (OSError, AttributeError):
    return False
  trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
  trim(0)
  return True


def compile_ahead(pmapped, *args):
  """Compiles `pmapped` (a jax.pmap function) for `args` and releases the compiler's freed memory before the
  first call runs (module docstring). The call with those args then reuses the executable."""
  pmapped.lower(*args).compile()
  release_free_memory()


class BackgroundCompile:
  """`pmapped.lower(*args).compile()` in a thread of its own, started at once, so that compiling the step (or
  loading it from the compilation cache) runs while the program imports its metric writer's TensorFlow, copies
  the state to the devices and starts its input pipeline. `args` are abstract (`train_state.abstract_on_devices`:
  shapes, dtypes and the shardings of the real arguments), so the later call with the real ones finds the
  executable. One process only: in a run of several, pmap turns host-local arguments into global arrays, which
  abstract ones cannot go through.

  The compiler releases Python's GIL (its tracing does not), so on a second start the cache load overlaps that
  work instead of following it (docs/performance.md). `wait()` joins the thread, raises its error, if any, in
  the caller, and releases the compiler's freed memory, as `compile_ahead` does. Start it once nothing cheap is
  left to check: a program that fails while it runs prints its error at once but exits only when the compile
  ends (the thread is not a daemon: the interpreter's shutdown under a running XLA compile crashes)."""

  def __init__(self, pmapped, *args):
    self._error = None
    self._thread = threading.Thread(target=self._compile, args=(pmapped, args), name="compile-ahead")
    self._thread.start()

  def _compile(self, pmapped, args):
    try:
      pmapped.lower(*args).compile()
    except BaseException as e:  # pylint: disable=broad-exception-caught  # raised again by wait(), in the caller
      self._error = e

  def wait(self):
    self._thread.join()
    error, self._error = self._error, None
    if error is not None:
      raise error
    release_free_memory()
