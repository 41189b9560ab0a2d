"""Input pipelines: the embedded digits, npz, image folder and tfds sources; sharding, flips, errors."""
import io
import itertools
import os
import time

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ddpm_ip_jax import images
from ddpm_ip_jax import input_pipeline
from ddpm_ip_jax import runtime
from ddpm_ip_jax import train_state


def data_config(dataset="digits", data_dir="", random_flip=False, download=False):
  return ml_collections.ConfigDict(dict(dataset=dataset, data_dir=str(data_dir), random_flip=random_flip,
                                        shuffle_buffer=10_000, download=download))


def to_uint8(images):
  """Inverse of x/127.5 - 1 (exact for uint8 inputs)."""
  return np.rint((images + 1.0) * 127.5).astype(np.uint8)


def first_batches(it, n):
  return list(itertools.islice(it, n))


# ---------------------------------------------------------------------------------------------------------------
# digits: the embedded default.
# ---------------------------------------------------------------------------------------------------------------


def test_digits_images():
  from sklearn import datasets
  images = input_pipeline.load_images(data_config(), 16)
  assert images.shape == (1797, 16, 16, 1) and images.dtype == np.uint8
  assert images.min() == 0 and images.max() == 255
  assert input_pipeline.num_channels(data_config()) == 1
  # The bicubic upscale keeps each 8x8 digit: downsampling back (2x2 means) is close to the scaled original.
  raw = datasets.load_digits().images * (255.0 / 16.0)
  down = images[..., 0].astype(np.float64).reshape(-1, 8, 2, 8, 2).mean(axis=(2, 4))
  assert np.abs(down - raw).mean() < 12.0
  # Smooth, not 8x8 blocks: 2x2 blocks are not constant.
  assert np.mean(images[:, 0::2, 0::2] != images[:, 1::2, 1::2]) > 0.2
  assert input_pipeline.load_images(data_config(), 16, max_images=10).shape == (10, 16, 16, 1)


def test_digits_batches_cover_one_epoch_on_two_devices():
  images = input_pipeline.load_images(data_config(), 16)
  labels = input_pipeline._digits(16)[1]
  # 1797 = 3 * 599: three batches of 599 are exactly the first (shuffled) epoch.
  it = input_pipeline.create_input_iter(data_config(), 16, 599, seed=0, num_local_devices=1)
  batches = first_batches(it, 3)
  got = np.concatenate([b["image"].reshape(-1, 16, 16, 1) for b in batches])
  got_labels = np.concatenate([b["label"].reshape(-1) for b in batches])
  assert np.array_equal(np.sort(got_labels), np.sort(labels))
  assert sorted(map(bytes, to_uint8(got))) == sorted(map(bytes, images))
  assert not np.array_equal(got_labels, labels)  # shuffled

  batch = next(input_pipeline.create_input_iter(data_config(), 16, 8, seed=0))  # 2 simulated devices
  assert batch["image"].shape == (2, 4, 16, 16, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (2, 4) and batch["label"].dtype == np.int32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_digits_deterministic_per_seed_and_never_flipped():
  config = data_config(random_flip=True)  # ignored for digits
  a = first_batches(input_pipeline.create_input_iter(config, 16, 64, seed=3), 3)
  b = first_batches(input_pipeline.create_input_iter(config, 16, 64, seed=3), 3)
  c = first_batches(input_pipeline.create_input_iter(config, 16, 64, seed=4), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(a[0]["label"], c[0]["label"])
  known = set(map(bytes, input_pipeline.load_images(data_config(), 16)))
  for batch in a:
    assert all(bytes(im) in known for im in to_uint8(batch["image"].reshape(-1, 16, 16, 1)))


def test_start_step_resumes_the_stream_exactly(tmp_path):
  np.savez(tmp_path / "a.npz", indexed_images(10, 4), np.arange(10))
  for config in (data_config(), data_config("npz", tmp_path / "a.npz", random_flip=True)):
    size = 16 if config.dataset == "digits" else 4
    full = first_batches(input_pipeline.create_input_iter(config, size, 64, seed=1), 40)
    # 35 * 64 examples: 1 epoch of digits and part of the next, 224 epochs of the npz shard.
    resumed = first_batches(input_pipeline.create_input_iter(config, size, 64, seed=1, start_step=35), 5)
    for x, y in zip(full[35:], resumed):
      np.testing.assert_array_equal(x["image"], y["image"])
      np.testing.assert_array_equal(x["label"], y["label"])


def test_indivisible_batch_is_a_clear_error():
  with pytest.raises(ValueError, match="not divisible by the 2 local devices"):
    input_pipeline.create_input_iter(data_config(), 16, 7, seed=0, num_local_devices=2)
  with pytest.raises(ValueError, match="multiple of the number of hosts"):
    input_pipeline.create_input_iter(data_config(), 16, 6, seed=0, process_index=0, process_count=4)


def test_prefetch_to_device_shards_over_local_devices():
  it = input_pipeline.create_input_iter(data_config(), 16, 8, seed=0)
  host = next(input_pipeline.create_input_iter(data_config(), 16, 8, seed=0))
  batches = input_pipeline.prefetch_to_device(it, size=2)
  batch = next(batches)
  assert len(batch["image"].sharding.device_set) == jax.local_device_count() == 2
  # Laid out as the step's state, so the step compiled ahead for that layout serves it (test_train.py).
  assert batch["image"].sharding == batch["label"].sharding == train_state.device_sharding()
  np.testing.assert_array_equal(np.asarray(batch["image"]), host["image"])
  following = next(input_pipeline.create_input_iter(data_config(), 16, 8, seed=0, start_step=1))
  np.testing.assert_array_equal(np.asarray(next(batches)["image"]), following["image"])


# ---------------------------------------------------------------------------------------------------------------
# npz and image folder.
# ---------------------------------------------------------------------------------------------------------------


def indexed_images(n, size, channels=3):
  """n distinct uint8 images [n, size, size, C]: image i has value 10*i everywhere but a bright left column."""
  images = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None] * 10, size * size * channels)
  images = images.reshape(n, size, size, channels)
  images[:, :, 0] = 255  # asymmetric: a horizontal flip is visible
  return images


def test_per_host_shards_are_disjoint_and_cover_the_npz(tmp_path):
  path = tmp_path / "data.npz"
  images = indexed_images(8, 6)
  np.savez(path, images, np.arange(8) + 100)
  config = data_config("npz", path)
  seen = []
  for host in range(2):
    batch = next(input_pipeline.create_input_iter(config, 6, 8, seed=0, num_local_devices=1, process_index=host,
                                                  process_count=2))
    assert batch["image"].shape == (1, 4, 6, 6, 3)
    seen.append(set(batch["label"].reshape(-1).tolist()))
    for image, label in zip(to_uint8(batch["image"][0]), batch["label"][0]):
      np.testing.assert_array_equal(image, images[label - 100])
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(100, 108))


def test_npz_loader_resizes_other_sizes(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (5, 12, 12, 1), dtype=np.uint8)
  np.savez(tmp_path / "a.npz", images)
  config = data_config("npz", tmp_path / "a.npz")
  assert input_pipeline.num_channels(config) == 1
  np.testing.assert_array_equal(input_pipeline.load_images(config, 12), images)
  smaller = input_pipeline.load_images(config, 6)  # center_crop_arr: one 2x2 box halving
  np.testing.assert_array_equal(smaller, np.stack([input_pipeline.center_crop_arr(im, 6) for im in images]))
  np.testing.assert_allclose(smaller[..., 0], images[..., 0].reshape(5, 6, 2, 6, 2).mean(axis=(2, 4)), atol=1.0)
  batch = next(input_pipeline.create_input_iter(config, 6, 4, seed=0))
  assert batch["image"].shape == (2, 2, 6, 6, 1) and np.all(batch["label"] == 0)


def test_flip_flips_about_half(tmp_path):
  images = indexed_images(20, 4)
  np.savez(tmp_path / "a.npz", images, np.arange(20))
  it = input_pipeline.create_input_iter(data_config("npz", tmp_path / "a.npz", random_flip=True), 4, 40, seed=0,
                                        num_local_devices=1)
  flipped = total = 0
  for batch in first_batches(it, 10):
    for image, label in zip(to_uint8(batch["image"][0]), batch["label"][0]):
      original = images[label]
      if np.array_equal(image, original[:, ::-1]):
        flipped += 1
      else:
        np.testing.assert_array_equal(image, original)
      total += 1
  assert 0.4 < flipped / total < 0.6, flipped / total
  unflipped = next(input_pipeline.create_input_iter(data_config("npz", tmp_path / "a.npz"), 4, 40, seed=0,
                                                    num_local_devices=1))
  assert all(np.array_equal(im, images[lb]) for im, lb in zip(to_uint8(unflipped["image"][0]),
                                                              unflipped["label"][0]))


def test_folder_loader(tmp_path):
  rng = np.random.default_rng(1)
  small = rng.integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)
  big = small.repeat(2, axis=1).repeat(2, axis=2)  # 24x24 with constant 2x2 blocks: halving is exact
  (tmp_path / "a" / "b").mkdir(parents=True)
  for i, image in enumerate(big):
    Image.fromarray(image).save(tmp_path / ("a/b" if i % 2 else "a") / f"img{i}.png")
  Image.fromarray(big[0, ..., 0]).save(tmp_path / "z_gray.png")  # grayscale -> RGB
  (tmp_path / "notes.txt").write_text("not an image")
  config = data_config("folder", tmp_path)
  loaded = input_pipeline.load_images(config, 12)  # sorted paths: a/b/img1, a/b/img3, a/img0, a/img2, a/img4, z
  np.testing.assert_array_equal(loaded[:5], small[[1, 3, 0, 2, 4]])
  np.testing.assert_array_equal(loaded[5], np.repeat(small[0, ..., :1], 3, axis=-1))
  assert input_pipeline.num_channels(config) == 3
  batch = next(input_pipeline.create_input_iter(config, 12, 4, seed=0))
  assert batch["image"].shape == (2, 2, 12, 12, 3) and batch["image"].dtype == np.float32
  known = set(map(bytes, loaded))
  assert all(bytes(im) in known for im in to_uint8(batch["image"].reshape(-1, 12, 12, 3)))


def test_center_crop_arr_known_images():
  rng = np.random.default_rng(2)
  # 64x128 with constant 2x2 blocks, size 32: one halving (64 >= 64) to 32x64, no resize, centre columns 16:48.
  small = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)
  out = input_pipeline.center_crop_arr(small.repeat(2, axis=0).repeat(2, axis=1), 32)
  np.testing.assert_array_equal(out, small[:, 16:48])
  # 256x512 with constant 8x8 blocks, size 32: halvings 256 -> 128 -> 64 -> 32 (stops below 64), then crop.
  out = input_pipeline.center_crop_arr(small.repeat(8, axis=0).repeat(8, axis=1), 32)
  np.testing.assert_array_equal(out, small[:, 16:48])
  # 30x50, size 16: bicubic resize to 16x27 (smaller side 16), centre crop; a constant image stays constant.
  out = input_pipeline.center_crop_arr(np.full((30, 50, 3), 77, np.uint8), 16)
  assert out.shape == (16, 16, 3) and np.all(out == 77)
  # A left/right split image: the crop is centred (columns 5..21 of the 27 wide resized image).
  image = np.zeros((30, 50, 1), np.uint8)
  image[:, 25:] = 200
  out = input_pipeline.center_crop_arr(image, 16)[..., 0]
  assert out.shape == (16, 16)
  assert np.all(out[:, :6] == 0) and np.all(out[:, 10:] == 200)


# ---------------------------------------------------------------------------------------------------------------
# tfds and errors.
# ---------------------------------------------------------------------------------------------------------------


def test_missing_tfds_dataset_fails_fast_with_instructions(tmp_path):
  runtime.tensorflow_cpu()  # TensorFlow's first import (seconds) is not what this test times
  start = time.time()  # what is timed is the check (no download, no retries), not TensorFlow's first import
  with pytest.raises(ValueError) as err:
    input_pipeline.create_input_iter(data_config("cifar10", tmp_path / "tfds"), 32, 8, seed=0)
  assert time.time() - start < 10.0
  message = str(err.value)
  assert str(tmp_path / "tfds" / "cifar10") in message
  assert "tfds build cifar10 --data_dir=" in message and "--config.data.data_dir" in message
  assert not (tmp_path / "tfds").exists()  # nothing was created or downloaded
  start = time.time()
  with pytest.raises(ValueError, match="tfds build lsun/tower"):
    input_pipeline.check_dataset(data_config("lsun/tower", tmp_path / "tfds"), 64)
  assert time.time() - start < 10.0


def test_bad_datasets_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="Unknown dataset 'mnist'"):
    input_pipeline.check_dataset(data_config("mnist"), 16)
  with pytest.raises(ValueError, match="existing .npz file"):
    input_pipeline.check_dataset(data_config("npz", tmp_path / "missing.npz"), 16)
  np.savez(tmp_path / "f.npz", np.zeros((2, 4, 4, 3), np.float32))
  with pytest.raises(ValueError, match="must be uint8"):
    input_pipeline.check_dataset(data_config("npz", tmp_path / "f.npz"), 4)
  np.savez(tmp_path / "named.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
  with pytest.raises(ValueError, match="no array 'arr_0'"):
    input_pipeline.check_dataset(data_config("npz", tmp_path / "named.npz"), 4)
  (tmp_path / "text.npz").write_text("not a zip")
  with pytest.raises(ValueError, match="not a valid .npz"):
    input_pipeline.check_dataset(data_config("npz", tmp_path / "text.npz"), 4)
  with pytest.raises(ValueError, match="No images"):
    input_pipeline.check_dataset(data_config("folder", tmp_path), 16)


def _in_memory_examples(self, split, decoders=None, read_config=None, shuffle_files=False):
  """A tfds mock `_as_dataset` that serves 16 random PNG-encoded images of the dataset's shape from memory.

  tfds' default mock builds examples with a Python generator inside tf.data, which can deadlock when the
  iterator is destroyed while it waits for the GIL; examples held as tensors cannot.
  """
  del split, decoders, read_config, shuffle_files
  import tensorflow as tf
  height, width, channels = self.info.features["image"].shape
  rng = np.random.default_rng(0)
  encoded = []
  for _ in range(16):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8)).save(buf, format="PNG")
    encoded.append(buf.getvalue())
  examples = {"image": tf.constant(encoded)}
  if "label" in self.info.features:
    examples["label"] = tf.constant(rng.integers(0, 10, 16), tf.int64)
  return tf.data.Dataset.from_tensor_slices(examples)


@pytest.mark.parametrize("dataset,size", [("cifar10", 32), ("celeb_a", 64)])
def test_tfds_through_mock_data(dataset, size):
  config = data_config(dataset, random_flip=True, download=True)  # mock_data makes download_and_prepare a no-op
  with tfds.testing.mock_data(as_dataset_fn=_in_memory_examples):
    batch = next(input_pipeline.create_input_iter(config, size, 8, seed=0))
    images = input_pipeline.load_images(config, size, max_images=5)
    if dataset == "cifar10":
      with pytest.raises(ValueError, match="image_size=32"):
        input_pipeline.check_dataset(config, 64)
  assert batch["image"].shape == (2, 4, size, size, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (2, 4) and batch["label"].dtype == np.int32
  assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0
  assert images.shape == (5, size, size, 3) and images.dtype == np.uint8
  if dataset == "celeb_a":  # 218x178 decoded and resized straight to 64x64 by OpenCV, as the authors did
    import cv2  # pylint: disable=import-outside-toplevel
    assert np.all(batch["label"] == 0)
    with tfds.testing.mock_data(as_dataset_fn=_in_memory_examples):
      first = tfds.builder("celeb_a").as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})
      encoded = next(iter(first))["image"].numpy()
    bgr = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(images[0], cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (64, 64)))


@pytest.fixture(scope="module")
def photographs():
  """Real photographs that scikit-image ships (no download)."""
  data = pytest.importorskip("skimage.data")
  return {name: getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}


def test_celeba_preparation_is_the_authors_pixel_for_pixel(photographs, tmp_path):
  """datasets/celeba64_npz.py of the reference: cv2.imread, BGR -> RGB, cv2.resize(img, (64, 64)) (INTER_LINEAR, no
  antialiasing), on JPEG files of CelebA's aligned size (178 x 218)."""
  import cv2  # pylint: disable=import-outside-toplevel
  for name, photo in photographs.items():
    path = tmp_path / f"{name}.jpg"
    Image.fromarray(photo[:218, :178]).save(path, quality=95)
    authors = cv2.resize(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB), (64, 64))
    ours = input_pipeline._decode(path.read_bytes(), 64, "opencv_linear")  # pylint: disable=protected-access
    np.testing.assert_array_equal(ours, authors, err_msg=name)
    # PIL's antialiased bilinear, which the project used before, is not the same image.
    assert not np.array_equal(np.asarray(Image.fromarray(photo[:218, :178]).resize((64, 64), Image.BILINEAR)),
                              authors)


def test_lsun_preparation_is_the_authors_pixel_for_pixel(photographs):
  """datasets/lsun_bedroom.py of the reference: one PIL BOX resize by 64 / (shorter side) to the rounded size,
  then the centre crop at offsets (h - 64) // 2, (w - 64) // 2."""
  for name, photo in photographs.items():
    encoded = io.BytesIO()
    Image.fromarray(photo).save(encoded, format="PNG")
    img = Image.open(io.BytesIO(encoded.getvalue()))
    width, height = img.size
    scale = 64 / min(width, height)
    arr = np.array(img.resize((int(round(scale * width)), int(round(scale * height))), resample=Image.BOX))
    h_off, w_off = (arr.shape[0] - 64) // 2, (arr.shape[1] - 64) // 2
    authors = arr[h_off:h_off + 64, w_off:w_off + 64]
    ours = input_pipeline._decode(encoded.getvalue(), 64, "box_crop")  # pylint: disable=protected-access
    np.testing.assert_array_equal(ours, authors, err_msg=name)
    # The guided-diffusion loader's center_crop_arr (box-halving, then bicubic), used before, differs.
    assert not np.array_equal(input_pipeline.center_crop_arr(photo, 64), authors)


def test_folder_order_is_the_reference_listing(tmp_path):
  """guided-diffusion's _list_image_files_recursively: each directory sorted by entry name, recursing where a
  sub-directory's name falls ("a" before "a.png"), images by extension in any case."""
  for rel in ("b.png", "a.png", "a/z.JPG", "a/b/c.gif", "c/readme.txt", "ab.jpeg"):
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path, format="PNG") if rel.endswith(
        (".png", ".JPG", ".gif", ".jpeg")) else path.write_text("x")
  files = input_pipeline._folder_files(str(tmp_path))  # pylint: disable=protected-access
  assert [os.path.relpath(f, tmp_path) for f in files] == ["a/b/c.gif", "a/z.JPG", "a.png", "ab.jpeg", "b.png"]


class _TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A real (prepared on disk) tfds dataset of 10 distinct 16x24 images: image i is 10*i, label i."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(10):
      yield i, {"image": np.full((16, 24, 3), 10 * i, np.uint8), "label": i}


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  _TinyImages(data_dir=data_dir).download_and_prepare()
  return data_dir


@pytest.mark.parametrize("dataset,size", [("cifar10", None), ("lsun/tower", 8)])
def test_tfds_per_host_split_slicing(tiny_tfds, monkeypatch, dataset, size):
  monkeypatch.setattr(input_pipeline, "_tfds_builder", lambda config: _TinyImages(data_dir=tiny_tfds))
  config = data_config(dataset, tiny_tfds)  # read as cifar10 ("as is") or as lsun/tower (center_crop_arr)
  if size is None:
    with pytest.raises(ValueError, match="Expected a 8x8 image"):  # a wrong size read "as is" is an error
      next(input_pipeline.create_input_iter(config, 8, 10, seed=0, num_local_devices=1))
    return
  seen = []
  for host in range(2):
    batch = next(input_pipeline.create_input_iter(config, size, 10, seed=0, num_local_devices=1, process_index=host,
                                                  process_count=2))
    assert batch["image"].shape == (1, 5, 8, 8, 3)
    labels = batch["label"].reshape(-1)
    np.testing.assert_array_equal(to_uint8(batch["image"][0]), np.broadcast_to(10 * labels[:, None, None, None],
                                                                               (5, 8, 8, 3)))
    seen.append(set(labels.tolist()))
  assert len(seen[0]) == len(seen[1]) == 5
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(10))
  images = input_pipeline.load_images(config, size)
  assert images.shape == (10, 8, 8, 3)  # in the order tfds stored them
  np.testing.assert_array_equal(np.sort(images[:, 0, 0, 0]), 10 * np.arange(10))


@pytest.fixture(scope="module")
def tiny_tfds_array_record(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds_ar")
  _TinyImages(data_dir=data_dir).download_and_prepare(file_format="array_record")
  return data_dir


def test_tfds_in_array_record_resumes_exactly_with_disjoint_host_shards(tiny_tfds_array_record, monkeypatch):
  """Random access (ArrayRecord): batch s is the same whether the run started at 0 or resumed at s, and two
  hosts read disjoint shards that together cover the dataset every epoch."""
  monkeypatch.setattr(input_pipeline, "_tfds_builder", lambda config: _TinyImages(data_dir=tiny_tfds_array_record))
  config = data_config("lsun/tower", tiny_tfds_array_record)
  make = lambda start=0, host=0, hosts=1: input_pipeline.create_input_iter(
      config, 8, 4, seed=3, num_local_devices=1, start_step=start, process_index=host, process_count=hosts)
  straight = make()
  batches = [next(straight) for _ in range(6)]
  resumed = make(start=4)
  for batch in batches[4:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], batch["image"])
    np.testing.assert_array_equal(got["label"], batch["label"])
  for batch in batches:  # image i is 10 * i with label i, through center_crop_arr
    np.testing.assert_array_equal(to_uint8(batch["image"][0])[:, 0, 0, 0], 10 * batch["label"][0])
  hosts = [make(host=h, hosts=2) for h in range(2)]
  labels = [np.concatenate([next(it)["label"].reshape(-1) for _ in range(5)]) for it in hosts]  # 2 per batch: 2 epochs
  for first, second in ((labels[0][:5], labels[1][:5]), (labels[0][5:], labels[1][5:])):
    assert not set(first) & set(second) and set(first) | set(second) == set(range(10))


# ---------------------------------------------------------------------------------------------------------------
# Decoding every PIL mode to 8 bits, and folder listings with symbolic links (issue 22: no silent wrong data).
# ---------------------------------------------------------------------------------------------------------------

_RAMP16 = (np.arange(256, dtype=np.int64) * 257).reshape(16, 16)  # 256 levels of a 16-bit grey image


def _encoded(image, fmt="PNG", **kwargs):
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _decoded(encoded, size=16):
  return input_pipeline._decode(encoded, size, "as_is")  # pylint: disable=protected-access


def _grey3(grey):
  return np.repeat(np.asarray(grey, np.uint8)[..., None], 3, axis=-1)


def test_sixteen_bit_grey_is_scaled_and_rounded_not_clipped():
  """A 16-bit grey PNG with 256 levels decodes to those 256 levels (PIL's convert("RGB") clipped it to 0/255);
  values between levels round: x * 255 / 65535."""
  png = _encoded(Image.fromarray(_RAMP16.astype(np.uint16)))
  assert Image.open(io.BytesIO(png)).mode == "I;16"
  np.testing.assert_array_equal(_decoded(png), _grey3(np.arange(256).reshape(16, 16)))
  odd = np.array([0, 128, 129, 385, 386, 32767, 65407, 65408, 65535])
  np.testing.assert_array_equal(images.sixteen_to_eight(odd), np.rint(odd * 255 / 65535).astype(np.uint8))
  for mode, array in (("I;16B", _RAMP16.astype(">u2")), ("I", _RAMP16.astype(np.int32))):
    image = Image.fromarray(array)
    assert image.mode == mode
    np.testing.assert_array_equal(images.from_pil(image), _grey3(np.arange(256).reshape(16, 16)), err_msg=mode)
    np.testing.assert_array_equal(images.from_pil(image, channels=1)[..., 0], np.arange(256).reshape(16, 16))
  with pytest.raises(ValueError, match=r"x\.tif: PIL mode 'I' with values -1 \.\. 255, outside the 16-bit"):
    images.from_pil(Image.fromarray(np.array([[-1, 255]], np.int32)), name="x.tif")


def test_palette_alpha_cmyk_and_one_bit_images_decode_to_their_colours():
  rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
  grey = rgb[..., 0]
  alpha = np.full((16, 16), 7, np.uint8)  # the colour under the alpha is kept, as the reference's convert("RGB")
  palette_colours = np.array([[255, 0, 0], [0, 0, 255], [10, 200, 30], [1, 2, 3]], np.uint8)
  index = np.arange(256, dtype=np.uint8).reshape(16, 16) % 4

  def palette(**info):
    image = Image.fromarray(index, mode="P")
    image.putpalette(palette_colours.reshape(-1).tolist())
    image.info.update(info)
    return image

  cases = {
      "L": (Image.fromarray(grey), _grey3(grey)),
      "LA": (Image.fromarray(np.stack([grey, alpha], -1), mode="LA"), _grey3(grey)),
      "RGBA": (Image.fromarray(np.dstack([rgb, alpha])), rgb),
      "P": (palette(), palette_colours[index]),
      "P+transparency": (palette(transparency=1), palette_colours[index]),
      "1": (Image.fromarray(grey > 127), _grey3(np.where(grey > 127, 255, 0))),
      "CMYK": (Image.fromarray(np.dstack([255 - rgb, np.zeros((16, 16), np.uint8)]), mode="CMYK"), rgb),
  }
  for name, (image, expected) in cases.items():
    got = _decoded(_encoded(image, "TIFF" if image.mode == "CMYK" else "PNG"))
    assert got.dtype == np.uint8 and got.shape == (16, 16, 3), name
    np.testing.assert_array_equal(got, expected, err_msg=name)
  # The 1-channel view (grey) of a colour image is PIL's L of it.
  np.testing.assert_array_equal(images.from_pil(Image.fromarray(rgb), channels=1)[..., 0],
                                np.asarray(Image.fromarray(rgb).convert("L")))


def test_float_images_are_refused_by_name(tmp_path):
  image = Image.fromarray(np.full((16, 16), 0.5, np.float32))
  assert image.mode == "F"
  with pytest.raises(ValueError, match=r"^an encoded image: PIL mode 'F' is not supported: 32-bit float"):
    _decoded(_encoded(image, "TIFF"))
  # A folder holding one is refused before any work, naming the file and its mode.
  (tmp_path / "ok.png").write_bytes(_encoded(Image.fromarray(np.zeros((16, 16, 3), np.uint8))))
  (tmp_path / "float.png").write_bytes(_encoded(image, "TIFF"))  # a TIFF under a .png name: PIL reads the header
  with pytest.raises(ValueError, match=r"1 file\(s\) .* e\.g\. .*float\.png \(PIL mode 'F', which is not converted"):
    input_pipeline.check_dataset(data_config("folder", tmp_path), 16)


def test_folder_listing_follows_no_symlink_loop_and_counts_each_file_once(tmp_path):
  """One image and a link back to its own folder: one image (it was 41, through loop/loop/...). A link to a
  file outside counts once, however many links and linked folders reach it; a broken link is skipped."""
  folder, outside = tmp_path / "data", tmp_path / "outside"
  folder.mkdir()
  outside.mkdir()
  Image.fromarray(np.full((16, 16, 3), 9, np.uint8)).save(folder / "a.png")
  (folder / "loop").symlink_to(".")
  assert input_pipeline._folder_files(str(folder)) == [str(folder / "a.png")]  # pylint: disable=protected-access
  Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(outside / "b.png")
  (folder / "b_link.png").symlink_to(outside / "b.png")
  (folder / "c_dir").symlink_to(outside)  # reaches b.png a second time
  (folder / "d_broken.png").symlink_to(tmp_path / "missing.png")
  files = input_pipeline._folder_files(str(folder))  # pylint: disable=protected-access
  assert [os.path.relpath(f, folder) for f in files] == ["a.png", "b_link.png"]
  input_pipeline.check_dataset(data_config("folder", folder), 16)
  loaded = input_pipeline.load_images(data_config("folder", folder), 16)
  np.testing.assert_array_equal(loaded[:, 0, 0, 0], [9, 200])


# ---------------------------------------------------------------------------------------------------------------
# Pinned batches of every random-access source (issue 21: one batching path must give the batches it gave before).
# ---------------------------------------------------------------------------------------------------------------


def _batch_hashes(config, size, n=3, **kwargs):
  """The first n batches of create_input_iter as 12 hex digits of sha256(image bytes + label bytes) each."""
  import hashlib  # pylint: disable=import-outside-toplevel
  it = input_pipeline.create_input_iter(config, size, 8, seed=7, num_local_devices=2, **kwargs)
  return [hashlib.sha256(b["image"].tobytes() + b["label"].tobytes()).hexdigest()[:12] for b in first_batches(it, n)]


@pytest.fixture(scope="module")
def pinned_sources(tmp_path_factory):
  """An npz (12x12 images with labels, read at 8: center_crop_arr) and a folder (sizes 8 to 30, one grey image)."""
  root = tmp_path_factory.mktemp("pinned")
  rng = np.random.default_rng(21)
  np.savez(root / "a.npz", rng.integers(0, 256, (11, 12, 12, 3), dtype=np.uint8), rng.integers(0, 10, 11))
  (root / "folder" / "sub").mkdir(parents=True)
  for i, (h, w) in enumerate([(8, 8), (30, 20), (16, 17), (9, 12), (24, 24), (13, 29), (10, 8)]):
    image = rng.integers(0, 256, (h, w) if i == 3 else (h, w, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "folder" / ("sub" if i % 2 else "") / f"{i}.png")
  return root


# (dataset, create_input_iter keywords) -> the hashes the per-source pipelines gave (computed before issue 21).
_PINNED = {
    ("digits", 0): ["03229ca1731c", "36bc404b2f43", "207a0aca94d0"],
    ("digits", 1): ["3c568a740344", "51daa54e2900", "c563b9e8b969"],
    ("npz", 0): ["09eaf374bb78", "8c370333904c", "f42a15ffb3b5"],
    ("npz", 1): ["05b001310e1a", "b98f817cc905", "a0e3c576a587"],
    ("folder", 0): ["71c81d575bd3", "7cbc2c06ffd9", "3b4e0d9e5011"],
    ("folder", 1): ["22d7e68dd5ff", "3660be709ea9", "7c1b0277b1ac"],
    ("lsun/tower", 0): ["9084b06ea5ed", "a1650db01024", "bc604eba759e"],
    ("lsun/tower", 1): ["7084eecda936", "34af45733a57", "847be5abb84d"],
}
_PINNED_RUNS = {0: dict(), 1: dict(start_step=5, process_index=1, process_count=2)}


@pytest.mark.parametrize("dataset,run", list(_PINNED))
def test_random_access_batches_are_pinned(pinned_sources, tiny_tfds_array_record, monkeypatch, dataset, run):
  data_dir = {"npz": pinned_sources / "a.npz", "folder": pinned_sources / "folder",
              "lsun/tower": tiny_tfds_array_record}.get(dataset, "")
  monkeypatch.setattr(input_pipeline, "_tfds_builder", lambda config: _TinyImages(data_dir=tiny_tfds_array_record))
  size = 16 if dataset == "digits" else 8
  got = _batch_hashes(data_config(dataset, data_dir, random_flip=True), size, **_PINNED_RUNS[run])
  assert got == _PINNED[dataset, run]


def test_a_folder_is_checked_once_per_listing(tmp_path, monkeypatch):
  """check_dataset (train.py), create_input_iter and load_images read each header once; a changed listing is
  checked again."""
  from ddpm_ip_jax import data_sources  # pylint: disable=import-outside-toplevel
  for i in range(3):
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
  read = []
  real = data_sources.image_file_problem
  monkeypatch.setattr(data_sources, "image_file_problem", lambda path: read.append(path) or real(path))
  config = data_config("folder", tmp_path)
  assert input_pipeline.check_dataset(config, 8) == tuple(str(tmp_path / f"{i}.png") for i in range(3))
  next(input_pipeline.create_input_iter(config, 8, 2, seed=0))
  assert input_pipeline.load_images(config, 8).shape == (3, 8, 8, 3)
  assert sorted(read) == [str(tmp_path / f"{i}.png") for i in range(3)]
  (tmp_path / "3.png").write_text("not an image")
  with pytest.raises(ValueError, match=r"1 file\(s\) .*3\.png \(not a readable image"):
    input_pipeline.create_input_iter(config, 8, 2, seed=0)
  assert len(read) == 7


def test_import_leaves_the_environment_alone(monkeypatch):
  """TensorFlow's logging variables are set by runtime.tensorflow_cpu, where TensorFlow is imported, not on
  import."""
  import importlib  # pylint: disable=import-outside-toplevel
  for name in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS"):
    monkeypatch.delenv(name, raising=False)
  before = dict(os.environ)
  importlib.reload(input_pipeline)
  assert dict(os.environ) == before
