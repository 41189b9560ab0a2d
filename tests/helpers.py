"""Test helpers: the golden data of the reference, the repository's config files, the toy config, and the runners
of the commands (subprocesses, alone or a few at a time) with the assertions on their one FATAL line."""
import concurrent.futures
import contextlib
import functools
import importlib.util
import logging
import os
import pathlib
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_DIR = pathlib.Path(__file__).parent / "data" / "reference"
# The first digits of `input_pipeline.load_digits` as uint8 arrays, so that the tests on a fixed batch run where
# scikit-learn is not installed (a GPU machine): "size16" [16, 16, 16, 1] and "size8" [32, 8, 8, 1]. Written with
# `np.savez_compressed(DIGITS_FIXTURE, size16=load_digits(16)[0][:16], size8=load_digits(8)[0][:32])`;
# test_mixed_precision checks them against load_digits where scikit-learn is there.
DIGITS_FIXTURE = pathlib.Path(__file__).parent / "data" / "digits.npz"

@contextlib.contextmanager
def compiles_logged():
  """Inside the block, JAX logs this thread's compilations (`jax.log_compiles`): yields the list of the
  "Compiling ..." messages, filled as they come."""
  compiling = []
  handler = logging.Handler()
  handler.emit = lambda record: (compiling.append(record.getMessage())
                                 if record.getMessage().startswith("Compiling") else None)
  logging.getLogger("jax").addHandler(handler)
  try:
    with jax.log_compiles():
      yield compiling
  finally:
    logging.getLogger("jax").removeHandler(handler)


def step_compiles(messages):
  """The compilations among `messages` other than the slicing helper JAX compiles for pmap's outputs at a first
  call, however the function itself was compiled."""
  return [m for m in messages if "_multi_slice" not in m]


# The toy training run on the command line (configs/test.py); tests add the overrides they need.
TOY_TRAIN_ARGS = ["--config=configs/test.py"]


def load_config(name):
  """`get_config()` of configs/<name>.py, loaded by path as the commands load it."""
  spec = importlib.util.spec_from_file_location(f"configs_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def fixed_digits(image_size, n):
  """The first n digits of `input_pipeline.load_digits(image_size)` from DIGITS_FIXTURE (uint8 [n, size, size, 1]).

  Raises:
    ValueError: the fixture holds fewer than n images of that size.
  """
  with np.load(DIGITS_FIXTURE) as data:
    images = data[f"size{image_size}"]
  if len(images) < n:
    raise ValueError(f"{DIGITS_FIXTURE.name} holds {len(images)} digits at {image_size}x{image_size}, not {n}")
  return images[:n]


def toy_config(**training):
  """configs/test.py as a config object, for runs inside the test process; `training` overrides
  config.training fields."""
  config = load_config("test")
  for k, v in training.items():
    config.training[k] = v
  return config


def load_reference(name):
  """One golden `.npz` of the PyTorch reference (NCHW images, float32/float64 tables)."""
  return dict(np.load(REFERENCE_DIR / f"{name}.npz"))


def nhwc(x):
  """A reference NCHW array as a JAX NHWC array."""
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def nchw(x):
  """A JAX NHWC array as a numpy NCHW array, to compare with the reference."""
  return np.transpose(np.asarray(x), (0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------------------------
# Running the commands (and other programs) as a user runs them
# ---------------------------------------------------------------------------------------------------------------

def cpu_env(devices, **extra):
  """os.environ with `devices` simulated CPU devices (and `extra` variables), for a command run with that many;
  LLVM at -O0 as in the rest of the suite (conftest)."""
  flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **extra)


def command(module, *args):
  """The argv of `python -m ddpm_ip_jax.<module> args` (module e.g. "main", "evaluation.digits_classifier")."""
  return [sys.executable, "-m", f"ddpm_ip_jax.{module}", *map(str, args)]


def run(argv, *, env=None, cwd=REPO, timeout=300, **kwargs):
  """Runs argv to its end (in the repository unless `cwd`); returns the CompletedProcess, output captured as text."""
  return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                        **kwargs)


def run_command(module, *args, **kwargs):
  """`python -m ddpm_ip_jax.<module> args` run to its end; `kwargs` as for `run`."""
  return run(command(module, *args), **kwargs)


def popen(argv, *, env=None, cwd=REPO, stdout=subprocess.DEVNULL, log=None):
  """Starts argv and returns the Popen; `finish` waits for it and returns its stderr. stderr is a text pipe, or
  with `log` (a path) that file: for a process left running while the test waits on others, whose unread pipe
  would fill and block it (and a one-at-a-time server it is talking to). stdout is discarded unless given."""
  if log is None:
    return subprocess.Popen([str(a) for a in argv], cwd=cwd, env=env, stdout=stdout, stderr=subprocess.PIPE,
                            text=True)
  with open(log, "w") as stderr:
    proc = subprocess.Popen([str(a) for a in argv], cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=True)
  proc.log = log
  return proc


def popen_command(module, *args, **kwargs):
  """Starts `python -m ddpm_ip_jax.<module> args`; `kwargs` as for `popen`."""
  return popen(command(module, *args), **kwargs)


def finish(proc, timeout=240):
  """Waits for a started process and returns the rest of its stderr; kills it if it is still running after
  `timeout` seconds (and the wait raises)."""
  try:
    _, err = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
  return err if proc.stderr is not None else pathlib.Path(proc.log).read_text()


def read_until(proc, text, timeout=240):
  """Reads `proc`'s stderr pipe until a line containing `text` and returns the lines read (the rest stays for
  `finish`). Fails, killing `proc`, if no such line came within `timeout` seconds or the process ended first:
  a test that waits on a process's progress never waits on a hung one for longer than that."""
  seen = []

  def read():
    for line in proc.stderr:
      seen.append(line)
      if text in line:
        return

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  reader.join(timeout)
  if reader.is_alive() or not seen or text not in seen[-1]:
    proc.kill()
    reader.join(10)
    why = f"within {timeout} s" if reader.is_alive() else "before it ended"
    raise AssertionError(f"no line with {text!r} {why}:\n" + "".join(seen)[-4000:])
  return seen


def finished_in_parallel(calls, workers=3):
  """{name: function of no arguments} called in a pool of `workers` threads -> {name: its finished Future}, whose
  `result()` gives what the call returned or raises what it raised."""
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return {name: pool.submit(call) for name, call in calls.items()}


def run_in_parallel(calls, workers=3):
  """{name: function of no arguments} called in a pool of `workers` threads -> {name: its result}."""
  return {name: future.result() for name, future in finished_in_parallel(calls, workers).items()}


def run_commands_in_parallel(cases, workers=3, **kwargs):
  """{name: (module, *args)} run as commands, `workers` at a time -> {name: CompletedProcess}; `kwargs` as for
  `run`. Two or three at a time keep the 2 cores busy while each process starts, imports and loads."""
  return run_in_parallel({name: functools.partial(run_command, *case, **kwargs) for name, case in cases.items()},
                         workers)


def fatal_lines(stderr):
  """The FATAL lines of a command's stderr; asserts that it printed no traceback."""
  assert "Traceback" not in stderr, stderr[-3000:]
  return [line for line in stderr.splitlines() if line.startswith("FATAL")]


def assert_one_fatal_line(proc, expected="", returncode=1):
  """Asserts that a finished command exited with `returncode` (or one of a tuple of them), printed no traceback
  and exactly one FATAL line, which holds `expected`; returns that line."""
  allowed = returncode if isinstance(returncode, tuple) else (returncode,)
  assert proc.returncode in allowed, (proc.returncode, proc.stderr[-3000:])
  lines = fatal_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr[-3000:]
  assert expected in lines[0], lines[0]
  return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# In-process models
# ---------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def jitted_apply(model):
  """`jax.jit(model.apply)` (with `train` static), compiled once per model and input shapes: much faster than
  op-by-op dispatch on the CPU."""
  return jax.jit(model.apply, static_argnames="train")
