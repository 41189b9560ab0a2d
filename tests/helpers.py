"""Test helpers: the golden data of the reference, the repository's config files, the toy config."""
import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_DIR = pathlib.Path(__file__).parent / "data" / "reference"
# The first digits of `input_pipeline.load_digits` as uint8 arrays, so that the tests on a fixed batch run where
# scikit-learn is not installed (a GPU machine): "size16" [16, 16, 16, 1] and "size8" [32, 8, 8, 1]. Written with
# `np.savez_compressed(DIGITS_FIXTURE, size16=load_digits(16)[0][:16], size8=load_digits(8)[0][:32])`;
# test_mixed_precision checks them against load_digits where scikit-learn is there.
DIGITS_FIXTURE = pathlib.Path(__file__).parent / "data" / "digits.npz"

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
