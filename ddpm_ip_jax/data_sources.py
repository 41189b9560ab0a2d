"""Random-access sources of training examples: digits, npz, image folder, tfds prepared as ArrayRecord.

Each source is a `Source`: `len(source)` examples, and `source.examples(indices)` -> (uint8 images
[len(indices), size, size, C], int32 labels [len(indices)]) for int indices in [0, len(source)), already
preprocessed (`preprocessing`); the input pipeline shards, shuffles, flips and batches them the same way for all.
  ArraySource  images held in memory: scikit-learn's digits (`load_digits`) or an .npz (`load_npz`).
  FileSource   a folder of image files (`folder_files`: the reference's order), decoded per example with
               `center_crop_arr`; labels are 0.
  TfdsSource   a tfds split prepared as ArrayRecord (`TfdsSource.open`), its encoded images decoded per example by
               the dataset's preprocessing; labels are the dataset's (0 where it has none).
"""
import functools
import os
import stat as stat_lib
import zipfile
from typing import Protocol, Sequence

import numpy as np
from etils import epath
from PIL import Image

from ddpm_ip_jax import fileio
from ddpm_ip_jax import images as images_lib
from ddpm_ip_jax import preprocessing

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif")


class Source(Protocol):
  """What the input pipeline batches: a fixed number of examples, read by index."""

  def __len__(self) -> int:
    ...

  def examples(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [B, H, W, C] images, int32 [B] labels) of the examples `indices` (int [B])."""


class ArraySource:
  """Examples held in memory: uint8 images [N, H, W, C] and int32 labels [N]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.images)

  def examples(self, indices):
    return self.images[indices], self.labels[indices]


class FileSource:
  """Image files (paths or URLs) decoded with `center_crop_arr` to image_size; labels 0."""

  def __init__(self, files: Sequence[str], image_size: int):
    self.files, self.image_size = files, image_size

  def __len__(self) -> int:
    return len(self.files)

  def examples(self, indices):
    return (np.stack([preprocessing.decode(self.files[i], self.image_size, "center_crop") for i in indices]),
            np.zeros(len(indices), np.int32))


class TfdsSource:
  """A tfds split prepared as ArrayRecord: examples {"image": encoded bytes, "label"?} read by index, decoded by
  the preprocessing `kind` (`preprocessing.decode`)."""

  def __init__(self, data_source, image_size: int, kind: str):
    self.data_source, self.image_size, self.kind = data_source, image_size, kind

  @classmethod
  def open(cls, builder, split: str, image_size: int, kind: str) -> "TfdsSource | None":
    """The `split` of `builder` (e.g. "train", or "train+validation+test") where it was prepared as ArrayRecord
    (`tfds build --file_format=array_record`); None for TFRecord files, which only stream."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if str(getattr(builder.info.file_format, "value", builder.info.file_format)) != "array_record":
      return None
    return cls(builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()}), image_size,
               kind)

  def __len__(self) -> int:
    return len(self.data_source)

  def examples(self, indices):
    examples = [self.data_source[int(i)] for i in indices]
    return (np.stack([preprocessing.decode(e["image"], self.image_size, self.kind) for e in examples]),
            np.asarray([e.get("label", 0) for e in examples], np.int32))


@functools.lru_cache(maxsize=4)
def load_digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 digits (values 0..16) -> uint8 [1797, size, size, 1] images (read-only) and int32 [1797]
  labels.

  The 0..16 values are scaled to 0..255 and upscaled bicubically in float (so samples look like pen strokes, not
  8x8 blocks), then clipped and rounded to uint8. Cached: it is small (1797 images) and used by every batch.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top  # only the embedded default needs it
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32) * (255.0 / 16.0)  # [N, 8, 8]
  out = np.stack([
      np.asarray(Image.fromarray(im).resize((image_size, image_size), resample=Image.BICUBIC))
      for im in images])
  out = np.clip(np.rint(out), 0, 255).astype(np.uint8)[..., None]
  out.setflags(write=False)
  return out, digits.target.astype(np.int32)


def npz_header(path, name="arr_0"):
  """(shape, dtype) of the array `name` in an .npz (a local path or a URL), read without loading the data;
  None for a missing optional array (anything but arr_0)."""
  try:
    with epath.Path(path).open("rb") as fh, zipfile.ZipFile(fh) as zf:
      if f"{name}.npy" not in zf.namelist():
        if name != "arr_0":
          return None
        raise ValueError(f"{path} has no array 'arr_0' (it has {zf.namelist()}); expected uint8 images "
                         "[N, H, W, C] saved with np.savez(path, images).")
      with zf.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(f)
  except zipfile.BadZipFile as e:
    raise ValueError(f"{path} is not a valid .npz file (np.savez output): {e}") from e
  return shape, dtype


def check_npz(data_dir: str) -> None:
  """ValueError naming the file unless data_dir is an .npz of uint8 images [N, H, W, C] (arr_0, C in (1, 3)) with,
  if present, N integer labels (arr_1). Reads only the headers."""
  path = epath.Path(data_dir)
  if not data_dir or path.suffix != ".npz" or not path.is_file():
    raise ValueError(
        f"dataset 'npz' needs config.data.data_dir to be an existing .npz file, got {data_dir!r}. "
        "Write one with np.savez(path, images) where images is uint8 [N, H, W, C] (key arr_0; an optional "
        "arr_1 holds int labels).")
  shape, dtype = npz_header(path)
  if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or 0 in shape:
    raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, C] with C in (1, 3) and N, H, W > 0, "
                     f"got {dtype} {shape}.")
  labels = npz_header(path, "arr_1")
  if labels is not None and (labels[0] != (shape[0],) or not np.issubdtype(labels[1], np.integer)):
    raise ValueError(f"{path}: arr_1 (the labels) must be integers [N] with N = {shape[0]}, the images of "
                     f"arr_0; got {labels[1]} {labels[0]}.")


def load_npz(path: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """uint8 [N, size, size, C] images (center_crop_arr where the size differs) and int32 [N] labels (arr_1, else 0)
  of an .npz."""
  data = fileio.load_npz_checked(path, "The dataset")  # a damaged member: one line naming the file
  images = data["arr_0"]
  labels = data["arr_1"].astype(np.int32) if "arr_1" in data else np.zeros(len(images), np.int32)
  if images.shape[1:3] != (image_size, image_size):
    images = np.stack([preprocessing.center_crop_arr(im, image_size) for im in images])
  return images, labels


def _is_image_name(name: str) -> bool:
  return "." in name and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def folder_files(data_dir: str) -> list[str]:
  """The image files under data_dir (a local path or a URL) in the reference's order
  (`_list_image_files_recursively`: each directory's entries sorted by name, a sub-directory's files where its
  name falls), so that host shards (every process_count-th file) hold the files the reference's ranks would.

  Local folders: symbolic links are followed, but every directory is entered and every file listed once (by
  its (st_dev, st_ino)), at the first path that reaches it: a link back up the tree (`loop -> .`) adds nothing,
  and a link to a file outside the folder counts once. Broken links are skipped."""
  if "://" in str(data_dir):
    return _url_folder_files(data_dir)
  files, seen = [], set()

  def visit(directory, stat):
    seen.add((stat.st_dev, stat.st_ino))
    for name in sorted(os.listdir(directory)):
      path = os.path.join(directory, name)
      try:
        entry = os.stat(path)  # follows links
      except OSError:  # a broken link, or a file removed meanwhile
        continue
      identity = (entry.st_dev, entry.st_ino)
      if identity in seen:
        continue
      if stat_lib.S_ISDIR(entry.st_mode):
        visit(path, entry)
      elif _is_image_name(name):
        seen.add(identity)
        files.append(path)

  root = str(data_dir).rstrip("/") or "/"
  visit(root, os.stat(root))
  return files


def _url_folder_files(data_dir: str) -> list[str]:
  """`folder_files` of a bucket folder (object stores have no links)."""
  files = []
  for entry in sorted(epath.Path(data_dir).iterdir(), key=lambda p: p.name):
    path = f"{str(data_dir).rstrip('/')}/{entry.name}"
    if _is_image_name(entry.name):
      files.append(path)
    elif entry.is_dir():
      files += _url_folder_files(path)
  return files


def image_file_problem(path) -> str | None:
  """What is wrong with the image file `path` from its header (the pixels are not decoded): None if PIL
  recognises it and `images.from_pil` converts its mode, else a few words."""
  try:
    with Image.open(path) as image:
      image.verify()
      mode = image.mode
  except preprocessing.IMAGE_ERRORS as e:
    return f"not a readable image ({type(e).__name__})"
  try:
    images_lib.check_mode(mode, path)
  except ValueError:
    return f"PIL mode {mode!r}, which is not converted (images.from_pil)"
  return None
