"""The core runs without TensorFlow: the model, diffusion, samplers, the training step, the benchmark, the
checkpoint conversion and the metrics import neither tensorflow nor tensorflow_datasets (a GPU machine may
have neither), and neither does a whole training run without TensorBoard events. Checked in a subprocess in
which importing either raises."""
import sys

import pytest

from helpers import run

pytestmark = pytest.mark.slow  # a subprocess that compiles a training step

BLOCK = r"""
import sys
class _Blocked:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
      raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, _Blocked())
"""

SCRIPT = BLOCK + r"""
sys.path.insert(0, "tests")
import jax, numpy as np
from helpers import load_config
from ddpm_ip_jax import (benchmark_lib, diffusion, exposure, generation, input_pipeline, models,
                         reference_checkpoints, train_state, train_step)
from ddpm_ip_jax.evaluation import digits, metrics
config = load_config("test")
training = train_step.create_training(config)
state, p_step = train_state.replicate_state(training.state), training.p_train_steps
images, labels = input_pipeline.load_digits(8)
n = jax.local_device_count()
batch = {"image": np.asarray(images[:8], np.float32).reshape(n, 1, 8 // n, 8, 8, 1) / 127.5 - 1,
         "label": labels[:8].reshape(n, 1, 8 // n).astype(np.int32)}
state, m = p_step(state, batch)
assert int(state.step[0]) == 1 and np.isfinite(float(m["loss"][0]))
config.training.batch_size = 2 * n
print("benchmark", benchmark_lib.benchmark_training(config, 1)["step_s"] > 0)
assert not [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")]
print("TF-FREE OK")
"""


def test_core_and_benchmark_run_with_tensorflow_blocked():
  proc = run([sys.executable, "-c", SCRIPT])
  assert proc.returncode == 0 and "TF-FREE OK" in proc.stdout, proc.stderr[-3000:]


# The training command on the toy config, no TensorBoard events: config, checkpoints, grids, resume-ready.
TRAIN = BLOCK.replace("raise ImportError", "raise ModuleNotFoundError") + r"""
import importlib.util, runpy
# etils asks find_spec("tensorflow") before it picks a path backend; a module that is not installed answers None.
importlib.util.find_spec = (lambda find: lambda name, *a: None if name.split(".")[0] in (
    "tensorflow", "tensorflow_datasets") else find(name, *a))(importlib.util.find_spec)
sys.argv = ["main", "--config=configs/test.py", "--workdir=" + sys.argv[1], "--config.training.tensorboard=False",
            "--config.training.num_train_steps=2"]
try:
  runpy.run_module("ddpm_ip_jax.main", run_name="__main__")
except SystemExit as e:
  assert not e.code, e.code
assert not [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")]
print("TF-FREE TRAINING OK")
"""


def test_training_without_tensorboard_runs_with_tensorflow_blocked(tmp_path):
  proc = run([sys.executable, "-c", TRAIN, tmp_path / "run"])
  assert proc.returncode == 0 and "TF-FREE TRAINING OK" in proc.stdout, proc.stderr[-3000:]
  assert (tmp_path / "run" / "config.json").is_file() and (tmp_path / "run" / "checkpoints" / "2").is_dir()
  assert not list((tmp_path / "run").glob("events.out.tfevents*"))


def test_tensorboard_without_tensorflow_is_one_fatal_line(tmp_path):
  code = TRAIN.replace("--config.training.tensorboard=False", "--config.training.tensorboard=True")
  proc = run([sys.executable, "-c", code, tmp_path / "run"])
  assert "config.training.tensorboard=True: TensorBoard events need TensorFlow" in proc.stderr, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr.split("FATAL")[-1]


def test_the_blocker_blocks():
  proc = run([sys.executable, "-c", BLOCK + "import tensorflow"], timeout=60)
  assert proc.returncode != 0 and "blocked in this test" in proc.stderr
