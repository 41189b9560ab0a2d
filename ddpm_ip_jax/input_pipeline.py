"""Input pipelines: uint8 images -> per-device batches in [-1, 1] for the pmapped training step.

Datasets (`config.data.dataset`), each with the preprocessing the paper's statistics depend on (docs/method.md
section 2):
  digits      the 8x8 handwritten digits shipped inside scikit-learn (1797 images), scaled to 0..255 and upscaled
              bicubically to image_size (16 in configs/digits.py), 1 channel. The embedded default: no download.
  cifar10     tfds `cifar10`, as is (32x32).
  celeb_a     tfds `celeb_a`: the aligned 178x218 images resized straight to image_size (bilinear, no crop).
  lsun/tower  tfds `lsun/tower`: the reference's `center_crop_arr` (box-halving, bicubic resize, centre crop).
  imagenet32  tfds `imagenet_resized/32x32`, as is (the official downsampled set).
  npz         `data_dir` is an `.npz` with key `arr_0`, uint8 NHWC (the format of the paper's authors); images
              whose size differs from image_size go through `center_crop_arr`. An `arr_1` of labels is used if
              present, otherwise labels are 0.
  folder      `data_dir` is a folder of png/jpg/jpeg/gif images, searched recursively (each file once, however many
              symbolic links reach it), converted to 8-bit RGB (`images.from_pil`: 16-bit grey scaled) and
              passed through `center_crop_arr` (what the reference does for image folders); labels are 0.

Images are decoded and resized with PIL, as the reference does, so the pixels match its preprocessing exactly.
tfds datasets are read with tf.data (`tfds.builder(name, data_dir=data_dir or None)`: host split, file shuffling,
a shuffle buffer of `config.data.shuffle_buffer` still-encoded images, repeat); the PIL work runs on a Python
thread pool outside tf.data: Python code inside tf.data (`tf.numpy_function`) deadlocks when the iterator is
destroyed while a call waits for the GIL, which hung the process at exit. Nothing touches the network unless
`config.data.download` is True: a dataset that is not prepared fails at once with instructions.

Batches are numpy dicts for this host: {"image": float32 [devices, per_device_batch, H, W, C] = x/127.5 - 1,
"label": int32 [devices, per_device_batch]}. The global batch is split over the hosts (each reads a disjoint
shard of the training set, chosen by `jax.process_index()`) and then over the local devices. Digits, npz and
folder datasets are shuffled fully every epoch and resume exactly (`start_step`).
"""
import collections
import concurrent.futures
import functools
import io
import itertools
import os
import pathlib
import stat as stat_lib
import zipfile
from typing import Callable, Iterator

from absl import logging
from etils import epath
import jax
import numpy as np
from PIL import Image

from ddpm_ip_jax import images as images_lib

# Quiet TensorFlow (only the tfds datasets use it): no C++ info logs, and no oneDNN banner (its custom ops speed up
# TF matmuls/convolutions, which are not used here). Effective only if tensorflow was not imported before.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# config name -> (tfds name, preprocessing, split); the authors' preparation (docs/method.md section 2):
# CelebA 64 is every aligned image (all three tfds splits, 202,599) through OpenCV's default resize, LSUN tower
# one BOX resize of the shorter side and a centre crop.
_TFDS_DATASETS = {
    "cifar10": ("cifar10", "as_is", "train"),
    "celeb_a": ("celeb_a", "opencv_linear", "train+validation+test"),
    "lsun/tower": ("lsun/tower", "box_crop", "train"),
    "imagenet32": ("imagenet_resized/32x32", "as_is", "train"),
}
DATASETS = ("digits", *_TFDS_DATASETS, "npz", "folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif")
_WORKERS = min(8, os.cpu_count() or 1)  # PIL threads (PIL releases the GIL while decoding and resizing)
_PREFETCH = _WORKERS + 2  # batches in flight ahead of the consumer


@functools.cache
def tensorflow_cpu():
  """TensorFlow, imported on first use, with every GPU hidden from it: it must take no accelerator memory from
  JAX."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  return tf


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing of one image (numpy/PIL, uint8 [H, W, C] -> uint8 [size, size, C]).
# ---------------------------------------------------------------------------------------------------------------


def _to_pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(pil_image: Image.Image, channels: int) -> np.ndarray:
  arr = np.asarray(pil_image)
  return arr[..., None] if arr.ndim == 2 else arr[..., :channels]


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
  arr = _from_pil(pil_image, image.shape[-1])
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


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
  arr = _from_pil(pil_image, image.shape[-1])
  h_off, w_off = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
  return arr[h_off:h_off + image_size, w_off:w_off + image_size]


_PREPROCESS = {"center_crop": center_crop_arr, "opencv_linear": resize_opencv_linear,
               "box_crop": box_resize_center_crop}


# ---------------------------------------------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 digits (values 0..16) -> uint8 [1797, size, size, 1] images and int32 [1797] labels.

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


def load_digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The embedded digits with their labels: uint8 [1797, size, size, 1] and int32 [1797] (read-only arrays)."""
  return _digits(image_size)


def _npz_header(path, name="arr_0"):
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


def _load_npz(path: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """uint8 [N, size, size, C] images (center_crop_arr where the size differs) and int32 [N] labels of an .npz."""
  with epath.Path(path).open("rb") as fh, np.load(fh) as data:
    images = data["arr_0"]
    labels = data["arr_1"].astype(np.int32) if "arr_1" in data.files else np.zeros(len(images), np.int32)
  if images.shape[1:3] != (image_size, image_size):
    images = np.stack([center_crop_arr(im, image_size) for im in images])
  return images, labels


def _folder_files(data_dir: str) -> list[str]:
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
      elif "." in name and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
        seen.add(identity)
        files.append(path)

  root = str(data_dir).rstrip("/") or "/"
  visit(root, os.stat(root))
  return files


def _url_folder_files(data_dir: str) -> list[str]:
  """`_folder_files` of a bucket folder (object stores have no links)."""
  root = epath.Path(data_dir)
  files = []
  for entry in sorted(root.iterdir(), key=lambda p: p.name):
    name = entry.name
    if "." in name and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
      files.append(f"{str(data_dir).rstrip('/')}/{name}")
    elif entry.is_dir():
      files += _url_folder_files(f"{str(data_dir).rstrip('/')}/{name}")
  return files


# What PIL raises for files that are not images, or broken or truncated ones.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError)


def _image_file_problem(path) -> str | None:
  """What is wrong with the image file `path` from its header (the pixels are not decoded): None if PIL
  recognises it and `images.from_pil` converts its mode, else a few words."""
  try:
    with Image.open(path) as image:
      image.verify()
      mode = image.mode
  except _IMAGE_ERRORS as e:
    return f"not a readable image ({type(e).__name__})"
  try:
    images_lib.check_mode(mode, path)
  except ValueError:
    return f"PIL mode {mode!r}, which is not converted (images.from_pil)"
  return None


def _cv2_decode_rgb(encoded: bytes) -> np.ndarray:
  import cv2  # pylint: disable=import-outside-toplevel
  image = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
  if image is None:
    raise ValueError("OpenCV cannot decode it")
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _decode(encoded, image_size: int, kind: str) -> np.ndarray:
  """An image file (path, URL or encoded bytes) -> RGB uint8 [size, size, 3] by the dataset's preprocessing."""
  name = "an encoded image" if isinstance(encoded, bytes) else str(encoded)
  if not isinstance(encoded, bytes):
    encoded = epath.Path(encoded).read_bytes()
  try:
    if kind == "opencv_linear":  # decoded by OpenCV too, as the authors' cv2.imread + cvtColor(BGR2RGB)
      image = _cv2_decode_rgb(encoded)
    else:
      pil_image = Image.open(io.BytesIO(encoded))
      pil_image.load()
  except _IMAGE_ERRORS as e:
    raise ValueError(f"{name} cannot be decoded as an image ({type(e).__name__}: {e}); replace or remove it.") \
        from None
  if kind != "opencv_linear":
    image = images_lib.from_pil(pil_image, 3, name)  # 16-bit grey scaled to 8 bits, not clipped
  if kind == "as_is":
    if image.shape[:2] != (image_size, image_size):
      raise ValueError(f"Expected a {image_size}x{image_size} image, got {image.shape[:2]}.")
    return image
  return _PREPROCESS[kind](image, image_size)


def _tfds_builder(data_config):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # only the tfds datasets need it
  tensorflow_cpu()
  name = _TFDS_DATASETS[data_config.dataset][0]
  return tfds.builder(name, data_dir=data_config.data_dir or None)


def _prepared_tfds_builder(data_config):
  """The tfds builder, downloaded and prepared first if that is allowed (config.data.download)."""
  builder = _tfds_builder(data_config)
  if not builder.is_prepared() and data_config.download:
    builder.download_and_prepare()
  return builder


def _tfds_random_access(builder, split):
  """The `split` of `builder` (e.g. "train", or "train+validation+test") as a random-access source of
  {"image": encoded bytes, "label"} where it was prepared as ArrayRecord (`tfds build
  --file_format=array_record`); None for TFRecord files."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if str(getattr(builder.info.file_format, "value", builder.info.file_format)) != "array_record":
    return None
  return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})


def _tfds_encoded(builder, split, *, shuffle_seed: int | None, shuffle_buffer: int, batch_size: int,
                  drop_remainder: bool):
  """tf.data of {"image": encoded bytes [B], "label": int32 [B]} batches; shuffled and repeated forever if
  shuffle_seed is not None, else one pass in order. Encoded images keep the shuffle buffer small."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf = tensorflow_cpu()
  shuffle = shuffle_seed is not None
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed) if shuffle else None
  ds = builder.as_dataset(split=split, shuffle_files=shuffle, read_config=read_config,
                          decoders={"image": tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: {"image": ex["image"],
                          "label": tf.cast(ex["label"], tf.int32) if "label" in ex else tf.constant(0, tf.int32)},
              num_parallel_calls=tf.data.AUTOTUNE)
  if shuffle:
    ds = ds.shuffle(max(1, shuffle_buffer), seed=shuffle_seed, reshuffle_each_iteration=True).repeat()
  options = tf.data.Options()
  options.deterministic = True
  return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE).with_options(options)


def _pipelined(tasks: Iterator[Callable[[], dict]]) -> Iterator[dict]:
  """Runs the tasks on a thread pool, up to _PREFETCH ahead, and yields their results in order."""
  pool = concurrent.futures.ThreadPoolExecutor(_WORKERS, thread_name_prefix="input_pipeline")
  pending = collections.deque()
  try:
    pending.extend(pool.submit(task) for task in itertools.islice(tasks, _PREFETCH))
    while pending:
      result = pending.popleft().result()
      pending.extend(pool.submit(task) for task in itertools.islice(tasks, 1))
      yield result
  finally:
    for future in pending:
      future.cancel()
    pool.shutdown(wait=False)


def _tfds_not_prepared_message(data_config, builder) -> str:
  name = builder.info.full_name.rsplit("/", 1)[0]
  where = data_config.data_dir or f"the default tfds data_dir ({pathlib.Path(builder.data_dir_root)})"
  return (
      f"Dataset {data_config.dataset!r} (tfds {name!r}) is not prepared in {where}: expected "
      f"{builder.data_dir}. Prepare it on a machine with network with\n"
      f"  tfds build {name} --data_dir=DIR\n"
      f"then copy DIR here and pass --config.data.data_dir=DIR (tfds reads DIR/{name}/<version>/). Or let this "
      "run download and prepare it with --config.data.download=True"
      + ("." if data_config.dataset == "cifar10" else f" ({name} is a large download)."))


# ---------------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------------


def check_dataset(data_config, image_size: int) -> None:
  """Fails fast, without network, with a ValueError that says how to fix it, if the dataset cannot be read.

  Checks the name, the presence of the data (tfds prepared, .npz file, image folder) and, where the image size is
  fixed by the dataset (cifar10, imagenet32), that it matches image_size.
  """
  dataset = data_config.dataset
  if dataset not in DATASETS:
    raise ValueError(f"Unknown dataset {dataset!r} (config.data.dataset); choose one of {', '.join(DATASETS)}.")
  if image_size < 1:
    raise ValueError(f"image_size must be positive, got {image_size}.")
  if dataset == "digits":
    return
  if dataset == "npz":
    path = epath.Path(data_config.data_dir)
    if not data_config.data_dir or path.suffix != ".npz" or not path.is_file():
      raise ValueError(
          f"dataset 'npz' needs config.data.data_dir to be an existing .npz file, got {data_config.data_dir!r}. "
          "Write one with np.savez(path, images) where images is uint8 [N, H, W, C] (key arr_0; an optional "
          "arr_1 holds int labels).")
    shape, dtype = _npz_header(path)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or 0 in shape:
      raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, C] with C in (1, 3) and N, H, W > 0, "
                       f"got {dtype} {shape}.")
    labels = _npz_header(path, "arr_1")
    if labels is not None and (labels[0] != (shape[0],) or not np.issubdtype(labels[1], np.integer)):
      raise ValueError(f"{path}: arr_1 (the labels) must be integers [N] with N = {shape[0]}, the images of "
                       f"arr_0; got {labels[1]} {labels[0]}.")
    return
  if dataset == "folder":
    if not data_config.data_dir or not epath.Path(data_config.data_dir).is_dir():
      raise ValueError(f"dataset 'folder' needs config.data.data_dir to be an existing folder of images, "
                       f"got {data_config.data_dir!r}.")
    files = _folder_files(data_config.data_dir)
    if not files:
      raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {data_config.data_dir!r} "
                       "(searched recursively).")
    if "://" not in files[0]:  # local files: every header is read now (a file that is not an image fails here)
      with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
        bad = [(f, why) for f, why in zip(files, pool.map(_image_file_problem, files)) if why]
      if bad:
        raise ValueError(f"{len(bad)} file(s) under {data_config.data_dir!r} are not readable images, e.g. "
                         f"{', '.join(f'{f} ({why})' for f, why in bad[:3])}; replace or remove them.")
    return
  builder = _tfds_builder(data_config)
  if not builder.is_prepared() and not data_config.download:
    raise ValueError(_tfds_not_prepared_message(data_config, builder))
  if _TFDS_DATASETS[dataset][1] == "as_is":
    height, width = builder.info.features["image"].shape[:2]
    if height is not None and (height, width) != (image_size, image_size):
      raise ValueError(f"Dataset {dataset!r} has {height}x{width} images; set --config.model.image_size={height}"
                       f" (it is {image_size}).")


def check_labels(data_config, num_classes: int) -> None:
  """For a class-conditional model (num_classes > 0): ValueError when the dataset's labels do not fit in
  [0, num_classes) (digits: 10 classes; an .npz: its arr_1, which it must have)."""
  if num_classes <= 0:
    return
  if data_config.dataset == "digits":
    low, high = 0, 9
  elif data_config.dataset == "npz":
    with epath.Path(data_config.data_dir).open("rb") as fh, np.load(fh) as data:
      if "arr_1" not in data.files:
        raise ValueError(f"num_classes={num_classes} but {data_config.data_dir} has no labels (arr_1); save them "
                         "with np.savez(path, images, labels) or train unconditionally (num_classes=0).")
      labels = data["arr_1"]
    low, high = int(labels.min()), int(labels.max())
  else:
    return
  if low < 0:
    raise ValueError(f"the labels of {data_config.dataset!r} ({data_config.data_dir}) include {low}: class labels "
                     "are 0 .. K-1 (relabel them, e.g. with np.unique(labels, return_inverse=True)[1]).")
  if high >= num_classes:
    raise ValueError(f"the labels of {data_config.dataset!r} run from {low} to {high}, outside [0, num_classes="
                     f"{num_classes}): set config.model.num_classes={high + 1}.")


def num_channels(data_config) -> int:
  """Channels of the dataset's images: 1 for digits (and 1-channel .npz files), 3 otherwise."""
  if data_config.dataset == "digits":
    return 1
  if data_config.dataset == "npz":
    return int(_npz_header(data_config.data_dir)[0][-1])
  return 3


def load_images(data_config, image_size: int, max_images: int | None = None) -> np.ndarray:
  """The training set's first max_images images (all if None), uint8 [N, size, size, C] in the dataset's order.

  The same preprocessing as training, without flip or shuffle, on every host the same: for reference statistics
  (FID) computed on the images the model is trained on.
  """
  check_dataset(data_config, image_size)
  dataset = data_config.dataset
  if dataset == "digits":
    return np.array(_digits(image_size)[0][:max_images])
  if dataset == "npz":
    return _load_npz(data_config.data_dir, image_size)[0][:max_images]
  if dataset == "folder":
    files = _folder_files(data_config.data_dir)[:max_images]
    with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
      return np.stack(list(pool.map(functools.partial(_decode, image_size=image_size, kind="center_crop"), files)))
  kind = _TFDS_DATASETS[dataset][1]
  builder = _prepared_tfds_builder(data_config)
  split = _TFDS_DATASETS[dataset][2]
  if max_images is not None:  # the first images of each part, in the order of the splits
    split = "+".join(f"{part}[:{max_images}]" for part in split.split("+"))
  ds = _tfds_encoded(builder, split, shuffle_seed=None, shuffle_buffer=0, batch_size=256, drop_remainder=False)
  if max_images is not None:
    ds = ds.unbatch().take(max_images).batch(256)
  decode = functools.partial(_decode, image_size=image_size, kind=kind)

  def decode_batch(encoded):
    return np.stack([decode(e) for e in encoded])

  batches = list(_pipelined(functools.partial(decode_batch, batch["image"]) for batch in ds.as_numpy_iterator()))
  images = np.concatenate(batches) if batches else np.zeros((0, image_size, image_size, 3), np.uint8)
  return images[:max_images]


def per_device_batch_size(global_batch_size: int, process_count: int, num_local_devices: int) -> int:
  """global batch -> hosts -> local devices; a ValueError if it does not divide evenly."""
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"The global batch size {global_batch_size} (config.training.batch_size) must be a positive "
                     f"multiple of the number of hosts ({process_count}).")
  per_host = global_batch_size // process_count
  if per_host % num_local_devices:
    raise ValueError(f"The per-host batch size {per_host} (global {global_batch_size} over {process_count} "
                     f"host(s)) is not divisible by the {num_local_devices} local devices; choose a "
                     f"config.training.batch_size that is a multiple of {process_count * num_local_devices}.")
  return per_host // num_local_devices


def _rng(*ints: int) -> np.random.Generator:
  """A numpy generator seeded by several ints (run seed, host, epoch or step, purpose)."""
  return np.random.default_rng([int(i) for i in ints])


def _index_batches(num_examples: int, batch_size: int, seed: int, process_index: int, process_count: int,
                   start_step: int) -> Iterator[np.ndarray]:
  """This host's example indices for batches start_step, start_step + 1, ...: int64 [batch_size] each.

  The host owns the indices process_index, process_index + process_count, ... (disjoint shards whose union is the
  dataset). The stream of indices runs through the shard epoch after epoch, epoch e in the order of a permutation
  seeded by (seed, host, e), so batch s is a pure function of the seed and s and a resumed run starts at once.
  """
  shard = np.arange(process_index, num_examples, process_count, dtype=np.int64)
  if not len(shard):
    raise ValueError(f"The dataset has {num_examples} examples, fewer than the {process_count} hosts.")
  epoch, pos = divmod(start_step * batch_size, len(shard))
  order = _rng(seed, process_index, epoch, 0).permutation(shard)
  while True:
    parts, need = [], batch_size
    while need:
      take = order[pos:pos + need]
      parts.append(take)
      need -= len(take)
      pos += len(take)
      if pos == len(shard):
        epoch, pos = epoch + 1, 0
        order = _rng(seed, process_index, epoch, 0).permutation(shard)
    yield np.concatenate(parts)


def _finalize(images: np.ndarray, labels: np.ndarray, step: int, *, flip_seed: int | None,
              num_devices: int) -> dict:
  """uint8 [B, H, W, C] -> the batch dict: seeded random flip (probability 1/2 per image, if flip_seed is not
  None), x/127.5 - 1 (docs/method.md section 2), and a leading device axis."""
  if flip_seed is not None:
    flip = _rng(flip_seed, step, 1).random(len(images)) < 0.5
    images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
  images = images_lib.to_model_range(images)
  return {"image": images.reshape(num_devices, -1, *images.shape[1:]),
          "label": labels.astype(np.int32).reshape(num_devices, -1)}


def create_input_iter(data_config, image_size: int, global_batch_size: int, *, seed: int,
                      num_local_devices: int | None = None, start_step: int = 0, process_index: int | None = None,
                      process_count: int | None = None) -> Iterator[dict]:
  """Infinite iterator of this host's numpy batches.

  Yields {"image": float32 [num_local_devices, per_device_batch, H, W, C] in [-1, 1] (x/127.5 - 1 of the uint8
  pixels, docs/method.md section 2), "label": int32 [num_local_devices, per_device_batch]}. The global batch is split
  over process_count hosts (default jax.process_count(); this host, default jax.process_index(), reads a disjoint
  shard of the training set) and then over num_local_devices (default jax.local_device_count()).

  Seeded: the same seed gives the same batches. Digits, npz and folder datasets are shuffled fully each epoch and
  start_step > 0 (a resumed run) continues exactly where an uninterrupted run would be at batch start_step; tfds
  datasets prepared as ArrayRecord are read the same way (random access); those in TFRecord files shuffle files and
  a data_config.shuffle_buffer of examples, and a resumed run gets a fresh order. If
  data_config.random_flip, each image is flipped horizontally with probability 1/2 (seeded by seed and batch
  number); digits are never flipped (a mirrored digit is not a digit, so random_flip is ignored for them).
  Batches are prepared on a thread pool ahead of use.
  """
  check_dataset(data_config, image_size)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  num_local_devices = jax.local_device_count() if num_local_devices is None else num_local_devices
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  per_host = per_device_batch_size(global_batch_size, process_count, num_local_devices) * num_local_devices
  dataset = data_config.dataset
  flip = bool(data_config.random_flip) and dataset != "digits"
  finalize = functools.partial(_finalize, flip_seed=int(_rng(seed, process_index, 2).integers(2**62)) if flip
                               else None, num_devices=num_local_devices)
  steps = itertools.count(start_step)

  if dataset in ("digits", "npz", "folder"):
    if dataset == "folder":
      files = _folder_files(data_config.data_dir)
      num_examples = len(files)
      decode = functools.partial(_decode, image_size=image_size, kind="center_crop")

      def make_batch(idx, step):
        return finalize(np.stack([decode(files[i]) for i in idx]), np.zeros(len(idx), np.int32), step)
    else:
      images, labels = _digits(image_size) if dataset == "digits" else _load_npz(data_config.data_dir, image_size)
      num_examples = len(images)

      def make_batch(idx, step):
        return finalize(images[idx], labels[idx], step)

    indices = _index_batches(num_examples, per_host, seed, process_index, process_count, start_step)
    return _pipelined(functools.partial(make_batch, idx, step) for idx, step in zip(indices, steps))

  decode = functools.partial(_decode, image_size=image_size, kind=_TFDS_DATASETS[dataset][1])
  builder = _prepared_tfds_builder(data_config)
  source = _tfds_random_access(builder, _TFDS_DATASETS[dataset][2])
  if source is not None:
    # Prepared as ArrayRecord: random access, so the same index batching as the in-memory datasets (per-host
    # shards, a seeded permutation per epoch) and a resumed run continues exactly where it stopped.
    def make_indexed_batch(idx, step):
      examples = [source[int(i)] for i in idx]
      return finalize(np.stack([decode(e["image"]) for e in examples]),
                      np.asarray([e.get("label", 0) for e in examples], np.int32), step)

    indices = _index_batches(len(source), per_host, seed, process_index, process_count, start_step)
    return _pipelined(functools.partial(make_indexed_batch, idx, step) for idx, step in zip(indices, steps))

  # tfds in TFRecord files (tfds' default): a stream, which a resumed run (start_step > 0) cannot enter without
  # re-reading the data up to there; it starts a fresh order seeded by (seed, host, start_step) instead.
  if start_step > 0:
    logging.warning("Resuming %s at batch %d with a fresh data order: the dataset is prepared as TFRecord. "
                    "Prepare it with `tfds build %s --file_format=array_record` for an exact resume.", dataset,
                    start_step, _TFDS_DATASETS[dataset][0])
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  split = tfds.even_splits(_TFDS_DATASETS[dataset][2], n=process_count, drop_remainder=False)[process_index]
  ds = _tfds_encoded(builder, split,
                     shuffle_seed=int(_rng(seed, process_index, start_step, 3).integers(2**31)),
                     shuffle_buffer=data_config.shuffle_buffer, batch_size=per_host, drop_remainder=True)

  def make_tfds_batch(batch, step):
    return finalize(np.stack([decode(e) for e in batch["image"]]), batch["label"], step)

  return _pipelined(functools.partial(make_tfds_batch, batch, step)
                    for batch, step in zip(ds.as_numpy_iterator(), steps))


def prefetch_to_device(iterator: Iterator[dict], size: int = 2, devices=None) -> Iterator[dict]:
  """Puts batches of `create_input_iter` on the local devices ahead of use (leading axis = device), as pmap wants."""
  from flax import jax_utils  # pylint: disable=g-import-not-at-top
  return jax_utils.prefetch_to_device(iterator, size, devices)
