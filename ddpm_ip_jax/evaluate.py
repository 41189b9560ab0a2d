"""Full evaluation in one command: samples (resumed if present) -> FID, sFID, IS, precision/recall -> JSON.

  # Reference statistics of the training data (same preprocessing as training; REFERENCE.md sections 2, 5):
  python -m ddpm_ip_jax.evaluate --workdir=runs/cifar10 --reference=stats/cifar10_train.npz \
      --extractor=inception --weights=pt_inception-2015-12-05-6726825d.pth --reference_only
  # 50k samples with 100 ancestral steps, then every metric:
  python -m ddpm_ip_jax.evaluate --workdir=runs/cifar10 --reference=stats/cifar10_train.npz \
      --extractor=inception --weights=pt_inception-2015-12-05-6726825d.pth --num_samples=50000 --steps=100

When the `--reference` file does not exist it is computed first: from `--reference_npz` (uint8 NHWC `arr_0`, e.g.
the OpenAI reference batches) or from the config's dataset (`--num_reference` images, all if 0). The Inception
weights are never downloaded (see `evaluation.inception.WEIGHTS_HELP`). `--extractor=digits` scores the embedded
digits dataset with the project's digits classifier instead (`python -m ddpm_ip_jax.evaluation.digits_classifier`).
Results go to `<samples dir>/metrics_<extractor>.json`, to the log, and to the workdir's TensorBoard events.
"""
import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from ddpm_ip_jax import sample as sample_lib
from ddpm_ip_jax.evaluation import metrics

EXTRACTORS = ("inception", "digits")


def make_extractor(kind, weights):
  """The feature extractor `kind` with its user-supplied weights file."""
  if kind == "inception":
    return metrics.inception_extractor(weights)
  if kind == "digits":
    from ddpm_ip_jax.evaluation import digits_classifier  # pylint: disable=import-outside-toplevel
    return digits_classifier.digits_extractor(weights)
  raise ValueError(f"unknown feature extractor {kind!r}; expected one of {EXTRACTORS}")


def reference_images(config, *, reference_npz=None, num_images=0):
  """uint8 [N,H,W,C] reference images: an `.npz` (`arr_0`) or the config's training data, as preprocessed for
  training (no flip)."""
  if reference_npz:
    if not os.path.exists(reference_npz):
      raise FileNotFoundError(f"--reference_npz {reference_npz} not found")
    with np.load(reference_npz) as f:
      if "arr_0" not in f.files:
        raise ValueError(f"{reference_npz} has no arr_0 (uint8 NHWC images)")
      images = f["arr_0"]
    return images[:num_images] if num_images else images
  from ddpm_ip_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  return input_pipeline.load_images(config.data, config.model.image_size, max_images=num_images or None)


def load_or_compute_reference(path, config, extractor, *, reference_npz=None, num_images=0):
  """The ReferenceStatistics at `path`, computed and saved there first if the file does not exist."""
  if os.path.exists(path):
    return metrics.ReferenceStatistics.load(path)
  images = reference_images(config, reference_npz=reference_npz, num_images=num_images)
  logging.info("Computing reference statistics of %d images with %s.", len(images), extractor.name)
  stats = metrics.reference_statistics(images, extractor)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  stats.save(tmp)
  os.replace(tmp, path)
  return stats


def score_samples(samples_npz, reference, extractor):
  """Metrics of the uint8 samples in `samples_npz` (arr_0) against `reference`."""
  with np.load(samples_npz) as f:
    images = f["arr_0"]
  results = metrics.evaluate(images, reference, extractor)
  results = {k: float(v) for k, v in results.items()}
  results["num_samples"] = int(len(images))
  return results


def sample_in_memory(config, params, *, num_samples, respacing, per_device_batch, seed=0, sampler="ancestral"):
  """uint8 samples [N,H,W,C] of `params` on the local devices, kept in memory (no files): for periodic FID."""
  devices = tuple(jax.local_devices())
  p_sample = sample_lib.pmapped_sampler(config.to_json(), respacing, sampler, 0.0, True, int(seed), devices, None)
  per_call = per_device_batch * len(devices)
  images = []
  for start in range(0, num_samples, per_call):
    images.append(sample_lib.draw_samples(p_sample, params, start, len(devices), per_device_batch)[0])
  return np.concatenate(images)[:num_samples]


class PeriodicFid:
  """FID (and the other metrics) of the EMA params every `training.fid_every_steps` during training.

  Built at the start of training, so a missing weights file or dataset fails before anything compiles; the
  reference statistics are computed once (from the training data) and cached in the workdir.
  """

  def __init__(self, config, workdir):
    tcfg = config.training
    self.config, self.tcfg = config, tcfg
    self.extractor = make_extractor(tcfg.fid_extractor, tcfg.fid_weights)
    path = tcfg.fid_reference or os.path.join(workdir, f"reference_{tcfg.fid_extractor}.npz")
    self.reference = load_or_compute_reference(path, config, self.extractor)

  def __call__(self, params):
    images = sample_in_memory(self.config, params, num_samples=self.tcfg.fid_num_samples,
                              respacing=self.tcfg.fid_sampling_steps, per_device_batch=self.tcfg.fid_batch_size)
    return {k: float(v) for k, v in metrics.evaluate(images, self.reference, self.extractor).items()}


FLAGS = flags.FLAGS


def define_flags():
  sample_lib.define_flags()
  flags.DEFINE_enum("extractor", "inception", EXTRACTORS, "Feature network for the metrics.")
  flags.DEFINE_string("weights", None, "Weights file of the extractor (Inception .pth/.npz, or the digits "
                      "classifier .npz). Never downloaded.")
  flags.DEFINE_string("reference", None, "Reference statistics .npz; computed and saved there if missing.")
  flags.DEFINE_string("reference_npz", None, "Compute the reference from these uint8 images (arr_0) instead "
                      "of the config's dataset.")
  flags.DEFINE_integer("num_reference", 0, "Reference images from the dataset (0: all).")
  flags.DEFINE_bool("reference_only", False, "Only compute the reference statistics.")


def main(argv):
  del argv
  for name in ("weights", "reference"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  extractor = make_extractor(FLAGS.extractor, FLAGS.weights)  # a missing weights file fails here, first
  loaded = sample_lib.load_from_flags()
  reference = load_or_compute_reference(FLAGS.reference, loaded.config, extractor,
                                        reference_npz=FLAGS.reference_npz, num_images=FLAGS.num_reference)
  if FLAGS.reference_only:
    logging.info("Reference statistics in %s.", FLAGS.reference)
    return
  samples, out_dir = sample_lib.generate_from_flags(loaded)
  results = score_samples(samples, reference, extractor)
  scalars = dict(results)
  results.update(model=loaded.description, step=loaded.step, samples=samples,
                 reference=os.path.abspath(FLAGS.reference), extractor=FLAGS.extractor)
  path = os.path.join(out_dir, f"metrics_{FLAGS.extractor}.json")
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
  logging.info("Wrote %s: %s", path, scalars)
  if FLAGS.workdir:
    from clu import metric_writers  # pylint: disable=import-outside-toplevel
    writer = metric_writers.create_default_writer(FLAGS.workdir, just_logging=False)
    tag = os.path.basename(out_dir)
    writer.write_scalars(loaded.step, {f"eval/{tag}/{k}": v for k, v in scalars.items()})
    writer.flush()
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  define_flags()
  app.run(main)
