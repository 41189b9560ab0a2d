"""Test setup: simulate 2 CPU devices (must happen before jax starts), one compilation cache for the session, and
the fixtures several test files share. Helpers live in helpers.py."""
import os
import shutil
import tempfile

# 2 simulated CPU devices; LLVM at -O0 for the tests' programs: they are small and compiled once or twice each, so
# compiling dominates, and -O0 compiles in ~40% less time (test_unet's remat test: 24 s -> 14 s). The numbers do
# not depend on it (XLA's own passes and the convolution libraries are the same; no fast math either way), and the
# commands run outside the tests keep XLA's default.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# gs:// paths through gcsfs, which follows the local GCS emulator (tests/gcs_emulator.py), not TensorFlow's GCS
# filesystem, which cannot be pointed at it. etils reads this once per process, so it is set before any path use.
os.environ.setdefault("EPATH_USE_TF", "false")
# One persistent compilation cache for the session (a new folder, removed at its end), used by this process and
# inherited by the command-line runs that the tests start as subprocesses: the same toy programs are compiled
# once per session, not once per process, and a session's timings do not depend on what an earlier one left.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="ddpm_ip_jax_test_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402

from helpers import REFERENCE_DIR, TOY_TRAIN_ARGS, run_command  # noqa: E402


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  if _SESSION_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def reference_dir():
  return REFERENCE_DIR


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
  """One toy training run for the session (configs/test.py, 4 steps: checkpoints 2 and 4, config.json, TensorBoard
  events, the grid of step 4), trained by the command. Shared: a test that writes into a run copies it first
  (`shutil.copytree(toy_run, ...)`)."""
  workdir = tmp_path_factory.mktemp("toy_run") / "run"
  proc = run_command("main", *TOY_TRAIN_ARGS, f"--workdir={workdir}", "--config.training.num_train_steps=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir
