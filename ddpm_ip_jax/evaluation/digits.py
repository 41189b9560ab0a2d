"""A small digits classifier: the stand-in for Inception on the embedded digits dataset ("digits FID").

The network: `python -m ddpm_ip_jax.evaluation.digits_classifier --output=runs/digits_classifier.npz` (the
command) trains it on scikit-learn's digits at 16x16 (the training pipeline's preprocessing) and saves the weights
(`digits_training`: the training, and the weights file). `digits_extractor(params)` turns them into a
`FeatureExtractor` whose "pool" features (the 64-d penultimate layer) give FID and precision/recall, and whose 10
logits give an Inception-Score analogue (at most 10).
"""
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

from ddpm_ip_jax.evaluation import metrics

IMAGE_SIZE = 16


class DigitsNet(nn.Module):
  """uint8 or [-1, 1] images [B,16,16,1] -> {"pool": [B,64], "logits": [B,10]}."""

  @nn.compact
  def __call__(self, images, train=False):
    x = images.astype(jnp.float32)
    x = x / 127.5 - 1.0 if images.dtype == jnp.uint8 else x  # the pixels as the model's (images.to_model_range)
    for features in (32, 64):
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    pool = nn.relu(nn.Dense(64)(x))
    h = nn.Dropout(0.3, deterministic=not train)(pool)
    return {"pool": pool, "logits": nn.Dense(10)(h)}


def param_shapes():
  """{flattened param name: shape} of a DigitsNet, what a weights file must hold."""
  expected = jax.eval_shape(lambda: DigitsNet().init(jax.random.key(0), jnp.zeros((1, 16, 16, 1), jnp.uint8)))
  return {k: v.shape for k, v in traverse_util.flatten_dict(expected["params"]).items()}


def digits_extractor(params):
  """A FeatureExtractor for 16x16 1-channel uint8 digit images with the DigitsNet `params`."""
  model = DigitsNet()
  return metrics.FeatureExtractor(name="digits", apply_fn=lambda p, x: model.apply({"params": p}, x),
                                  params=params, channels=1, image_size=16, feature_dim=64)
