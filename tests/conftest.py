"""Test setup: simulate 2 CPU devices (must happen before jax starts). Helpers live in helpers.py."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# gs:// paths through gcsfs, which follows the local GCS emulator (tests/gcs_emulator.py), not TensorFlow's GCS
# filesystem, which cannot be pointed at it. etils reads this once per process, so it is set before any path use.
os.environ.setdefault("EPATH_USE_TF", "false")
# One persistent compilation cache for the whole session, inherited by the command-line runs that the tests
# start as subprocesses: the same toy programs are compiled once, not once per process.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"ddpm_ip_jax_test_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402

from helpers import REFERENCE_DIR  # noqa: E402


@pytest.fixture(scope="session")
def reference_dir():
  return REFERENCE_DIR
