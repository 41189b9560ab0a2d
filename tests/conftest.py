"""Test setup: simulate 2 CPU devices (must happen before jax starts) and locate the golden data."""
import os
import pathlib
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache for the whole session, inherited by the command-line runs that the tests
# start as subprocesses: the same toy programs are compiled once, not once per process.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"ddpm_ip_jax_test_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REFERENCE_DIR = pathlib.Path(__file__).parent / "data" / "reference"
REPO = pathlib.Path(__file__).resolve().parents[1]

# The digits config shrunk to a toy: native 8x8 digits, a one-level UNet, 10 steps. One set of values for both
# forms below: flags for command-line runs, a config object for runs inside the test process.
TOY_OVERRIDES = {
    "model.image_size": 8,
    "model.channel_mult": (1,),
    "diffusion.steps": 10,
    "training.batch_size": 8,
    "training.sample_every_steps": 0,
}
TOY_TRAIN_ARGS = ["--config=configs/digits.py"] + [f"--config.{k}={v}" for k, v in TOY_OVERRIDES.items()]


def toy_config(**training):
  """TOY_OVERRIDES on the digits config object, for runs inside the test process: 6 steps, a checkpoint every
  2, a 2-image grid of 2 steps at the end; `training` overrides config.training fields."""
  from configs import digits  # pylint: disable=import-outside-toplevel
  config = digits.get_config()
  for path, value in TOY_OVERRIDES.items():
    section, field = path.split(".")
    config[section][field] = value
  config.training.num_train_steps = 6
  config.training.log_every_steps = 1
  config.training.checkpoint_every_steps = 2
  config.training.num_grid_samples = 2
  config.training.grid_sampling_steps = "2"
  for k, v in training.items():
    config.training[k] = v
  return config


@pytest.fixture(scope="session")
def reference_dir():
  return REFERENCE_DIR


def load_reference(name):
  """One golden `.npz` of the PyTorch reference (NCHW images, float32/float64 tables)."""
  return dict(np.load(REFERENCE_DIR / f"{name}.npz"))


def nhwc(x):
  """A reference NCHW array as a JAX NHWC array."""
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def nchw(x):
  """A JAX NHWC array as a numpy NCHW array, to compare with the reference."""
  return np.transpose(np.asarray(x), (0, 3, 1, 2))
