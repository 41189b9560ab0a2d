"""uint8 images: to and from the model's [-1, 1] range, tiled into a grid, written as a PNG.

Layout NHWC everywhere. The two conversions are the reference's (docs/method.md sections 2 and 4): pixels
enter as x / 127.5 - 1, and samples leave as ((x + 1) * 127.5) clipped to [0, 255] and truncated (not rounded).
"""
import io
import math

import jax.numpy as jnp
import numpy as np
from PIL import Image

from ddpm_ip_jax import fileio


def to_model_range(images):
  """uint8 pixels (any shape) -> float32 in [-1, 1]: x / 127.5 - 1. numpy in, numpy out (the host data
  pipeline); JAX arrays and tracers stay JAX."""
  xp = np if isinstance(images, np.ndarray) else jnp
  return xp.asarray(images, xp.float32) / 127.5 - 1.0


def to_uint8(x):
  """Samples in [-1, 1] -> uint8: ((x + 1) * 127.5) clipped to [0, 255], truncated as the reference does.
  numpy in, numpy out; JAX arrays and tracers (inside jit) stay JAX."""
  xp = np if isinstance(x, np.ndarray) else jnp
  return xp.clip((xp.asarray(x, xp.float32) + 1) * 127.5, 0, 255).astype(xp.uint8)


def make_grid(images, ncols=None, padding=2, pad_value=255):
  """Tiles uint8 images [N, H, W, C] into one uint8 image [rows*(H+p)+p, ncols*(W+p)+p, C].

  `ncols` defaults to ceil(sqrt(N)) (a square grid); empty cells and the `padding` pixels between
  cells are `pad_value`.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"make_grid wants uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
  n, h, w, c = images.shape
  ncols = ncols or max(1, math.ceil(math.sqrt(n)))
  nrows = max(1, math.ceil(n / ncols))
  grid = np.full((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c),
                 pad_value, np.uint8)
  for i in range(n):
    row, col = divmod(i, ncols)
    top, left = padding + row * (h + padding), padding + col * (w + padding)
    grid[top:top + h, left:left + w] = images[i]
  return grid


def save_png(path, image, upscale=1):
  """Writes a uint8 image [H, W, C] (C = 1 or 3) as a PNG, optionally enlarged by an integer factor."""
  image = np.asarray(image)
  if upscale > 1:
    image = image.repeat(upscale, axis=0).repeat(upscale, axis=1)
  if image.shape[-1] == 1:
    image = image[..., 0]
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  fileio.write_bytes(path, buffer.getvalue())
