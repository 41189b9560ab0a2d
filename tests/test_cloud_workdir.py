"""Paths in a bucket (gs://), against a real local GCS server (tests/gcs_emulator.py): the evaluation command
reads the extractor's weights from the bucket and writes the reference statistics, the sample parts, the samples
file and the metrics there, nothing under its working directory.

Not covered against the emulator (both checked by hand): TensorBoard event files go through TensorFlow's GCS
filesystem, which has no endpoint setting (evaluate --tensorboard=false here); and orbax's OCDBT checkpoints
fail on it at random (tensorstore: "Malformed StorageGeneration" on the manifest, more often the more arrays a
tree holds), so checkpoints in a bucket (training, converted models) are not tested here: the model is local.
"""
import io
import json
import os
import subprocess
import sys

from etils import epath
import jax
import numpy as np
import pytest

import gcs_emulator
from helpers import load_config

pytestmark = pytest.mark.slow  # command-line runs in subprocesses

@pytest.fixture(scope="module")
def gcs():
  with gcs_emulator.running(bucket="bkt") as env:
    yield dict(os.environ, **env)


def _command(module, *args):
  return [sys.executable, "-m", module, *args]


def _run(cmd, env, cwd):
  proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


def test_evaluate_reads_weights_from_and_writes_everything_to_the_bucket(gcs, tmp_path):
  from ddpm_ip_jax import input_pipeline, models, workdir  # pylint: disable=import-outside-toplevel
  from ddpm_ip_jax.evaluation import digits  # pylint: disable=import-outside-toplevel
  config = load_config("test")
  config.model.image_size, config.model.channel_mult = 16, (1, 2)  # the digits classifier's 16x16
  workdir.save_converted(config, models.init_params(models.create_model(config), jax.random.key(0)),
                         tmp_path / "toy16")
  images, labels = input_pipeline.load_digits(16)
  params, _ = digits.train_classifier(np.asarray(images), labels, epochs=1)
  digits.save_params(params, "gs://bkt/weights/digits.npz")
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  _run(_command("ddpm_ip_jax.evaluate", f"--checkpoint={tmp_path / 'toy16'}", "--extractor=digits",
                "--weights=gs://bkt/weights/digits.npz", "--reference=gs://bkt/stats/digits16.npz",
                "--num_samples=4", "--batch_size=1", "--steps=2", "--output_dir=gs://bkt/eval/toy16",
                "--tensorboard=false"), gcs, cwd)
  results = json.loads(epath.Path("gs://bkt/eval/toy16/metrics_digits.json").read_text())
  assert results["num_samples"] == 4 and np.isfinite(results["fid"])
  assert epath.Path("gs://bkt/stats/digits16.npz").exists()
  out = epath.Path("gs://bkt/eval/toy16")
  assert sorted(p.name for p in (out / "parts").iterdir()) == ["00000000-00000002.npz", "00000002-00000004.npz"]
  with np.load(out.joinpath("samples_4x16x16x1.npz").open("rb")) as f:
    assert f["arr_0"].shape == (4, 16, 16, 1) and f["arr_0"].dtype == np.uint8
  assert os.listdir(cwd) == []  # nothing under the local working directory


def test_npz_and_folder_datasets_are_read_from_the_bucket(gcs):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from ddpm_ip_jax import fileio, input_pipeline  # pylint: disable=import-outside-toplevel
  config = load_config("test").data
  images, labels = input_pipeline.load_digits(8)
  fileio.save_npz("gs://bkt/data/digits8.npz", arr_0=images[:20], arr_1=labels[:20])
  config.dataset, config.data_dir = "npz", "gs://bkt/data/digits8.npz"
  input_pipeline.check_dataset(config, 8)
  assert input_pipeline.num_channels(config) == 1
  np.testing.assert_array_equal(input_pipeline.load_images(config, 8), images[:20])

  for i in range(3):  # a folder of RGB PNGs, in nested "directories"
    rgb = np.repeat(images[i], 3, axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    fileio.write_bytes(f"gs://bkt/data/folder/sub{i % 2}/{i}.png", buffer.getvalue())
  config.dataset, config.data_dir = "folder", "gs://bkt/data/folder"
  input_pipeline.check_dataset(config, 8)
  loaded = input_pipeline.load_images(config, 8)
  assert loaded.shape == (3, 8, 8, 3)
  # Sorted listing: sub0/0.png, sub0/2.png, sub1/1.png.
  np.testing.assert_array_equal(loaded[:, :, :, 0], images[[0, 2, 1], :, :, 0])
