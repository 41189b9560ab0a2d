"""The authors' preprocessing of one image: an encoded file -> uint8 [size, size, C], pixel for pixel as theirs.

`decode(encoded, image_size, kind)` decodes and prepares one image by `kind` (docs/method.md section 2; the
reference's datasets/ scripts and guided-diffusion's image_datasets.py):
  center_crop    `center_crop_arr`, what guided-diffusion's loader applies to every training image (npz and folder
                 datasets): halve with a PIL BOX filter while the shorter side is at least twice the size, a PIL
                 bicubic resize of the shorter side to the size, the centre square (a no-op at the size).
  opencv_linear  CelebA 64 (datasets/celeba64_npz.py): decoded by OpenCV (cv2.imdecode, BGR -> RGB) and
                 `resize_opencv_linear`: cv2.resize straight to size x size (INTER_LINEAR, not antialiased; the
                 178x218 aspect changes, nothing is cropped).
  box_crop       LSUN tower 64 (datasets/lsun_bedroom.py): `box_resize_center_crop`, one PIL BOX resize of the
                 shorter side to the size, then the centre crop at ((h - size) // 2, (w - size) // 2).
  as_is          cifar10, imagenet32: the image must already be size x size.
Every kind but opencv_linear decodes with PIL and converts to 8-bit RGB with `images.from_pil` (16-bit grey
scaled, not clipped).
"""
import io

import numpy as np
from etils import epath
from PIL import Image

from ddpm_ip_jax import images as images_lib

# What PIL raises for files that are not images, or broken or truncated ones.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError)


def _to_pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(pil_image: Image.Image, channels: int) -> np.ndarray:
  arr = np.asarray(pil_image)
  return arr[..., None] if arr.ndim == 2 else arr[..., :channels]


def _center_square(arr: np.ndarray, image_size: int) -> np.ndarray:
  top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
  return arr[top:top + image_size, left:left + image_size]


def center_crop_arr(image: np.ndarray, image_size: int) -> np.ndarray:
  """The reference's `center_crop_arr` (guided-diffusion image_datasets.py) on a uint8 [H, W, C] array.

  While the smaller side is at least twice image_size, halve the image with a box filter; then resize bicubically
  so that the smaller side is image_size; then crop the centre square. Returns uint8 [image_size, image_size, C].
  """
  pil_image = _to_pil(image)
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
  return _center_square(_from_pil(pil_image, image.shape[-1]), image_size)


def resize_opencv_linear(image: np.ndarray, image_size: int) -> np.ndarray:
  """The authors' CelebA 64 (datasets/celeba64_npz.py): `cv2.resize(image, (size, size))`, OpenCV's default
  INTER_LINEAR, which does not antialias when shrinking, straight to the square (the 178x218 aspect changes)."""
  import cv2  # pylint: disable=import-outside-toplevel  # opencv-python-headless, as the authors used
  return cv2.resize(np.ascontiguousarray(image), (image_size, image_size), interpolation=cv2.INTER_LINEAR)


def box_resize_center_crop(image: np.ndarray, image_size: int) -> np.ndarray:
  """The authors' LSUN 64 (datasets/lsun_bedroom.py): one PIL BOX resize by image_size / (shorter side) to
  (round(scale * w), round(scale * h)), then the centre crop at offsets ((h - size) // 2, (w - size) // 2)."""
  pil_image = _to_pil(image)
  width, height = pil_image.size
  scale = image_size / min(width, height)
  pil_image = pil_image.resize((int(round(scale * width)), int(round(scale * height))), resample=Image.BOX)
  return _center_square(_from_pil(pil_image, image.shape[-1]), image_size)


def _cv2_decode_rgb(encoded: bytes) -> np.ndarray:
  import cv2  # pylint: disable=import-outside-toplevel
  image = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
  if image is None:
    raise ValueError("OpenCV cannot decode it")
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


_RESIZE = {"center_crop": center_crop_arr, "opencv_linear": resize_opencv_linear,
           "box_crop": box_resize_center_crop}


def decode(encoded, image_size: int, kind: str) -> np.ndarray:
  """An image file (path, URL or encoded bytes) -> RGB uint8 [size, size, 3] by the preprocessing `kind` (module
  docstring). ValueError naming the file if it cannot be decoded, or, for as_is, if it is not size x size."""
  name = "an encoded image" if isinstance(encoded, bytes) else str(encoded)
  if not isinstance(encoded, bytes):
    encoded = epath.Path(encoded).read_bytes()
  try:
    if kind == "opencv_linear":  # decoded by OpenCV too, as the authors' cv2.imread + cvtColor(BGR2RGB)
      image = _cv2_decode_rgb(encoded)
    else:
      pil_image = Image.open(io.BytesIO(encoded))
      pil_image.load()
  except IMAGE_ERRORS as e:
    raise ValueError(f"{name} cannot be decoded as an image ({type(e).__name__}: {e}); replace or remove it.") \
        from None
  if kind != "opencv_linear":
    image = images_lib.from_pil(pil_image, 3, name)  # 16-bit grey scaled to 8 bits, not clipped
  if kind == "as_is":
    if image.shape[:2] != (image_size, image_size):
      raise ValueError(f"Expected a {image_size}x{image_size} image, got {image.shape[:2]}.")
    return image
  return _RESIZE[kind](image, image_size)
