"""Scoring samples against a dataset: reference statistics (computed once, cached in a file), the metrics of
a samples file, the feature extractors with their weights files, and the periodic FID of the training loop
(docs/method.md section 5)."""
import dataclasses

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from ddpm_ip_jax import fileio
from ddpm_ip_jax import generation
from ddpm_ip_jax.evaluation import digits_training
from ddpm_ip_jax.evaluation import extractors
from ddpm_ip_jax.evaluation import metrics


def make_extractor(kind, weights):
  """The feature extractor `kind` (one of `extractors.EXTRACTORS`) with its user-supplied weights file (never
  downloaded)."""
  if kind == "inception":
    return metrics.inception_extractor(weights)
  if kind == "digits":
    return digits_training.load_extractor(weights)
  raise ValueError(f"unknown feature extractor {kind!r}; expected one of {extractors.EXTRACTORS}")


def save_reference_statistics(stats, path):
  """Writes the ReferenceStatistics `stats` to the `.npz` `path` (the arrays that are not None)."""
  fileio.save_npz(path, **{k: v for k, v in dataclasses.asdict(stats).items() if v is not None})


def load_reference_statistics(path):
  """The statistics `save_reference_statistics` wrote to `path`, read checked (`fileio.load_npz_checked`):
  OSError or ValueError naming the file for a missing, damaged or foreign one (e.g. a reference batch of images)."""
  what = "the reference statistics file"
  arrays = fileio.load_npz_checked(path, what, hint="Delete it (or give another --reference path) to compute "
                                   "them anew.")
  missing = {"mu", "sigma", "features"} - set(arrays)
  if missing:
    batch = (" It holds images (arr_0): a reference batch goes to --reference_npz, and --reference names where the "
             "statistics computed from it are kept." if "arr_0" in arrays else "")
    raise fileio.DamagedFileError(f"{what} {path} lacks {sorted(missing)}: not written by "
                                  "scoring.save_reference_statistics." + batch)
  for name, ndim in (("mu", 1), ("sigma", 2), ("features", 2), ("spatial_mu", 1), ("spatial_sigma", 2)):
    if name in arrays:
      fileio.check_array(arrays, name, path, what, kinds="fiu", shape=(None,) * ndim)
  fields = {f.name for f in dataclasses.fields(metrics.ReferenceStatistics)}
  return metrics.ReferenceStatistics(**{k: v for k, v in arrays.items() if k in fields})


def reference_images(config, *, reference_npz=None, num_images=0):
  """(uint8 [N,H,W,C] reference images, the other arrays of the reference batch): an `.npz` (`arr_0`, maybe with
  precomputed statistics beside it, read once) or the config's training data as preprocessed for training (no
  flip; no other arrays)."""
  if reference_npz:
    m = config.model  # the samples' size and channels: a batch of other images is refused, naming the file
    arrays = fileio.load_npz_checked(reference_npz, "--reference_npz",
                                     {"arr_0": ("u", (None, m.image_size, m.image_size, m.in_channels))})
    images = arrays.pop("arr_0")
    return (images[:num_images] if num_images else images), arrays
  from ddpm_ip_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  return input_pipeline.load_images(config.data, config.model.image_size, max_images=num_images or None), {}


def check_extractor_fits(extractor, config):
  """ValueError when the model's images are not what `extractor` takes (size, channels): found before sampling."""
  m = config.model
  if m.in_channels != extractor.channels:
    fitting = "digits" if m.in_channels == 1 else "inception"
    raise ValueError(f"the {extractor.name} extractor takes {extractor.channels}-channel images, the model makes "
                     f"{m.in_channels}-channel ones: use --extractor={fitting}.")
  if extractor.image_size is not None and m.image_size != extractor.image_size:
    raise ValueError(f"the {extractor.name} extractor takes {extractor.image_size}x{extractor.image_size} images, "
                     f"the model makes {m.image_size}x{m.image_size} ones.")


# The fewest sample images, and reference features, the metrics can score: precision/recall take each point's
# k-th nearest neighbour within its own set (k = 3, the OpenAI evaluator's), so k + 1 points; FID a covariance.
MIN_SAMPLES = 4


def check_reference_statistics(stats, path, extractor):
  """ValueError naming `path` when the statistics cannot score samples of `extractor`: arrays of the wrong shape,
  NaN/Inf entries, fewer than MIN_SAMPLES features, or another extractor's feature dimension. Runs before any
  sampling."""
  mu, sigma, features = (np.asarray(a) for a in (stats.mu, stats.sigma, stats.features))
  dim = mu.shape[-1] if mu.ndim else 0
  if extractor.feature_dim is not None and dim != extractor.feature_dim:
    raise ValueError(f"the reference statistics {path} have {dim}-dimensional features, the {extractor.name} "
                     f"extractor gives {extractor.feature_dim}: statistics of another extractor? Delete the file "
                     "or give another --reference path to compute them anew.")
  if mu.ndim != 1 or sigma.shape != (dim, dim) or features.ndim != 2 or features.shape[1] != dim:
    raise ValueError(f"the reference statistics {path} are inconsistent: mu {mu.shape}, sigma {sigma.shape}, "
                     f"features {features.shape} (want [D], [D, D], [N, D]); delete the file to compute them anew.")
  if features.shape[0] < MIN_SAMPLES:
    raise ValueError(f"the reference statistics {path} hold {features.shape[0]} feature vectors; precision/recall "
                     f"need at least {MIN_SAMPLES} (the reference's 50,000).")
  arrays = {"mu": mu, "sigma": sigma, "features": features, "spatial_mu": stats.spatial_mu,
            "spatial_sigma": stats.spatial_sigma}
  bad = [name for name, a in arrays.items() if a is not None and not np.all(np.isfinite(a))]
  if bad:
    raise ValueError(f"the reference statistics {path} hold NaN/Inf in {', '.join(bad)}; delete the file to "
                     "compute them anew.")


def load_or_compute_reference(path, config, extractor, *, reference_npz=None, num_images=0):
  """The ReferenceStatistics at `path`, computed and saved there first if the file does not exist; one that
  cannot score this extractor's samples is a ValueError (`check_reference_statistics`). On several processes
  every one calls it: the features are computed on all of them and process 0 writes the file."""
  check_extractor_fits(extractor, config)
  if _everywhere(fileio.exists(path)):
    stats = load_reference_statistics(path)
    check_reference_statistics(stats, path, extractor)
    return stats
  images, precomputed = reference_images(config, reference_npz=reference_npz, num_images=num_images)
  logging.info("Computing reference statistics of %d images with %s.", len(images), extractor.name)
  stats = metrics.reference_statistics(images, extractor)  # the features on every process
  _use_precomputed(stats, precomputed, reference_npz)
  if jax.process_index() == 0:
    save_reference_statistics(stats, path)
  return stats


def _use_precomputed(stats, arrays, path):
  """An OpenAI-format reference batch may carry precomputed `mu`/`sigma` (and `mu_s`/`sigma_s` for sFID); the
  evaluator uses them instead of the statistics of `arr_0`'s features (which still give precision/recall)."""
  pairs = (("mu", "sigma", ("mu", "sigma")), ("mu_s", "sigma_s", ("spatial_mu", "spatial_sigma")))
  for mu_key, sigma_key, attrs in pairs:
    computed = getattr(stats, attrs[0])
    if mu_key not in arrays or sigma_key not in arrays or computed is None:  # None: no spatial features
      continue
    mu, sigma = np.asarray(arrays[mu_key], np.float64), np.asarray(arrays[sigma_key], np.float64)
    if mu.shape != computed.shape or sigma.shape != (mu.shape[0], mu.shape[0]):
      raise ValueError(f"{path}: {mu_key} {mu.shape} / {sigma_key} {sigma.shape} do not fit the extractor's "
                       f"{computed.shape[0]}-dimensional features (statistics of another network?).")
    logging.info("Using the precomputed %s/%s of %s, as the evaluator does.", mu_key, sigma_key, path)
    setattr(stats, attrs[0], mu)
    setattr(stats, attrs[1], sigma)


def _everywhere(flag):
  """True when `flag` is true on every process (so that all of them take the same branch of a collective)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.min(multihost_utils.process_allgather(np.int32(bool(flag)))))


def score_samples(samples_npz, reference, extractor, distance_dtype="float16", fid_sqrt="sqrtm"):
  """Metrics of the uint8 samples in `samples_npz` (arr_0) against `reference`. On several processes every one
  calls it: the features are computed on all of them, the metrics once, by process 0 (the others get None)."""
  images = fileio.load_npz(samples_npz)["arr_0"]
  feats = metrics.extract_features(images, extractor)
  if jax.process_index() != 0:
    return None
  results = metrics.evaluate_features(feats, reference, extractor, distance_dtype=distance_dtype,
                                      fid_sqrt=fid_sqrt)
  results = {k: float(v) for k, v in results.items()}
  results["num_samples"] = int(len(images))
  return results


class PeriodicFid:
  """FID (and the other metrics) of the EMA params every `training.fid_every_steps` during training.

  Built at the start of training, so a missing weights file or dataset fails before anything compiles; the
  reference statistics are computed once (from the training data) and cached in the workdir.
  """

  def __init__(self, config, workdir):
    tcfg = config.training
    self.config, self.tcfg = config, tcfg
    self.extractor = make_extractor(tcfg.fid_extractor, tcfg.fid_weights)
    path = tcfg.fid_reference or fileio.join(workdir, f"reference_{tcfg.fid_extractor}.npz")
    self.reference = load_or_compute_reference(path, config, self.extractor)

  def __call__(self, params):
    images = generation.sample_in_memory(self.config, params, num_samples=self.tcfg.fid_num_samples,
                                         respacing=self.tcfg.fid_sampling_steps,
                                         per_device_batch=self.tcfg.fid_batch_size)
    return {k: float(v) for k, v in metrics.evaluate(images, self.reference, self.extractor).items()}
