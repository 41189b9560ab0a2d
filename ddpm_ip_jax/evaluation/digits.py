"""A small digits classifier: the stand-in for Inception on the embedded digits dataset ("digits FID").

`python -m ddpm_ip_jax.evaluation.digits_classifier --output=runs/digits_classifier.npz` (the command) trains a
small CNN on scikit-learn's digits at 16x16 (the training pipeline's preprocessing), holds out 20% to
report its accuracy, and saves the weights. `digits_extractor(path)` turns them into a `FeatureExtractor`
whose "pool" features (the 64-d penultimate layer) give FID and precision/recall, and whose 10 logits give an
Inception-Score analogue (at most 10). Training is seeded and takes well under a minute on 2 CPU cores.
"""
import json

from absl import logging
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpm_ip_jax import fileio
from ddpm_ip_jax import images as images_lib
from ddpm_ip_jax.evaluation import metrics

IMAGE_SIZE = 16


class DigitsNet(nn.Module):
  """uint8 or [-1, 1] images [B,16,16,1] -> {"pool": [B,64], "logits": [B,10]}."""

  @nn.compact
  def __call__(self, images, train=False):
    x = images_lib.to_model_range(images) if images.dtype == jnp.uint8 else images.astype(jnp.float32)
    for features in (32, 64):
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    pool = nn.relu(nn.Dense(64)(x))
    h = nn.Dropout(0.3, deterministic=not train)(pool)
    return {"pool": pool, "logits": nn.Dense(10)(h)}


def train_classifier(images, labels, *, seed=0, epochs=30, batch_size=64, learning_rate=1e-3, holdout=0.2):
  """Trains on uint8 images [N,16,16,1] with labels [N]; returns (params, held-out accuracy)."""
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(images))
  n_test = int(len(images) * holdout)
  test, train = order[:n_test], order[n_test:]
  model = DigitsNet()
  params = model.init(jax.random.key(seed), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1), jnp.uint8))["params"]
  tx = optax.adam(learning_rate)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y, key):
    def loss_fn(p):
      # Light augmentation: random shifts by up to one pixel, so the features are not brittle.
      shift = jax.random.randint(key, (2,), -1, 2)
      xs = jnp.roll(x, shift, axis=(1, 2))
      logits = model.apply({"params": p}, xs, train=True, rngs={"dropout": key})["logits"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  key = jax.random.key(seed + 1)
  for epoch in range(epochs):
    perm = rng.permutation(train)
    for i in range(0, len(perm) - batch_size + 1, batch_size):
      idx = perm[i:i + batch_size]
      key, sub = jax.random.split(key)
      params, opt_state, loss = step(params, opt_state, images[idx], labels[idx], sub)
    logging.log_every_n_seconds(logging.INFO, "epoch %d loss %.4f", 10, epoch, float(loss))
  logits = jax.jit(lambda p, x: model.apply({"params": p}, x)["logits"])(params, images[test])
  accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == labels[test])) if n_test else float("nan")
  return params, accuracy


def save_params(params, path, **info):
  flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  fileio.save_npz(path, __info__=np.array(json.dumps(info)), **flat)


def load_params(path):
  """The DigitsNet params `save_params` wrote to `path`, read checked: an error naming the file when it is
  missing, damaged (`fileio.load_npz_checked`) or holds another network's arrays."""
  train = f"train them with `python -m ddpm_ip_jax.evaluation.digits_classifier --output={path}`."
  if not fileio.exists(path):
    raise FileNotFoundError(f"digits classifier weights {path} not found; {train}")
  arrays = fileio.load_npz_checked(path, "the digits classifier weights file", hint=f"Delete the file and {train}")
  flat = {tuple(k.split("/")): v for k, v in arrays.items() if k != "__info__"}
  expected = jax.eval_shape(lambda: DigitsNet().init(jax.random.key(0), jnp.zeros((1, 16, 16, 1), jnp.uint8)))
  shapes = {k: v.shape for k, v in traverse_util.flatten_dict(expected["params"]).items()}
  if {k: v.shape for k, v in flat.items()} != shapes or any(v.dtype.kind != "f" for v in flat.values()):
    raise ValueError(f"{path} does not hold DigitsNet weights (float arrays {', '.join(map('/'.join, shapes))}, "
                     "as digits.save_params writes them).")
  return traverse_util.unflatten_dict(flat)


def digits_extractor(path):
  """A FeatureExtractor for 16x16 1-channel uint8 digit images, from weights saved by this module."""
  model = DigitsNet()
  return metrics.FeatureExtractor(name="digits", apply_fn=lambda p, x: model.apply({"params": p}, x),
                                  params=load_params(path), channels=1, image_size=16, feature_dim=64)
