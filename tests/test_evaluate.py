"""Digits classifier (the CPU stand-in for Inception) and the one-command evaluation."""
import json
import os

import jax
import numpy as np
import pytest

from helpers import cpu_env, run_command
from ddpm_ip_jax import config_base
from ddpm_ip_jax import input_pipeline, models, workdir
from ddpm_ip_jax.evaluation import digits_training, metrics, scoring


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
  images, labels = input_pipeline.load_digits(16)
  params, accuracy = digits_training.train_classifier(np.asarray(images), labels, epochs=4)
  path = str(tmp_path_factory.mktemp("dc") / "digits_classifier.npz")
  digits_training.save_params(params, path, accuracy=accuracy)
  return path, accuracy, np.asarray(images)


def test_digits_classifier_learns_and_digits_fid_separates_real_from_noise(classifier):
  path, accuracy, images = classifier
  assert accuracy > 0.9
  extractor = digits_training.load_extractor(path)
  reference = metrics.reference_statistics(images[:900], extractor)
  real = metrics.evaluate(images[900:1800], reference, extractor)
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, images[:900].shape, dtype=np.uint8)
  fake = metrics.evaluate(noise, reference, extractor)
  blurred = metrics.evaluate((images[900:1800] // 2).astype(np.uint8), reference, extractor)
  assert real["fid"] < 0.2 * blurred["fid"] and blurred["fid"] < fake["fid"]
  assert real["precision"] > 0.6 and real["recall"] > 0.6 and fake["precision"] < 0.1
  assert 4 < real["inception_score"] <= 10  # ten balanced classes: at most 10
  with pytest.raises(FileNotFoundError, match="digits_classifier --output"):
    digits_training.load_params("/nonexistent/dc.npz")


@pytest.mark.slow
def test_evaluate_command_end_to_end(classifier, tmp_path):
  path, _, _ = classifier
  config = config_base.get_config()
  m = config.model
  m.image_size, m.in_channels, m.model_channels, m.channel_mult = 16, 1, 32, (1, 2)
  m.num_res_blocks, m.attention_resolutions, m.learn_sigma = 1, (), True
  config.diffusion.noise_schedule = "cosine"
  config.data.dataset = "digits"
  params = models.init_params(models.create_model(config), jax.random.key(0))
  workdir.save_converted(config, params, tmp_path / "model")
  reference = tmp_path / "ref" / "digits.npz"
  args = [f"--checkpoint={tmp_path / 'model'}", "--extractor=digits", f"--weights={path}",
          f"--reference={reference}", "--num_samples=10", "--steps=3", "--batch_size=4",
          f"--output_dir={tmp_path / 'samples'}"]
  run = run_command("evaluate", *args, env=cpu_env(2))
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.loads((tmp_path / "samples" / "metrics_digits.json").read_text())
  assert results["num_samples"] == 10 and results["fid"] > 0 and 0 <= results["precision"] <= 1
  assert os.path.exists(reference)  # computed from the dataset, then reused
  stats = scoring.load_reference_statistics(reference)
  assert stats.features.shape == (1797, 64)
  assert os.path.exists(tmp_path / "samples" / "samples_10x16x16x1.npz")
  # A missing weights file fails at once, with where to get it.
  bad = run_command("evaluate", *args[:2], "--weights=/nonexistent.npz", *args[3:], env=cpu_env(2), timeout=120)
  assert bad.returncode != 0 and "digits_classifier --output" in bad.stderr


def test_reference_from_npz(classifier, tmp_path):
  path, _, images = classifier
  np.savez(tmp_path / "imgs.npz", arr_0=images[:50])
  config = config_base.get_config()
  config.model.image_size, config.model.in_channels = 16, 1  # what the digits extractor takes
  stats = scoring.load_or_compute_reference(str(tmp_path / "r.npz"), config,
                                                 digits_training.load_extractor(path),
                                                 reference_npz=str(tmp_path / "imgs.npz"))
  assert stats.features.shape == (50, 64)
  with pytest.raises(ValueError, match="unknown feature extractor"):
    scoring.make_extractor("clip", path)


@pytest.mark.slow
def test_periodic_fid_during_training(classifier, tmp_path):
  """training.fid_every_steps: the EMA params are scored during training and the scores logged."""
  from helpers import load_config
  from ddpm_ip_jax import train
  from tensorboard.backend.event_processing import event_accumulator
  path, _, _ = classifier
  config = load_config("digits")
  m = config.model
  m.model_channels, m.channel_mult, m.num_res_blocks = 32, (1,), 1
  t = config.training
  t.batch_size, t.num_train_steps, t.log_every_steps, t.checkpoint_every_steps = 4, 4, 2, 4
  t.sample_every_steps, t.num_grid_samples, t.grid_sampling_steps = 0, 4, "2"
  t.fid_every_steps, t.fid_num_samples, t.fid_sampling_steps, t.fid_batch_size = 2, 8, "2", 4
  t.fid_extractor, t.fid_weights = "digits", path
  train.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / "reference_digits.npz").exists()
  events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
  events.Reload()
  fid = [e for tag in events.Tags()["tensors"] if tag.endswith("/fid") for e in events.Tensors(tag)]
  assert sorted(e.step for e in fid) == [2, 4]
  # Missing weights: the run stops before training, with where to get them.
  t.fid_weights = str(tmp_path / "missing.npz")
  with pytest.raises(FileNotFoundError, match="digits_classifier --output"):
    train.train_and_evaluate(config, str(tmp_path / "other"))
  # The training's SIGTERM handler is gone once it returns: the default handler is back.
  import signal
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_an_openai_reference_batch_with_precomputed_statistics(classifier, tmp_path):
  """arr_0 images plus mu/sigma (as the ADM/DDPM-IP authors' reference batches carry): FID uses the precomputed
  statistics, precision/recall the features of arr_0; statistics of another dimension are refused."""
  path, _, images = classifier
  config = config_base.get_config()
  config.model.image_size, config.model.in_channels = 16, 1
  extractor = digits_training.load_extractor(path)
  mu, sigma = np.full(64, 0.25), 2.0 * np.eye(64)
  np.savez(tmp_path / "batch.npz", arr_0=images[:40], mu=mu, sigma=sigma)
  stats = scoring.load_or_compute_reference(str(tmp_path / "r.npz"), config, extractor,
                                            reference_npz=str(tmp_path / "batch.npz"))
  np.testing.assert_array_equal(stats.mu, mu)
  np.testing.assert_array_equal(stats.sigma, sigma)
  assert stats.features.shape == (40, 64)
  np.savez(tmp_path / "other.npz", arr_0=images[:40], mu=np.zeros(2048), sigma=np.eye(2048))
  with pytest.raises(ValueError, match="do not fit the extractor's 64-dimensional features"):
    scoring.load_or_compute_reference(str(tmp_path / "r2.npz"), config, extractor,
                                      reference_npz=str(tmp_path / "other.npz"))
