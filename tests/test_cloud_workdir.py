"""Paths in a bucket (gs://), against a real local GCS server (tests/gcs_emulator.py): a training run writes its
config, checkpoints and grids into the bucket, survives SIGKILL and resumes from there to the parameters of an
uninterrupted run, and the sample command reads that workdir and writes its samples there; the evaluation
command reads the extractor's weights from the bucket and writes the reference statistics, the sample parts,
the samples file and the metrics there; nothing lands under the local working directory.

Not covered against the emulator: TensorBoard event files go through TensorFlow's GCS filesystem, which has no
endpoint setting (the runs here use tensorboard=False / --tensorboard=false).
"""
import io
import json
import os

from etils import epath
import jax
import numpy as np
import pytest

import gcs_emulator
from helpers import REPO, command, finish, load_config, popen, read_until, run

pytestmark = pytest.mark.slow  # command-line runs in subprocesses

@pytest.fixture(scope="module")
def gcs():
  with gcs_emulator.running(bucket="bkt") as env:
    yield dict(os.environ, **env)


def _run(cmd, env, cwd):
  """Runs the command in `cwd`; returns its stderr once it exited 0."""
  proc = run(cmd, env=env, cwd=cwd)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


def test_evaluate_reads_weights_from_and_writes_everything_to_the_bucket(gcs, tmp_path):
  from ddpm_ip_jax import input_pipeline, models, workdir  # pylint: disable=import-outside-toplevel
  from ddpm_ip_jax.evaluation import digits_training  # pylint: disable=import-outside-toplevel
  config = load_config("test")
  config.model.image_size, config.model.channel_mult = 16, (1, 2)  # the digits classifier's 16x16
  workdir.save_converted(config, models.init_params(models.create_model(config), jax.random.key(0)),
                         tmp_path / "toy16")
  images, labels = input_pipeline.load_digits(16)
  params, _ = digits_training.train_classifier(np.asarray(images), labels, epochs=1)
  digits_training.save_params(params, "gs://bkt/weights/digits.npz")
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  _run(command("evaluate", f"--checkpoint={tmp_path / 'toy16'}", "--extractor=digits",
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


def _flat_checkpoint(path):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  state = ocp.StandardCheckpointer().restore(path)
  return {k: np.asarray(v) for k, v in ocp.tree.to_flat_dict(state).items()}


def test_training_in_the_bucket_survives_sigkill_and_sampling_reads_it(gcs, tmp_path):
  args = [f"--config={REPO / 'configs' / 'test.py'}", "--config.training.num_train_steps=10",
          "--config.training.checkpoint_every_steps=2", "--config.training.log_every_steps=1",
          "--config.training.tensorboard=False"]
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  env = dict(gcs, PYTHONPATH=str(REPO))
  # The uninterrupted run alongside the one to be killed (the 2 cores take both). Its stderr goes to a file: a
  # pipe nobody reads fills, blocks its logging thread mid-request, and the one-at-a-time emulator with it.
  straight = popen(command("main", *args, "--workdir=gs://bkt/runs/straight"), env=env, cwd=cwd,
                   log=tmp_path / "straight.stderr")

  # SIGKILL once the checkpoint of step 4 is being written (step 2's is then complete), then the same command.
  killed = popen(command("main", *args, "--workdir=gs://bkt/runs/killed"), env=env, cwd=cwd)
  try:
    read_until(killed, "step 4: checkpoint")
    killed.kill()
    killed.wait(timeout=60)
  finally:
    if killed.poll() is None:
      killed.kill()
  assert killed.returncode == -9
  err = _run(command("main", *args, "--workdir=gs://bkt/runs/killed"), env, cwd)
  straight_err = finish(straight)
  assert straight.returncode == 0, straight_err[-3000:]
  resumed_from = int(err.split("Resuming from the checkpoint of step ")[1].split(".")[0])
  assert resumed_from in (2, 4), err[-3000:]

  run = epath.Path("gs://bkt/runs/killed")
  assert (run / "config.json").exists() and (run / "checkpoints" / "10").exists()
  assert any(p.name.endswith("_step_00000010.png") for p in (run / "samples").iterdir())
  a = _flat_checkpoint("gs://bkt/runs/killed/checkpoints/10/default")
  b = _flat_checkpoint("gs://bkt/runs/straight/checkpoints/10/default")
  assert a.keys() == b.keys()
  for k in a:  # the same compiled steps on the same data and noise: bit for bit
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)

  _run(command("sample", "--workdir=gs://bkt/runs/killed", "--num_samples=2", "--batch_size=1",
                "--steps=2"), env, cwd)
  (out,) = [p for p in run.iterdir() if p.name.startswith("samples_ancestral2_step10")]
  with np.load((out / "samples_2x8x8x1.npz").open("rb")) as f:
    assert f["arr_0"].shape == (2, 8, 8, 1)
  assert os.listdir(cwd) == []  # nothing under the local working directory
