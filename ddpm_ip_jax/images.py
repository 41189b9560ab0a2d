"""uint8 images: decoded files in any common PIL mode to 8 bits, to and from the model's [-1, 1] range, tiled into
a grid, written as a PNG.

Layout NHWC everywhere. The two conversions are the reference's (docs/method.md sections 2 and 4): pixels
enter as x / 127.5 - 1, and samples leave as ((x + 1) * 127.5) clipped to [0, 255] and truncated (not rounded).

`from_pil` is how a decoded image file becomes 8 bits. The 8-bit modes (RGB, L, 1-bit, palette, with or without
alpha or transparency, CMYK, YCbCr) go through PIL's own `convert`, as the reference's `convert("RGB")`: alpha is
dropped, the colour under it kept, so the pixels match the reference's preprocessing. 16-bit grey (I;16, I;16B,
I;16L, I;16N, and I, PIL's 32-bit mode for 16-bit PNG/TIFF data, which must then lie in 0 .. 65535) is scaled by
255/65535 and rounded, where PIL's `convert` would clip it to 0 and 255. Float images (F) have no fixed range and
are refused, as is any other mode, with a ValueError naming the file and the mode.
"""
import io
import math

import jax.numpy as jnp
import numpy as np
from PIL import Image

from ddpm_ip_jax import fileio


# PIL modes that PIL's `convert` takes to 8-bit RGB or grey as the reference's convert("RGB") does.
PIL_8BIT_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "La", "1", "P", "PA", "CMYK", "YCbCr")
# 16-bit grey, scaled to 8 bits by `from_pil` (PIL's convert would clip).
PIL_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def check_mode(mode, name):
  """ValueError naming the file `name` unless `from_pil` converts images of PIL mode `mode`."""
  if mode in PIL_8BIT_MODES or mode in PIL_16BIT_MODES:
    return
  why = ("32-bit float pixels have no fixed range; save it as an 8- or 16-bit PNG" if mode == "F"
         else f"convert it to 8-bit RGB, grey or a 16-bit grey PNG (modes {', '.join(PIL_8BIT_MODES)}, "
              f"{', '.join(PIL_16BIT_MODES)})")
  raise ValueError(f"{name}: PIL mode {mode!r} is not supported: {why}.")


def sixteen_to_eight(values):
  """Integer pixels in 0 .. 65535 -> uint8 round(x * 255 / 65535) (= round(x / 257): never a tie)."""
  values = np.asarray(values, np.int64)
  return ((values + 128) // 257).astype(np.uint8)


def from_pil(pil_image, channels=3, name="an image"):
  """A decoded PIL image -> uint8 [H, W, channels] (channels 3: RGB; 1: grey, PIL's L for colour images); see
  the module docstring for the modes. ValueError naming `name` for a mode it refuses or 16-bit values out of
  range."""
  if channels not in (1, 3):
    raise ValueError(f"from_pil: channels must be 1 or 3, got {channels}")
  mode = pil_image.mode
  check_mode(mode, name)
  if mode in PIL_16BIT_MODES:
    values = np.asarray(pil_image)
    low, high = int(values.min(initial=0)), int(values.max(initial=0))
    if low < 0 or high > 65535:
      raise ValueError(f"{name}: PIL mode {mode!r} with values {low} .. {high}, outside the 16-bit range 0 .. 65535; "
                       "save it as an 8- or 16-bit PNG.")
    grey = sixteen_to_eight(values)
    return grey[..., None] if channels == 1 else np.repeat(grey[..., None], 3, axis=-1)
  if mode in ("P", "PA"):  # through RGBA: the palette's colours, with the transparency PIL keeps as alpha
    pil_image = pil_image.convert("RGBA")
  image = np.asarray(pil_image.convert("RGB" if channels == 3 else "L"))
  return image if channels == 3 else image[..., None]


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
