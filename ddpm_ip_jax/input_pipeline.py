"""Input pipelines: uint8 images -> per-device batches in [-1, 1] for the pmapped training step.

Datasets (`config.data.dataset`), each with the preparation the paper's statistics depend on (docs/method.md
section 2; the functions are in `preprocessing`, the sources in `data_sources`):
  digits      the 8x8 handwritten digits shipped inside scikit-learn (1797 images), scaled to 0..255 and upscaled
              bicubically to image_size (16 in configs/digits.py), 1 channel. The embedded default: no download.
  cifar10     tfds `cifar10`, as is (32x32).
  celeb_a     tfds `celeb_a`, every aligned 178x218 image (the splits train+validation+test, 202,599), decoded by
              OpenCV and resized straight to image_size with cv2.resize's default INTER_LINEAR (not antialiased,
              no crop: `resize_opencv_linear`), as the authors' datasets/celeba64_npz.py.
  lsun/tower  tfds `lsun/tower`: one PIL BOX resize of the shorter side to image_size and the centre crop
              (`box_resize_center_crop`), as the authors' datasets/lsun_bedroom.py.
  imagenet32  tfds `imagenet_resized/32x32`, as is (the official downsampled set).
  npz         `data_dir` is an `.npz` with key `arr_0`, uint8 NHWC (the format of the paper's authors); images
              whose size differs from image_size go through `center_crop_arr`. An `arr_1` of labels is used if
              present, otherwise labels are 0.
  folder      `data_dir` is a folder of png/jpg/jpeg/gif images, searched recursively (each file once, however many
              symbolic links reach it), converted to 8-bit RGB (`images.from_pil`: 16-bit grey scaled) and
              passed through `center_crop_arr` (what the reference's loader does to every image); labels are 0.

Images are decoded with PIL (celeb_a: OpenCV) on a Python thread pool, outside tf.data: Python code inside tf.data
(`tf.numpy_function`) deadlocks when the iterator is destroyed while a call waits for the GIL, which hung the
process at exit. tfds datasets are opened with `tfds.builder(name, data_dir=data_dir or None)`; nothing touches the
network unless `config.data.download` is True: a dataset that is not prepared fails at once with instructions.

Batches are numpy dicts for this host: {"image": float32 [devices, per_device_batch, H, W, C] = x/127.5 - 1,
"label": int32 [devices, per_device_batch]}. The global batch is split over the hosts and then over the local
devices. Every random-access source (digits, npz, folder, tfds prepared as ArrayRecord: a `data_sources.Source`)
is batched one way: each host reads a disjoint shard (every process_count-th example), shuffled fully every epoch
by a seeded permutation, so a run resumes exactly (`start_step`). tfds datasets in TFRecord files stream through
tf.data instead (host split, file shuffling, a shuffle buffer of `config.data.shuffle_buffer` still-encoded
images, repeat), and a resumed run gets a fresh order.
"""
import collections
import concurrent.futures
import functools
import itertools
import os
import pathlib
from typing import Callable, Iterator

from absl import logging
from etils import epath
import jax
import numpy as np

from ddpm_ip_jax import data_sources
from ddpm_ip_jax import fileio
from ddpm_ip_jax import images as images_lib
from ddpm_ip_jax import preprocessing
# Re-exported: the package, the tests and the docs name them here.
from ddpm_ip_jax.data_sources import IMAGE_EXTENSIONS, load_digits  # noqa: F401
from ddpm_ip_jax.preprocessing import box_resize_center_crop, center_crop_arr, resize_opencv_linear  # noqa: F401
from ddpm_ip_jax.runtime import tensorflow_cpu

_digits = load_digits  # the names the tests use
_decode = preprocessing.decode
_folder_files = data_sources.folder_files

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
_WORKERS = min(8, os.cpu_count() or 1)  # PIL threads (PIL releases the GIL while decoding and resizing)
_PREFETCH = _WORKERS + 2  # batches in flight ahead of the consumer


# ---------------------------------------------------------------------------------------------------------------
# tfds.
# ---------------------------------------------------------------------------------------------------------------


def _tfds_builder(data_config):
  tensorflow_cpu()  # before tensorflow_datasets imports TensorFlow
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # only the tfds datasets need it
  name = _TFDS_DATASETS[data_config.dataset][0]
  return tfds.builder(name, data_dir=data_config.data_dir or None)


def _prepared_tfds_builder(data_config):
  """The tfds builder, downloaded and prepared first if that is allowed (config.data.download)."""
  builder = _tfds_builder(data_config)
  if not builder.is_prepared() and data_config.download:
    builder.download_and_prepare()
  return builder


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


# ---------------------------------------------------------------------------------------------------------------
# Checks.
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _unreadable_images(files: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
  """(file, what is wrong) for each local file of `files` whose header PIL cannot read or whose mode is not
  converted. Cached by the listing: a start checks a folder once, however many times check_dataset runs."""
  with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
    return tuple((f, why) for f, why in zip(files, pool.map(data_sources.image_file_problem, files)) if why)


def _check_folder(data_dir: str) -> tuple[str, ...]:
  """The image files of a folder dataset (`data_sources.folder_files`); ValueError if there are none or a local
  one is not a readable image (every header is read, once per listing)."""
  if not data_dir or not epath.Path(data_dir).is_dir():
    raise ValueError(f"dataset 'folder' needs config.data.data_dir to be an existing folder of images, "
                     f"got {data_dir!r}.")
  files = tuple(data_sources.folder_files(data_dir))
  if not files:
    raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {data_dir!r} (searched recursively).")
  bad = _unreadable_images(files) if "://" not in files[0] else ()
  if bad:
    raise ValueError(f"{len(bad)} file(s) under {data_dir!r} are not readable images, e.g. "
                     f"{', '.join(f'{f} ({why})' for f, why in bad[:3])}; replace or remove them.")
  return files


def check_dataset(data_config, image_size: int) -> tuple[str, ...]:
  """Fails fast, without network, with a ValueError that says how to fix it, if the dataset cannot be read.

  Checks the name, the presence of the data (tfds prepared, .npz file and its headers, image folder and the
  header of every local image in it) and, where the image size is fixed by the dataset (cifar10, imagenet32),
  that it matches image_size. Returns the folder dataset's image files in the order they are read (() for the
  other datasets). A folder's headers are read once per listing in a process: `create_input_iter` and
  `load_images` check again, but only list the folder.
  """
  dataset = data_config.dataset
  if dataset not in DATASETS:
    raise ValueError(f"Unknown dataset {dataset!r} (config.data.dataset); choose one of {', '.join(DATASETS)}.")
  if image_size < 1:
    raise ValueError(f"image_size must be positive, got {image_size}.")
  if dataset == "npz":
    data_sources.check_npz(data_config.data_dir)
  elif dataset == "folder":
    return _check_folder(data_config.data_dir)
  elif dataset in _TFDS_DATASETS:
    builder = _tfds_builder(data_config)
    if not builder.is_prepared() and not data_config.download:
      raise ValueError(_tfds_not_prepared_message(data_config, builder))
    if _TFDS_DATASETS[dataset][1] == "as_is":
      height, width = builder.info.features["image"].shape[:2]
      if height is not None and (height, width) != (image_size, image_size):
        raise ValueError(f"Dataset {dataset!r} has {height}x{width} images; set "
                         f"--config.model.image_size={height} (it is {image_size}).")
  return ()


def check_labels(data_config, num_classes: int) -> None:
  """For a class-conditional model (num_classes > 0): ValueError when the dataset's labels do not fit in
  [0, num_classes) (digits: 10 classes; an .npz: its arr_1, which it must have)."""
  if num_classes <= 0:
    return
  if data_config.dataset == "digits":
    low, high = 0, 9
  elif data_config.dataset == "npz":
    data = fileio.load_npz_checked(data_config.data_dir, "The dataset", only=("arr_1",))  # not the images
    if "arr_1" not in data:
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
    return int(data_sources.npz_header(data_config.data_dir)[0][-1])
  return 3


# ---------------------------------------------------------------------------------------------------------------
# Sources and batches.
# ---------------------------------------------------------------------------------------------------------------


def _local_source(data_config, image_size: int, files: tuple[str, ...]) -> data_sources.Source:
  """The random-access source of a digits, npz or folder dataset (`files`: check_dataset's listing)."""
  if data_config.dataset == "digits":
    return data_sources.ArraySource(*load_digits(image_size))
  if data_config.dataset == "npz":
    return data_sources.ArraySource(*data_sources.load_npz(data_config.data_dir, image_size))
  return data_sources.FileSource(files, image_size)


def load_images(data_config, image_size: int, max_images: int | None = None) -> np.ndarray:
  """The training set's first max_images images (all if None), uint8 [N, size, size, C] in the dataset's order.

  The same preprocessing as training, without flip or shuffle, on every host the same: for reference statistics
  (FID) computed on the images the model is trained on. tfds datasets are read in the order of their splits.
  """
  files = check_dataset(data_config, image_size)
  dataset = data_config.dataset
  if dataset in _TFDS_DATASETS:
    return _load_tfds_images(data_config, image_size, max_images)
  source = _local_source(data_config, image_size, files)
  indices = np.arange(len(source))[:max_images]
  chunks = [indices[start:start + 256] for start in range(0, len(indices), 256)] or [indices]

  def images_of(idx):
    return source.examples(idx)[0]

  return np.concatenate(list(_pipelined(functools.partial(images_of, idx) for idx in chunks)))


def _load_tfds_images(data_config, image_size: int, max_images: int | None) -> np.ndarray:
  """`load_images` of a tfds dataset: the first max_images of its splits in order, through tf.data."""
  _, kind, split = _TFDS_DATASETS[data_config.dataset]
  builder = _prepared_tfds_builder(data_config)
  if max_images is not None:  # the first images of each part, in the order of the splits
    split = "+".join(f"{part}[:{max_images}]" for part in split.split("+"))
  ds = _tfds_encoded(builder, split, shuffle_seed=None, shuffle_buffer=0, batch_size=256, drop_remainder=False)
  if max_images is not None:
    ds = ds.unbatch().take(max_images).batch(256)

  def decode_batch(encoded):
    return np.stack([preprocessing.decode(e, image_size, kind) for e in encoded])

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

  Seeded: the same seed gives the same batches. Random-access sources (digits, npz, folder, tfds prepared as
  ArrayRecord) are shuffled fully each epoch and start_step > 0 (a resumed run) continues exactly where an
  uninterrupted run would be at batch start_step; tfds datasets in TFRecord files shuffle files and a
  data_config.shuffle_buffer of examples, and a resumed run gets a fresh order. If data_config.random_flip, each
  image is flipped horizontally with probability 1/2 (seeded by seed and batch number); digits are never flipped
  (a mirrored digit is not a digit, so random_flip is ignored for them). Batches are prepared on a thread pool
  ahead of use.
  """
  files = check_dataset(data_config, image_size)
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
  if dataset in _TFDS_DATASETS:
    builder = _prepared_tfds_builder(data_config)
    _, kind, split = _TFDS_DATASETS[dataset]
    source = data_sources.TfdsSource.open(builder, split, image_size, kind)
  else:
    source = _local_source(data_config, image_size, files)
  if source is None:  # tfds in TFRecord files: a stream
    reads = _tfrecord_batches(data_config, builder, image_size, per_host, seed=seed, start_step=start_step,
                              process_index=process_index, process_count=process_count)
  else:
    reads = (functools.partial(source.examples, idx)
             for idx in _index_batches(len(source), per_host, seed, process_index, process_count, start_step))

  def make_batch(read, step):
    return finalize(*read(), step)

  steps = itertools.count(start_step)
  return _pipelined(functools.partial(make_batch, read, step) for read, step in zip(reads, steps))


def _tfrecord_batches(data_config, builder, image_size: int, per_host: int, *, seed: int, start_step: int,
                      process_index: int, process_count: int) -> Iterator[Callable[[], tuple]]:
  """This host's batches of a tfds dataset in TFRecord files (tfds' default) as tasks giving (uint8 images,
  labels): its even split of the data, files and a shuffle buffer shuffled, repeated forever. A stream, which a
  resumed run (start_step > 0) cannot enter without re-reading the data up to there: it starts a fresh order
  seeded by (seed, host, start_step) instead."""
  name, kind, split = _TFDS_DATASETS[data_config.dataset]
  if start_step > 0:
    logging.warning("Resuming %s at batch %d with a fresh data order: the dataset is prepared as TFRecord. "
                    "Prepare it with `tfds build %s --file_format=array_record` for an exact resume.",
                    data_config.dataset, start_step, name)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  split = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
  ds = _tfds_encoded(builder, split, shuffle_seed=int(_rng(seed, process_index, start_step, 3).integers(2**31)),
                     shuffle_buffer=data_config.shuffle_buffer, batch_size=per_host, drop_remainder=True)

  def decode_batch(batch):
    return np.stack([preprocessing.decode(e, image_size, kind) for e in batch["image"]]), batch["label"]

  return (functools.partial(decode_batch, batch) for batch in ds.as_numpy_iterator())


def prefetch_to_device(iterator: Iterator[dict], size: int = 2) -> Iterator[dict]:
  """Puts the batches of `iterator` (numpy dicts, leading axis = local device) on the local devices, `size`
  batches ahead of use, laid out as the pmapped step's state (`train_state.device_sharding`): the step compiled
  ahead for that layout (`host_memory.BackgroundCompile`) serves the first call."""
  from ddpm_ip_jax import train_state  # pylint: disable=g-import-not-at-top  # (it imports the models)
  sharding = train_state.device_sharding()
  queue = collections.deque()

  def enqueue(n):
    for batch in itertools.islice(iterator, n):
      queue.append(jax.device_put(batch, sharding))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
