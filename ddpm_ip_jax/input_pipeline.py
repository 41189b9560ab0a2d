"""Input pipelines (tf.data): uint8 images -> per-device batches in [-1, 1] for the pmapped training step.

Datasets (`config.data.dataset`), each with the preprocessing the paper's statistics depend on (REFERENCE.md
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
  folder      `data_dir` is a folder of png/jpg/jpeg/gif images, searched recursively, converted to RGB and
              passed through `center_crop_arr` (what the reference does for image folders); labels are 0.

tfds datasets are read from `tfds.builder(name, data_dir=data_dir or None)`. Nothing touches the network unless
`config.data.download` is True: a dataset that is not prepared fails at once with instructions.

Batches are numpy dicts for this host: {"image": float32 [devices, per_device_batch, H, W, C] = x/127.5 - 1,
"label": int32 [devices, per_device_batch]}. The global batch is split over the hosts (each reads a disjoint
shard of the training set, chosen by `jax.process_index()`) and then over the local devices. In-memory and
folder datasets are shuffled fully every epoch and resume exactly (`start_step`); tfds datasets shuffle their
files and a buffer of `config.data.shuffle_buffer` examples.
"""
import functools
import os
import pathlib
import zipfile
from typing import Iterator

import jax
import numpy as np
from PIL import Image

# Quiet TensorFlow (only tf.data runs in it): no C++ info logs, and no oneDNN banner (its custom ops speed up TF
# matmuls/convolutions, which this module does not use). Effective only if tensorflow was not imported before.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
import tensorflow as tf  # noqa: E402

# tf.data runs on the host CPU only; TensorFlow must not take any accelerator memory from JAX.
tf.config.set_visible_devices([], "GPU")

# config name -> (tfds name, preprocessing); REFERENCE.md section 2.
_TFDS_DATASETS = {
    "cifar10": ("cifar10", "as_is"),
    "celeb_a": ("celeb_a", "resize_bilinear"),
    "lsun/tower": ("lsun/tower", "center_crop"),
    "imagenet32": ("imagenet_resized/32x32", "as_is"),
}
DATASETS = ("digits", *_TFDS_DATASETS, "npz", "folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif")


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


def resize_bilinear(image: np.ndarray, image_size: int) -> np.ndarray:
  """Straight (aspect-changing) PIL bilinear resize to image_size x image_size: CelebA 64 (REFERENCE.md sec. 2)."""
  pil_image = _to_pil(image).resize((image_size, image_size), resample=Image.BILINEAR)
  return _from_pil(pil_image, image.shape[-1])


_PREPROCESS = {"center_crop": center_crop_arr, "resize_bilinear": resize_bilinear}


# ---------------------------------------------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 digits (values 0..16) -> uint8 [1797, size, size, 1] images and int32 [1797] labels.

  The 0..16 values are scaled to 0..255 and upscaled bicubically in float (so samples look like pen strokes, not
  8x8 blocks), then clipped and rounded to uint8. Cached: it is small (1797 images) and used by every batch.
  """
  from sklearn import datasets  # Local import: only the embedded default needs scikit-learn.
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32) * (255.0 / 16.0)  # [N, 8, 8]
  out = np.stack([
      np.asarray(Image.fromarray(im).resize((image_size, image_size), resample=Image.BICUBIC))
      for im in images])
  out = np.clip(np.rint(out), 0, 255).astype(np.uint8)[..., None]
  out.setflags(write=False)
  return out, digits.target.astype(np.int32)


def _npz_header(path: pathlib.Path) -> tuple[tuple[int, ...], np.dtype, list[str]]:
  """Shape and dtype of `arr_0` in an .npz and the names of its arrays, read without loading the data."""
  with zipfile.ZipFile(path) as zf:
    names = [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]
    if "arr_0" not in names:
      raise ValueError(f"{path} has no array 'arr_0' (it has {names}); expected uint8 images [N, H, W, C] "
                       "saved with np.savez(path, images).")
    with zf.open("arr_0.npy") as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, _, dtype = read_header(f)
  return shape, dtype, names


def _load_npz(path: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """uint8 [N, size, size, C] images (center_crop_arr where the size differs) and int32 [N] labels of an .npz."""
  with np.load(path) as data:
    images = data["arr_0"]
    labels = data["arr_1"].astype(np.int32) if "arr_1" in data.files else np.zeros(len(images), np.int32)
  if images.shape[1:3] != (image_size, image_size):
    images = np.stack([center_crop_arr(im, image_size) for im in images])
  return images, labels


def _folder_files(data_dir: str) -> list[str]:
  """All image files under data_dir, recursively, sorted (a fixed order, so host shards are reproducible)."""
  return sorted(str(p) for p in pathlib.Path(data_dir).rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _load_image_file(path, image_size: int) -> np.ndarray:
  """One image file -> RGB -> center_crop_arr: uint8 [size, size, 3]."""
  path = path.decode() if isinstance(path, bytes) else path
  with Image.open(path) as pil_image:
    arr = np.asarray(pil_image.convert("RGB"))
  return center_crop_arr(arr, image_size)


def _tfds_builder(data_config):
  import tensorflow_datasets as tfds  # Local import: only the tfds datasets need it.
  name = _TFDS_DATASETS[data_config.dataset][0]
  return tfds.builder(name, data_dir=data_config.data_dir or None)


def _prepared_tfds_builder(data_config):
  """The tfds builder, downloaded and prepared first if that is allowed (config.data.download)."""
  builder = _tfds_builder(data_config)
  if not builder.is_prepared() and data_config.download:
    builder.download_and_prepare()
  return builder


def _tfds_example_fn(data_config, image_size: int):
  """tfds example dict -> {"image": uint8 [size, size, 3], "label": int32} with the dataset's preprocessing."""
  kind = _TFDS_DATASETS[data_config.dataset][1]

  def fn(example):
    image = example["image"]
    if kind != "as_is":
      image = tf.numpy_function(functools.partial(_PREPROCESS[kind], image_size=image_size), [image], tf.uint8)
      image.set_shape([image_size, image_size, 3])
    label = tf.cast(example["label"], tf.int32) if "label" in example else tf.constant(0, tf.int32)
    return {"image": image, "label": label}

  return fn


# ---------------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------------


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
    path = pathlib.Path(data_config.data_dir)
    if not data_config.data_dir or path.suffix != ".npz" or not path.is_file():
      raise ValueError(
          f"dataset 'npz' needs config.data.data_dir to be an existing .npz file, got {data_config.data_dir!r}. "
          "Write one with np.savez(path, images) where images is uint8 [N, H, W, C] (key arr_0; an optional "
          "arr_1 holds int labels).")
    shape, dtype, _ = _npz_header(path)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or shape[0] == 0:
      raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, C] with C in (1, 3) and N > 0, "
                       f"got {dtype} {shape}.")
    return
  if dataset == "folder":
    if not data_config.data_dir or not pathlib.Path(data_config.data_dir).is_dir():
      raise ValueError(f"dataset 'folder' needs config.data.data_dir to be an existing folder of images, "
                       f"got {data_config.data_dir!r}.")
    if not _folder_files(data_config.data_dir):
      raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {data_config.data_dir!r} "
                       "(searched recursively).")
    return
  builder = _tfds_builder(data_config)
  if not builder.is_prepared() and not data_config.download:
    raise ValueError(_tfds_not_prepared_message(data_config, builder))
  if _TFDS_DATASETS[dataset][1] == "as_is":
    height, width = builder.info.features["image"].shape[:2]
    if (height, width) != (image_size, image_size):
      raise ValueError(f"Dataset {dataset!r} has {height}x{width} images; set --config.model.image_size={height}"
                       f" (it is {image_size}).")


def num_channels(data_config) -> int:
  """Channels of the dataset's images: 1 for digits (and 1-channel .npz files), 3 otherwise."""
  if data_config.dataset == "digits":
    return 1
  if data_config.dataset == "npz":
    return int(_npz_header(pathlib.Path(data_config.data_dir))[0][-1])
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
    return np.stack([_load_image_file(f, image_size) for f in files])
  ds = _prepared_tfds_builder(data_config).as_dataset(split="train", shuffle_files=False)
  ds = ds.map(_tfds_example_fn(data_config, image_size), num_parallel_calls=tf.data.AUTOTUNE)
  if max_images is not None:
    ds = ds.take(max_images)
  batches = [batch["image"] for batch in ds.batch(1024).as_numpy_iterator()]
  return np.concatenate(batches) if batches else np.zeros((0, image_size, image_size, 3), np.uint8)


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


def _seed(*ints: int) -> int:
  """A tf.data seed (int < 2**32) derived from several ints (run seed, host index, purpose)."""
  return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(1, np.uint32)[0])


def _index_stream(num_examples: int, seed: int, process_index: int, process_count: int, start: int):
  """This host's example indices, epoch after epoch, from position `start` of that endless stream.

  The host owns the indices process_index, process_index + process_count, ... (disjoint shards whose union is the
  dataset). Epoch e is a permutation of the shard seeded by (seed, e), so the stream is a pure function of the
  seed and a resumed run jumps to its position at once (whole epochs are skipped arithmetically).
  """
  shard = np.arange(process_index, num_examples, process_count, dtype=np.int64)
  if not len(shard):
    raise ValueError(f"The dataset has {num_examples} examples, fewer than the {process_count} hosts.")
  first_epoch, offset = divmod(start, len(shard))

  def epoch(e):
    perm = tf.random.experimental.stateless_shuffle(shard, seed=tf.stack([tf.constant(seed, tf.int64), e]))
    return tf.data.Dataset.from_tensor_slices(perm)

  return tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch).skip(offset)


def _host_dataset(data_config, image_size: int, per_host_batch: int, seed: int, process_index: int,
                  process_count: int, start_step: int):
  """This host's shard, shuffled (seeded), repeated forever, from batch start_step, in uint8 batches
  {"image": [B, S, S, C], "label": [B]}."""
  dataset = data_config.dataset
  shuffle_seed = _seed(seed, process_index, 0)
  start = start_step * per_host_batch
  if dataset in ("digits", "npz"):
    images, labels = (_digits(image_size) if dataset == "digits" else _load_npz(data_config.data_dir, image_size))
    # Gather whole batches from the in-memory arrays (not graph constants: no 2 GB limit).
    ds = _index_stream(len(images), shuffle_seed, process_index, process_count, start)
    ds = ds.batch(per_host_batch, drop_remainder=True)

    def gather(idx):
      image, label = tf.numpy_function(lambda i: (images[i], labels[i]), [idx], (tf.uint8, tf.int32))
      image.set_shape([per_host_batch, image_size, image_size, images.shape[-1]])
      label.set_shape([per_host_batch])
      return {"image": image, "label": label}

    return ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE)
  if dataset == "folder":
    files = np.array(_folder_files(data_config.data_dir))
    ds = _index_stream(len(files), shuffle_seed, process_index, process_count, start)

    def load(idx):
      path = tf.gather(files, idx)
      image = tf.numpy_function(functools.partial(_load_image_file, image_size=image_size), [path], tf.uint8)
      image.set_shape([image_size, image_size, 3])
      return {"image": image, "label": tf.constant(0, tf.int32)}

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
  else:
    # Skipping start_step batches would re-read the data up to there; a resumed tfds run starts a fresh
    # order instead, seeded by (seed, host, start_step).
    import tensorflow_datasets as tfds
    builder = _prepared_tfds_builder(data_config)
    split = tfds.even_splits("train", n=process_count, drop_remainder=False)[process_index]
    read_config = tfds.ReadConfig(shuffle_seed=_seed(seed, process_index, 1, start_step))
    ds = builder.as_dataset(split=split, shuffle_files=True, read_config=read_config)
    ds = ds.map(_tfds_example_fn(data_config, image_size), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.shuffle(max(1, data_config.shuffle_buffer), seed=_seed(seed, process_index, 0, start_step),
                    reshuffle_each_iteration=True).repeat()
  return ds.batch(per_host_batch, drop_remainder=True)


def create_input_iter(data_config, image_size: int, global_batch_size: int, *, seed: int,
                      num_local_devices: int | None = None, start_step: int = 0, process_index: int | None = None,
                      process_count: int | None = None) -> Iterator[dict]:
  """Infinite iterator of this host's numpy batches.

  Yields {"image": float32 [num_local_devices, per_device_batch, H, W, C] in [-1, 1] (x/127.5 - 1 of the uint8
  pixels, REFERENCE.md section 2), "label": int32 [num_local_devices, per_device_batch]}. The global batch is split
  over process_count hosts (default jax.process_count(); this host, default jax.process_index(), reads a disjoint
  shard of the training set) and then over num_local_devices (default jax.local_device_count()).

  Seeded: the same seed gives the same batches. Digits, npz and folder datasets are shuffled fully each epoch and
  start_step > 0 (a resumed run) continues exactly where an uninterrupted run would be at batch start_step; tfds
  datasets shuffle files and a data_config.shuffle_buffer of examples, and a resumed run gets a fresh order. If
  data_config.random_flip, each image is flipped horizontally with probability 1/2 (seeded by seed and batch
  number); digits are never flipped (a mirrored digit is not a digit, so random_flip is ignored for them).
  """
  check_dataset(data_config, image_size)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  num_local_devices = jax.local_device_count() if num_local_devices is None else num_local_devices
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  per_device = per_device_batch_size(global_batch_size, process_count, num_local_devices)
  per_host = per_device * num_local_devices
  ds = _host_dataset(data_config, image_size, per_host, seed, process_index, process_count, start_step)
  flip = bool(data_config.random_flip) and data_config.dataset != "digits"
  flip_seed = _seed(seed, process_index, 2)

  def finalize(step, batch):
    image = batch["image"]  # uint8 [B, H, W, C]
    if flip:
      # Stateless, seeded by batch number: the same flips whatever the threading, and after a resume.
      coin = tf.random.stateless_uniform([per_host], seed=tf.stack([tf.constant(flip_seed, tf.int64), step]))
      image = tf.where((coin < 0.5)[:, None, None, None], tf.reverse(image, axis=[2]), image)
    image = tf.cast(image, tf.float32) / 127.5 - 1.0
    return {"image": tf.reshape(image, [num_local_devices, per_device, *image.shape[1:]]),
            "label": tf.reshape(batch["label"], [num_local_devices, per_device])}

  ds = ds.enumerate(start=start_step).map(finalize, num_parallel_calls=tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  return iter(ds.prefetch(tf.data.AUTOTUNE).with_options(options).as_numpy_iterator())


def prefetch_to_device(iterator: Iterator[dict], size: int = 2, devices=None) -> Iterator[dict]:
  """Puts batches of `create_input_iter` on the local devices ahead of use (leading axis = device), as pmap wants."""
  from flax import jax_utils
  return jax_utils.prefetch_to_device(iterator, size, devices)
