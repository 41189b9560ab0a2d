"""Sample-quality metrics as the OpenAI evaluator computes them (docs/method.md section 5): FID, sFID,
Inception Score, improved precision/recall (k = 3), in float64 numpy; and `evaluate`, which runs any
`FeatureExtractor` (the FID InceptionV3, or a small digits classifier on CPU) over uint8 samples.

  extractor = inception_extractor("pt_inception-2015-12-05-6726825d.pth")
  ref = reference_statistics(train_images_uint8, extractor)      # ReferenceStatistics
  metrics = evaluate(samples_uint8, ref, extractor)              # {"fid": ..., "sfid": ..., ...}
"""
import dataclasses
import warnings
from typing import Any, Callable, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special

from ddpm_ip_jax.evaluation import inception


def compute_statistics(features):
  """(mu [D], sigma [D,D]) of features [N,D] in float64; sigma is the unbiased (N-1) covariance, as
  pytorch-fid and the OpenAI evaluator."""
  f = np.asarray(features, dtype=np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"features must be [N, D] with N >= 2, got shape {f.shape}.")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(a):
  """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


FID_SQRT_METHODS = ("sqrtm", "eigh")


def _trace_sqrt_product_sqrtm(s1, s2, eps=1e-6):
  """tr((S1 S2)^(1/2)) as the OpenAI evaluator takes it (`frechet_distance` in evaluations/evaluator.py):
  scipy.linalg.sqrtm of S1 S2; only if that is not finite, again with eps added to both diagonals; a complex
  result must have a (near) zero imaginary diagonal and its real part is used. scipy's warning on singular
  products is silenced as the evaluator's disp=False silences it: the result is checked here instead."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.all(np.isfinite(covmean)):
      offset = np.eye(s1.shape[0]) * eps
      covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
  if np.iscomplexobj(covmean):
    imag = np.max(np.abs(np.diagonal(covmean).imag))
    if imag > 1e-3:
      raise ValueError(f"the matrix square root for FID has an imaginary diagonal part of {imag:.3g} (the "
                       "evaluator refuses these statistics too); fid_sqrt='eigh' gives the real-valued root")
    covmean = covmean.real
  return np.trace(covmean)


def _trace_sqrt_product_eigh(s1, s2):
  """tr((S1 S2)^(1/2)) without a general matrix square root: S1 S2 is similar to the symmetric PSD matrix
  M = S1^(1/2) S2 S1^(1/2), so the trace is the sum of the square roots of M's eigenvalues (clipped at 0).
  Two symmetric eigendecompositions: never complex, and stable when S1 S2 is singular (N < D)."""
  root1 = _sqrt_psd(s1)
  m = root1 @ s2 @ root1
  return np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)))


def frechet_distance(mu1, sigma1, mu2, sigma2, sqrt_method="sqrtm"):
  """Fréchet distance |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) in float64.

  sqrt_method "sqrtm" takes the square root as the OpenAI evaluator does (scipy.linalg.sqrtm and its
  fallbacks, step for step); "eigh" by symmetric eigendecomposition, the same number wherever sqrtm is accurate
  (test_metrics.py) and real-valued where it is not (fewer samples than dimensions).
  """
  if sqrt_method not in FID_SQRT_METHODS:
    raise ValueError(f"FID square root {sqrt_method!r}; expected one of {FID_SQRT_METHODS}")
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
    raise ValueError(f"statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}.")
  for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{name} has non-finite entries.")
  if sqrt_method == "sqrtm":
    tr_covmean = _trace_sqrt_product_sqrtm(s1, s2)
  else:
    tr_covmean = _trace_sqrt_product_eigh(s1, s2)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def inception_score(logits_or_probs, split_size=5000, from_logits=True):
  """Inception Score (mean, std over the chunks): exp(E_x KL(p(y|x) || p(y))) per chunk of `split_size`
  consecutive samples (the last one may be shorter), as the OpenAI evaluator computes it
  (`compute_inception_score`: the 1008-way softmax of the unbiased logits, chunks of 5000; 10 chunks for 50k).
  `from_logits=False`: rows are probabilities already.
  """
  x = np.asarray(logits_or_probs, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f"expected [N, classes], got shape {x.shape}.")
  if split_size < 1 or x.shape[0] < 1:
    raise ValueError(f"split_size={split_size} and N={x.shape[0]} must be positive.")
  if from_logits:
    probs = np.exp(scipy.special.log_softmax(x, axis=1))
  else:
    if np.any(x < 0) or not np.allclose(x.sum(axis=1), 1, atol=1e-4):
      raise ValueError("probabilities must be non-negative rows summing to 1 (or pass from_logits=True).")
    probs = x
  scores = []
  for start in range(0, probs.shape[0], split_size):
    part = probs[start:start + split_size]
    kl = scipy.special.rel_entr(part, part.mean(axis=0, keepdims=True)).sum(axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))


DISTANCE_DTYPES = ("float16", "float64")


def _sq_distances(a, b, dtype="float16"):
  """Pairwise squared Euclidean distances [len(a), len(b)], |a|^2 - 2 a.b + |b|^2 clipped at 0.

  "float16" is the OpenAI evaluator's (`DistanceBlock`: the features cast to float16 and the distance computed
  in float16, each operation's result rounded to float16 with float32 accumulation here; float32 for the whole
  block when any float16 value is not finite); "float64" is exact to float64."""
  if dtype == "float64":
    d = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]
    return np.maximum(d, 0)
  if dtype != "float16":
    raise ValueError(f"distance dtype {dtype!r}; expected one of {DISTANCE_DTYPES}")
  with np.errstate(over="ignore", invalid="ignore"):
    a16, b16 = np.asarray(a, np.float16), np.asarray(b, np.float16)
    na = np.sum(np.square(a16), axis=1, dtype=np.float32).astype(np.float16)
    nb = np.sum(np.square(b16), axis=1, dtype=np.float32).astype(np.float16)
    dot = (a16.astype(np.float32) @ b16.astype(np.float32).T).astype(np.float16)
    d = np.maximum((na[:, None] - np.float16(2) * dot) + nb[None, :], np.float16(0))
  if np.all(np.isfinite(d)):
    return d.astype(np.float32)
  a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
  d = (a32 * a32).sum(1)[:, None] - 2 * a32 @ b32.T + (b32 * b32).sum(1)[None, :]
  return np.maximum(d, 0)


def knn_radii(features, k=3, batch_size=2000, dtype="float16"):
  """Squared distance [N] from each point to its k-th nearest neighbour in the same set (itself excluded:
  the (k+1)-th smallest distance counting itself), computed in batch_size x batch_size blocks, with the
  distances of `dtype` (`_sq_distances`)."""
  f = np.asarray(features, dtype=np.float64)
  n = f.shape[0]
  if not 1 <= k < n:
    raise ValueError(f"k={k} needs at least k+1={k + 1} points, got {n}.")
  radii = np.empty(n)
  for r in range(0, n, batch_size):
    best = np.full((min(r + batch_size, n) - r, 0), np.inf)   # the k+1 smallest so far, unsorted
    for c in range(0, n, batch_size):
      block = np.concatenate([best, _sq_distances(f[r:r + batch_size], f[c:c + batch_size], dtype)], axis=1)
      best = np.partition(block, k, axis=1)[:, :k + 1] if block.shape[1] > k + 1 else block
    radii[r:r + batch_size] = np.partition(best, k, axis=1)[:, k]
  return radii


def _mutual_coverage(real, real_radii, fake, fake_radii, batch_size, dtype):
  """([len(real)], [len(fake)]) bool: the point lies within (<=) the k-NN ball of at least one point of
  the other set; one pass over the real x fake distance blocks serves both directions."""
  real_in = np.zeros(real.shape[0], bool)
  fake_in = np.zeros(fake.shape[0], bool)
  for r in range(0, real.shape[0], batch_size):
    for c in range(0, fake.shape[0], batch_size):
      d = _sq_distances(real[r:r + batch_size], fake[c:c + batch_size], dtype)   # [real block, fake block]
      real_in[r:r + batch_size] |= np.any(d <= fake_radii[None, c:c + batch_size], axis=1)
      fake_in[c:c + batch_size] |= np.any(d <= real_radii[r:r + batch_size, None], axis=0)
  return real_in, fake_in


def precision_recall(real_features, fake_features, k=3, batch_size=2000, dtype="float16"):
  """Improved precision and recall (Kynkäänniemi et al. 2019) as in the OpenAI evaluator.

  Each set's manifold is the union of balls around its points with radius the distance to the k-th
  nearest neighbour within the set. precision = fraction of fake points inside the real manifold;
  recall = fraction of real points inside the fake manifold. Distances in blocks of batch_size^2 (memory
  bounded whatever N), in float16 as the evaluator computes them, or exactly with dtype="float64".
  """
  real = np.asarray(real_features, dtype=np.float64)
  fake = np.asarray(fake_features, dtype=np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"features must be [N, D] with the same D, got {real.shape} and {fake.shape}.")
  real_radii = knn_radii(real, k, batch_size, dtype)
  fake_radii = knn_radii(fake, k, batch_size, dtype)
  real_in, fake_in = _mutual_coverage(real, real_radii, fake, fake_radii, batch_size, dtype)
  return float(fake_in.mean()), float(real_in.mean())  # (precision, recall)


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
  """Any network standing in for the FID Inception: `apply_fn(params, images)` maps uint8 images
  [B,H,W,channels] to {"pool": [B,D] (FID, precision/recall), optionally "logits": [B,K] (Inception Score)
  and "spatial": [B,S] (sFID)}. It is jitted by `extract_features`, params passed as an argument (not
  baked into the compiled program)."""
  name: str
  apply_fn: Callable[[Any, jax.Array], dict]
  params: Any
  channels: int = 3
  image_size: Optional[int] = None   # the only image size it takes (None: any, e.g. Inception resizes to 299)
  feature_dim: Optional[int] = None  # D of "pool"


def inception_extractor(weights_path, precision="highest"):
  """The FID InceptionV3 with the user-supplied weights (`inception.WEIGHTS_HELP` says where to get them)."""
  model = inception.InceptionV3(precision=precision)
  params = jax.tree.map(jnp.asarray, inception.load_inception_params(weights_path))
  return FeatureExtractor(name="inception_v3_fid", params=params, feature_dim=2048,
                          apply_fn=lambda p, x: model.apply({"params": p}, x))


def _check_images(images, extractor):
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 [N,H,W,C] in [0, 255] (the sample .npz format), "
                     f"got {images.dtype}.")
  if images.ndim != 4 or images.shape[-1] != extractor.channels or images.shape[0] == 0:
    raise ValueError(f"images must be [N,H,W,{extractor.channels}] with N >= 1 for extractor "
                     f"{extractor.name}, got shape {images.shape}.")
  size = extractor.image_size
  if size is not None and images.shape[1:3] != (size, size):
    raise ValueError(f"the {extractor.name} extractor takes {size}x{size} images, got "
                     f"{images.shape[1]}x{images.shape[2]} ones.")
  return images


def extract_features(images, extractor, batch_size=100):
  """{output name: float64 [N, ...]} of `extractor` over uint8 images [N,H,W,C], in jitted batches of
  `batch_size` (the last one padded, so a single compilation).

  On several processes every one of them must call it with the same images: process p computes batches p,
  p + P, p + 2P, ... (each exactly as one process would, so the features are bit for bit the same) and the
  features are gathered to all of them."""
  images = _check_images(images, extractor)
  fn = jax.jit(extractor.apply_fn)
  n = images.shape[0]
  size = min(n, batch_size)  # every batch has this many rows (the last one padded)
  num_batches = -(-n // size)
  hosts, host = jax.process_count(), jax.process_index()

  def batch(b):
    rows = images[b * size:(b + 1) * size] if b < num_batches else images[:0]
    if rows.shape[0] < size:
      rows = np.concatenate([rows, np.zeros((size - rows.shape[0],) + images.shape[1:], np.uint8)])
    return {k: np.asarray(v) for k, v in fn(extractor.params, rows).items()}  # float32: gathered as they are

  mine = [batch(b) for b in range(host, hosts * -(-num_batches // hosts), hosts)]  # past the end: padding
  stacked = {k: np.stack([m[k] for m in mine]) for k in mine[0]}  # [batches of this process, size, ...]
  if hosts > 1:
    logging.info("%s features of %d images: %d of the %d batches on process %d.", extractor.name, n,
                 len(range(host, num_batches, hosts)), num_batches, host)
    gathered = multihost_utils.process_allgather(stacked)  # [hosts, batches per process, size, ...]
    stacked = {k: np.swapaxes(np.asarray(v), 0, 1).reshape((-1,) + v.shape[2:]) for k, v in gathered.items()}
  # Batch b is row b now (round-robin order undone); drop the padding rows.
  return {k: v.reshape((-1,) + v.shape[2:])[:n].astype(np.float64) for k, v in stacked.items()}


@dataclasses.dataclass
class ReferenceStatistics:
  """What a sample set is scored against: pool-feature mean/covariance (FID), the pool features
  themselves (precision/recall) and, if the extractor has them, the spatial mean/covariance (sFID). Its file:
  `scoring.save_reference_statistics` / `load_reference_statistics`."""
  mu: np.ndarray
  sigma: np.ndarray
  features: np.ndarray
  spatial_mu: Optional[np.ndarray] = None
  spatial_sigma: Optional[np.ndarray] = None


def reference_statistics(images, extractor, batch_size=100):
  """ReferenceStatistics of uint8 reference images [N,H,W,C] (preprocessed as the training data)."""
  feats = extract_features(images, extractor, batch_size)
  mu, sigma = compute_statistics(feats["pool"])
  stats = ReferenceStatistics(mu=mu, sigma=sigma, features=feats["pool"].astype(np.float32))
  if "spatial" in feats:
    stats.spatial_mu, stats.spatial_sigma = compute_statistics(feats["spatial"])
  return stats


def evaluate(sample_images, reference, extractor, batch_size=100, k=3, is_split_size=5000,
             distance_dtype="float16", fid_sqrt="sqrtm"):
  """Scores uint8 samples [N,H,W,C] against `reference` (ReferenceStatistics of the same extractor):
  {"fid", "precision", "recall"} plus "sfid" with spatial features and "inception_score" /
  "inception_score_std" with logits."""
  return evaluate_features(extract_features(sample_images, extractor, batch_size), reference, extractor, k=k,
                           is_split_size=is_split_size, distance_dtype=distance_dtype, fid_sqrt=fid_sqrt)


def evaluate_features(feats, reference, extractor, k=3, is_split_size=5000, distance_dtype="float16",
                      fid_sqrt="sqrtm"):
  """`evaluate` from the features `extract_features` gave (the metric arithmetic alone)."""
  if reference.mu.shape[0] != reference.features.shape[1]:
    raise ValueError("reference statistics are inconsistent: mu and features differ in dimension.")
  if feats["pool"].shape[1] != reference.mu.shape[0]:
    raise ValueError(f"extractor {extractor.name} gives {feats['pool'].shape[1]} features, the reference "
                     f"statistics {reference.mu.shape[0]}: they come from different extractors.")
  mu, sigma = compute_statistics(feats["pool"])
  out = {"fid": frechet_distance(mu, sigma, reference.mu, reference.sigma, sqrt_method=fid_sqrt)}
  out["precision"], out["recall"] = precision_recall(reference.features, feats["pool"], k=k, dtype=distance_dtype)
  if "spatial" in feats and reference.spatial_mu is not None:
    out["sfid"] = frechet_distance(*compute_statistics(feats["spatial"]), reference.spatial_mu,
                                   reference.spatial_sigma, sqrt_method=fid_sqrt)
  if "logits" in feats:
    out["inception_score"], out["inception_score_std"] = inception_score(
        feats["logits"], split_size=is_split_size)
  return out


def sfid(spatial_real, spatial_fake):
  """sFID: the Fréchet distance between the spatial features [N,2023] of two image sets."""
  return frechet_distance(*compute_statistics(spatial_real), *compute_statistics(spatial_fake))
