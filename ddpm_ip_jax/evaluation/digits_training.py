"""Training the digits classifier (`digits.DigitsNet`) and its weights file.

`train_classifier` trains the small CNN on uint8 16x16 digits, holding out 20% to report its accuracy (seeded;
well under a minute on 2 CPU cores); `save_params` writes the weights to an `.npz` and `load_params` reads them
back checked; `load_extractor(path)` is the `FeatureExtractor` of a weights file. The command is
`python -m ddpm_ip_jax.evaluation.digits_classifier`.
"""
import json

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpm_ip_jax import fileio
from ddpm_ip_jax.evaluation import digits


def train_classifier(images, labels, *, seed=0, epochs=30, batch_size=64, learning_rate=1e-3, holdout=0.2):
  """Trains on uint8 images [N,16,16,1] with labels [N]; returns (params, held-out accuracy)."""
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(images))
  n_test = int(len(images) * holdout)
  test, train = order[:n_test], order[n_test:]
  model = digits.DigitsNet()
  size = digits.IMAGE_SIZE
  params = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 1), jnp.uint8))["params"]
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
  """Writes the DigitsNet `params` to the `.npz` `path`, with `info` (e.g. the accuracy) as JSON beside them."""
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
  shapes = digits.param_shapes()
  if {k: v.shape for k, v in flat.items()} != shapes or any(v.dtype.kind != "f" for v in flat.values()):
    raise ValueError(f"{path} does not hold DigitsNet weights (float arrays {', '.join(map('/'.join, shapes))}, "
                     "as digits_training.save_params writes them).")
  return traverse_util.unflatten_dict(flat)


def load_extractor(path):
  """The digits FeatureExtractor with the weights file `path` (`load_params`)."""
  return digits.digits_extractor(load_params(path))
