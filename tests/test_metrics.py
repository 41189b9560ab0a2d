"""FID, Inception Score, precision/recall and `evaluate` on cases with known answers."""
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from ddpm_ip_jax.evaluation import metrics
from ddpm_ip_jax.evaluation import scoring


def _fid_sqrtm(mu1, s1, mu2, s2):
  """The textbook computation: scipy.linalg.sqrtm of S1 S2 in float64, real part."""
  covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n,d", [(200, 16), (32, 48)])  # the second: N < D, singular covariances
def test_frechet_distance_matches_sqrtm(n, d):
  rng = np.random.default_rng(0)
  a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
  b = rng.normal(0.3, 1.5, size=(n, d)) @ rng.normal(size=(d, d))
  mu1, s1 = metrics.compute_statistics(a)
  mu2, s2 = metrics.compute_statistics(b)
  np.testing.assert_allclose(mu1, a.mean(0))
  np.testing.assert_allclose(s1, np.cov(a.T))
  textbook = _fid_sqrtm(mu1, s1, mu2, s2)
  assert textbook > 1
  # The default is the evaluator's own method; the eigendecomposition agrees with it.
  assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(textbook, rel=1e-12)
  ours = metrics.frechet_distance(mu1, s1, mu2, s2, sqrt_method="eigh")
  assert ours == pytest.approx(textbook, rel=1e-7)
  for method in metrics.FID_SQRT_METHODS:
    assert metrics.frechet_distance(mu2, s2, mu1, s1, sqrt_method=method) == pytest.approx(ours, rel=1e-7)
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1, sqrt_method=method)) < 1e-7 * np.trace(s1)


def test_frechet_sqrtm_follows_the_evaluator_when_the_root_is_not_finite_or_complex(monkeypatch):
  """The evaluator's fallbacks: a non-finite sqrtm is retaken with 1e-6 on both diagonals; a complex one keeps
  its real part when the imaginary diagonal is below 1e-3, and is refused otherwise."""
  rng = np.random.default_rng(2)
  s1, s2 = np.cov(rng.normal(size=(40, 5)).T), np.cov(rng.normal(size=(40, 5)).T)
  real_sqrtm, calls = scipy.linalg.sqrtm, []

  def first_not_finite(m):
    calls.append(m)
    return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

  monkeypatch.setattr(scipy.linalg, "sqrtm", first_not_finite)
  fid = metrics.frechet_distance(np.zeros(5), s1, np.zeros(5), s2)
  np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(5)) @ (s2 + 1e-6 * np.eye(5)), rtol=0, atol=0)
  expected = np.trace(s1) + np.trace(s2) - 2 * np.trace(real_sqrtm(calls[1]).real)
  assert fid == pytest.approx(expected, rel=1e-12)

  for imag, refused in ((1e-4, False), (1e-2, True)):
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m, imag=imag: real_sqrtm(m) + 1j * imag * np.eye(len(m)))
    if refused:
      with pytest.raises(ValueError, match="imaginary.*eigh"):
        metrics.frechet_distance(np.zeros(5), s1, np.zeros(5), s2)
    else:
      assert metrics.frechet_distance(np.zeros(5), s1, np.zeros(5), s2) == pytest.approx(
          np.trace(s1) + np.trace(s2) - 2 * np.trace(real_sqrtm(s1 @ s2).real), rel=1e-12)
  with pytest.raises(ValueError, match="square root 'svd'"):
    metrics.frechet_distance(np.zeros(5), s1, np.zeros(5), s2, sqrt_method="svd")


def test_frechet_distance_diagonal_closed_form():
  """Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2."""
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
  v1, v2 = rng.uniform(0.1, 3, 10), rng.uniform(0.1, 3, 10)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  assert metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_rejects_mismatched_statistics():
  with pytest.raises(ValueError, match="do not match"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="non-finite"):
    metrics.frechet_distance(np.zeros(2), np.eye(2), np.array([0, np.nan]), np.eye(2))


def test_inception_score_known_cases():
  # Uniform predictions: p(y|x) = p(y), KL = 0, score 1.
  assert metrics.inception_score(np.zeros((40, 1008)), split_size=10) == pytest.approx((1.0, 0.0))
  # Confident one-hot predictions spread evenly over N classes: score N (in every split).
  n_classes = 5
  labels = np.tile(np.arange(n_classes), 8)                    # 40 samples, each split holds all 5
  probs = np.eye(10)[labels]
  assert metrics.inception_score(probs, split_size=20, from_logits=False) == pytest.approx((5.0, 0.0))
  mean, _ = metrics.inception_score(60.0 * np.eye(10)[labels])  # near one-hot logits
  assert mean == pytest.approx(5.0, rel=1e-9)
  # Half the splits one class only (score 1), half two classes (score 2): mean 1.5, std 0.5.
  probs = np.eye(3)[[0, 0, 0, 0, 1, 2, 1, 2]]
  assert metrics.inception_score(probs, split_size=4, from_logits=False) == pytest.approx((1.5, 0.5))


def test_inception_score_matches_direct_formula():
  logits = np.random.default_rng(2).normal(size=(30, 7)) * 2
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = [np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0, keepdims=True))), 1)))
            for q in (p[:10], p[10:20], p[20:])]
  assert metrics.inception_score(logits, split_size=10) == pytest.approx((np.mean(scores), np.std(scores)))


def _brute_force_pr(real, fake, k):
  def radii(x):
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, k]
  d = ((fake[:, None] - real[None]) ** 2).sum(-1)              # [fake, real]
  precision = np.mean(np.any(d <= radii(real)[None], axis=1))
  recall = np.mean(np.any(d <= radii(fake)[:, None], axis=0))
  return precision, recall


def test_precision_recall_known_cases():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(50, 4))
  assert metrics.precision_recall(a, a.copy()) == (1.0, 1.0)
  assert metrics.precision_recall(a, a + 100.0) == (0.0, 0.0)   # disjoint, far-apart clusters
  # By hand, 1-D, k = 1. Real 0, 1, 3: radii 1, 1, 2 -> balls [-1,1], [0,2], [1,5].
  # Fake 0.5, 4.5, 9, 10: radii 4, 4, 1, 1 -> balls [-3.5,4.5], [0.5,8.5], [8,10], [9,11].
  # Precision: 0.5 and 4.5 are in real balls, 9 and 10 not -> 0.5; recall: 0, 1, 3 all covered -> 1.
  real = np.array([[0.0], [1.0], [3.0]])
  fake = np.array([[0.5], [4.5], [9.0], [10.0]])
  assert metrics.precision_recall(real, fake, k=1) == (0.5, 1.0)
  np.testing.assert_array_equal(metrics.knn_radii(fake, k=1), [16.0, 16.0, 1.0, 1.0])  # squared


def test_precision_recall_k3_matches_brute_force_with_blocks():
  rng = np.random.default_rng(4)
  real = rng.normal(size=(70, 5))
  fake = rng.normal(0.4, 1.3, size=(55, 5))
  expected = _brute_force_pr(real, fake, k=3)
  assert 0 < expected[0] < 1 and 0 < expected[1] < 1
  for batch_size in (7, 16, 1000):  # blocks smaller than k+1 columns, uneven, and a single block
    got = metrics.precision_recall(real, fake, k=3, batch_size=batch_size, dtype="float64")
    assert got == pytest.approx(expected, abs=1e-12)
  # The evaluator's float16 distances move only points on a ball's edge.
  half = metrics.precision_recall(real, fake, k=3)
  assert half == pytest.approx(expected, abs=0.05)


def test_float16_distances_are_the_evaluators():
  """Against TensorFlow's float16 computation of the OpenAI evaluator's `_batch_pairwise_distances`."""
  tf = pytest.importorskip("tensorflow")
  rng = np.random.default_rng(5)
  a, b = rng.gamma(1.0, 0.5, size=(40, 64)), rng.gamma(1.0, 0.5, size=(30, 64))  # like pool features: >= 0
  u, v = tf.cast(tf.constant(a, tf.float32), tf.float16), tf.cast(tf.constant(b, tf.float32), tf.float16)
  norm_u, norm_v = tf.reduce_sum(tf.square(u), 1), tf.reduce_sum(tf.square(v), 1)
  expected = tf.maximum(tf.reshape(norm_u, [-1, 1]) - 2 * tf.matmul(u, v, False, True) + tf.reshape(norm_v, [1, -1]),
                        0.0).numpy()
  assert expected.dtype == np.float16
  got = metrics._sq_distances(a, b)  # pylint: disable=protected-access
  exact = metrics._sq_distances(a, b, "float64")  # pylint: disable=protected-access
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, expected.astype(np.float32), rtol=2e-3, atol=2e-2)
  assert np.abs(got - exact).max() > 1e-4  # float16 indeed, not float64


def test_float16_distances_fall_back_to_float32_where_not_finite():
  rng = np.random.default_rng(6)
  a, b = rng.normal(300, 1, size=(5, 8)), rng.normal(300, 1, size=(6, 8))  # squared norms overflow float16
  a32, b32 = a.astype(np.float32), b.astype(np.float32)
  expected = np.maximum((a32 * a32).sum(1)[:, None] - 2 * a32 @ b32.T + (b32 * b32).sum(1)[None, :], 0)
  np.testing.assert_array_equal(metrics._sq_distances(a, b), expected)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="distance dtype"):
    metrics._sq_distances(a, b, "float32")  # pylint: disable=protected-access


def _toy_extractor():
  """A stand-in network: pool = per-channel means and the mean image's corner, logits, spatial."""
  def apply_fn(params, images):
    x = images.astype(jnp.float32) / 255.0                    # [B,H,W,C]
    pool = jnp.concatenate([x.mean(axis=(1, 2)), x[:, :2, :2].reshape(x.shape[0], -1)], -1) * params
    return {"pool": pool, "logits": pool[:, :4] * 10, "spatial": x[:, 0].reshape(x.shape[0], -1)}
  return metrics.FeatureExtractor(name="toy", apply_fn=apply_fn, params=jnp.float32(2.0), channels=3)


def test_evaluate_with_any_extractor(tmp_path):
  rng = np.random.default_rng(5)
  ref_images = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
  extractor = _toy_extractor()
  ref = metrics.reference_statistics(ref_images, extractor, batch_size=8)  # 30 = 3 x 8 + padded 6
  direct = np.asarray(extractor.apply_fn(2.0, ref_images)["pool"], np.float64)
  np.testing.assert_allclose(ref.features, direct, rtol=1e-6)
  scoring.save_reference_statistics(ref, tmp_path / "ref.npz")
  loaded = scoring.load_reference_statistics(tmp_path / "ref.npz")
  np.testing.assert_array_equal(loaded.sigma, ref.sigma)
  np.testing.assert_array_equal(loaded.spatial_mu, ref.spatial_mu)

  same = metrics.evaluate(ref_images, loaded, extractor, batch_size=8, is_split_size=8)
  assert set(same) == {"fid", "precision", "recall", "sfid", "inception_score", "inception_score_std"}
  assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6
  assert same["precision"] == 1.0 and same["recall"] == 1.0
  darker = metrics.evaluate(ref_images // 4, loaded, extractor, batch_size=8)
  assert darker["fid"] > 0.1 and darker["precision"] < 0.5

  with pytest.raises(ValueError, match="uint8"):
    metrics.evaluate(ref_images.astype(np.float32), loaded, extractor)
  with pytest.raises(ValueError, match=r"\[N,H,W,3\]"):
    metrics.evaluate(ref_images[..., :1], loaded, extractor)
  other = metrics.FeatureExtractor("other", lambda p, x: {"pool": x.reshape(x.shape[0], -1)[:, :5]}, None)
  with pytest.raises(ValueError, match="different extractors"):
    metrics.evaluate(ref_images, loaded, other)
