"""Every file the commands read back goes through a checked loader (`fileio.load_npz_checked`,
`fileio.load_json_checked` and the readers built on them): a missing, empty, truncated or garbage file, or one of
another kind, is an error whose one line names the file and what is wrong; a damaged sample part is set aside and
drawn again, to the same samples.

In-process tests of the loaders, one of the redraw, and a table of command-line runs (three at a time, against a
copy of the session's toy training run and files damaged on purpose) for the one FATAL line of each command."""
import json
import logging
import os
import shutil
import zipfile

import jax
import numpy as np
import pytest

from helpers import REPO, TOY_TRAIN_ARGS, assert_one_fatal_line, load_config, run_commands_in_parallel
from ddpm_ip_jax import cli
from ddpm_ip_jax import config_base
from ddpm_ip_jax import fileio
from ddpm_ip_jax import generation
from ddpm_ip_jax import models
from ddpm_ip_jax import state_dicts
from ddpm_ip_jax import workdir as workdir_lib
from ddpm_ip_jax.evaluation import digits
from ddpm_ip_jax.evaluation import digits_training
from ddpm_ip_jax.evaluation import inception
from ddpm_ip_jax.evaluation import metrics
from ddpm_ip_jax.evaluation import scoring


# ---------------------------------------------------------------------------------------------------------------
# Damaged files, in process
# ---------------------------------------------------------------------------------------------------------------

def _good_npz(path):
  np.savez(path, images=np.zeros((3, 4), np.uint8), labels=np.arange(3))
  return path.read_bytes()


def _damage(path, kind, good):
  """Writes a damaged version of the file whose good bytes are `good` to `path`."""
  if kind == "empty":
    path.write_bytes(b"")
  elif kind == "truncated":
    path.write_bytes(good[:len(good) // 2])
  elif kind == "garbage":
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, np.uint8).tobytes())
  elif kind == "flipped":  # one byte of a member's data changed: the archive opens, the member's CRC fails
    data = bytearray(good)
    data[data.index(b"NUMPY") + 120] ^= 0xFF
    path.write_bytes(bytes(data))
  elif kind == "npy":
    with open(path, "wb") as f:
      np.save(f, np.zeros(3))
  elif kind == "pickled":
    np.savez(path, images=np.array([{"a": 1}], dtype=object))


NPZ_DAMAGE = {
    "empty": "is empty (0 bytes)",
    "truncated": "is not a readable .npz archive (BadZipFile",
    "garbage": "is not an .npz archive (it does not begin as a zip file does)",
    "flipped": "is not a readable .npz archive (BadZipFile: Bad CRC-32",
    "npy": "is a single .npy array, not an .npz archive",
    "pickled": "holds pickled (object) arrays",
}


@pytest.mark.parametrize("kind", list(NPZ_DAMAGE))
def test_npz_loader_names_the_file_and_the_damage(tmp_path, kind):
  path = tmp_path / "x.npz"
  good = _good_npz(path)
  assert sorted(fileio.load_npz_checked(path, "the thing")) == ["images", "labels"]
  _damage(path, kind, good)
  with pytest.raises(fileio.DamagedFileError) as e:
    fileio.load_npz_checked(path, "the thing", hint="Do this.")
  assert str(e.value).startswith(f"the thing {path} ") and NPZ_DAMAGE[kind] in str(e.value), e.value
  assert str(e.value).endswith(" Do this.") and "\n" not in str(e.value)


def test_npz_loader_checks_the_arrays_it_needs(tmp_path):
  path = tmp_path / "x.npz"
  _good_npz(path)
  loaded = fileio.load_npz_checked(path, "the thing", {"images": ("u", (None, 4)), "labels": ("iu", (3,))})
  np.testing.assert_array_equal(loaded["labels"], np.arange(3))
  for arrays, expected in [({"arr_0": ("u", None)}, "has no array 'arr_0' (it has ['images', 'labels'])"),
                           ({"images": ("f", None)}, "images has dtype uint8, expected floating point"),
                           ({"images": ("u", (None, 5))}, "images has shape [3, 4], expected [N, 5]"),
                           ({"labels": ("i", (3, 1))}, "labels has shape [3], expected [3, 1]")]:
    with pytest.raises(fileio.DamagedFileError) as e:
      fileio.load_npz_checked(path, "the thing", arrays)
    assert str(e.value).startswith(f"the thing {path}") and expected in str(e.value), e.value
  with pytest.raises(FileNotFoundError, match=f"the thing {tmp_path / 'none.npz'} not found"):
    fileio.load_npz_checked(tmp_path / "none.npz", "the thing")
  with pytest.raises(IsADirectoryError, match="is a directory, not a file"):
    fileio.load_npz_checked(tmp_path, "the thing")


JSON_DAMAGE = {
    b"": "is empty (0 bytes)",
    b"\x93garbage": "is not UTF-8 text (byte 0)",
    b"hello": "is not valid JSON: Expecting value at line 1 column 1.",
    b'{"a": [1, 2': "(it ends early: truncated?)",
    b"[1, 2]": "holds a list [...], expected an object {...}",
    b'"text"': "holds a string, expected an object {...}",
}


@pytest.mark.parametrize("content", list(JSON_DAMAGE), ids=["empty", "binary", "garbage", "truncated", "list", "str"])
def test_json_loader_names_the_file_and_the_damage(tmp_path, content):
  path = tmp_path / "x.json"
  path.write_bytes(content)
  with pytest.raises(fileio.DamagedFileError) as e:
    fileio.load_json_checked(path, "the settings")
  assert str(e.value).startswith(f"the settings {path} ") and JSON_DAMAGE[content] in str(e.value), e.value
  path.write_text('{"a": 1}')
  assert fileio.load_json_checked(path, "the settings") == {"a": 1}


def test_run_config_with_a_field_of_the_wrong_type_names_the_file_and_the_field(tmp_path):
  workdir_lib.write_config(config_base.get_config(), tmp_path)
  path = tmp_path / "config.json"
  good = json.loads(path.read_text())
  assert workdir_lib.read_config(tmp_path).model.image_size == good["model"]["image_size"]
  for change, expected in [(("model", "image_size", "abc"), "model.image_size='abc' is a string, expected an integer"),
                           (("training", "num_train_steps", 2.5), "training.num_train_steps=2.5 is a number, "
                            "expected an integer"),
                           (("training", "ema_rates", "x"), "training.ema_rates='x' is a string, expected a list"),
                           (("model", None, 5), "model is an integer, expected an object")]:
    values = json.loads(json.dumps(good))
    section, field, value = change
    if field is None:
      values[section] = value
    else:
      values[section][field] = value
    path.write_text(json.dumps(values))
    with pytest.raises(fileio.DamagedFileError) as e:
      workdir_lib.read_config(tmp_path)
    assert str(e.value).startswith(f"the run's config {path}: ") and expected in str(e.value), e.value
  path.write_text("[1, 2]")
  with pytest.raises(fileio.DamagedFileError, match="holds a list"):
    workdir_lib.read_config(tmp_path)
  # What a config may hold: None in a typed field, an integer for a float, a field the schema does not know.
  values = json.loads(json.dumps(good))
  values["training"]["num_train_steps"], values["diffusion"]["input_perturbation"] = None, 1
  values["model"]["added_later"] = "x"
  path.write_text(json.dumps(values))
  config = workdir_lib.read_config(tmp_path)
  assert config.training.num_train_steps is None and config.diffusion.input_perturbation == 1.0
  assert config.model.added_later == "x"


def test_reference_statistics_weights_and_state_dicts_name_the_file(tmp_path):
  garbage = tmp_path / "garbage.npz"
  _damage(garbage, "garbage", b"")
  for load, what in [(scoring.load_reference_statistics, "the reference statistics file"),
                     (digits_training.load_params, "the digits classifier weights file"),
                     (inception.load_inception_params, "the Inception weights file"),
                     (state_dicts.read_state_dict, "the checkpoint file")]:
    with pytest.raises(fileio.DamagedFileError) as e:
      load(str(garbage))
    assert str(e.value).startswith(f"{what} {garbage} is not an .npz archive"), e.value
  # A reference batch of images given where the statistics belong.
  batch = tmp_path / "batch.npz"
  np.savez(batch, arr_0=np.zeros((4, 8, 8, 3), np.uint8), mu=np.zeros(3), sigma=np.eye(3))
  with pytest.raises(ValueError, match=r"lacks \['features'\].*holds images \(arr_0\): a reference batch goes to "
                     "--reference_npz"):
    scoring.load_reference_statistics(str(batch))
  # Another network's arrays in the digits classifier's place; Inception weights of another network.
  with pytest.raises(ValueError, match=f"{batch} does not hold DigitsNet weights"):
    digits_training.load_params(str(batch))
  with pytest.raises(inception.InceptionWeightsError) as e:
    inception.load_inception_params(str(batch))
  assert f"the Inception weights {batch} do not match" in str(e.value) and "\n" not in str(e.value)


def _flip_late_in(path, member):
  """Flips one byte near the end of an (uncompressed) member of the zip at `path`: its header still reads, its
  CRC-32 no longer matches once the whole member is read."""
  with zipfile.ZipFile(path) as z:
    info = z.getinfo(member)
  raw = bytearray(path.read_bytes())
  with open(path, "rb") as f:  # the local header: 30 bytes, then the name and the extra field
    f.seek(info.header_offset + 26)
    name_len, extra_len = np.frombuffer(f.read(4), "<u2")
  raw[info.header_offset + 30 + int(name_len) + int(extra_len) + info.file_size - 16] ^= 0xFF
  path.write_bytes(bytes(raw))


def test_an_npz_dataset_with_a_damaged_array_names_the_file(tmp_path):
  from ddpm_ip_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  config = load_config("test").data
  config.dataset = "npz"
  # Damaged pixels are found when the images are loaded; damaged labels when check_labels reads them (it reads
  # only arr_1). The members are larger than zipfile's first read, so the header checks still pass.
  for member, load in (("arr_0.npy", lambda: input_pipeline.load_images(config, 32)),
                       ("arr_1.npy", lambda: input_pipeline.check_labels(config, 2))):
    path = tmp_path / f"data_{member[:5]}.npz"
    np.savez(path, np.full((1024, 32, 32, 1), 7, np.uint8), np.arange(1024) % 2)  # stored, not compressed
    _flip_late_in(path, member)
    config.data_dir = str(path)
    input_pipeline.check_dataset(config, 32)  # the headers are fine
    with pytest.raises(fileio.DamagedFileError, match=f"The dataset {path} is not a readable .npz archive"):
      load()


def test_converted_checkpoint_with_damaged_params_names_them(tmp_path):
  config = load_config("test")
  params = models.init_params(models.create_model(config), jax.random.key(0))
  workdir_lib.save_converted(config, params, tmp_path / "model")
  for name in os.listdir(tmp_path / "model" / "params"):
    path = tmp_path / "model" / "params" / name
    if path.is_file():
      path.write_bytes(b"garbage")
  with pytest.raises(fileio.DamagedFileError, match=f"the converted params {tmp_path / 'model' / 'params'} "
                     "cannot be restored"):
    workdir_lib.load_converted(tmp_path / "model")


CONFIG_FILES = {
    "syntax": ("def get_config(:\n", "", "a syntax error at line 1"),
    "no_get_config": ("X = 1\n", "", "defines no get_config()"),
    "wrong_type": ("def get_config():\n  return 5\n", "", "get_config() returned int, not an ml_collections"),
    "raises": ("1 / 0\n", "", "the file fails when it runs (ZeroDivisionError: division by zero)"),
    "get_config_raises": ("def get_config():\n  return {}['x']\n", "", "get_config() fails (KeyError: 'x')"),
    "argument not taken": ("def get_config():\n  return None\n", ":foo", "cannot take the argument 'foo'"),
    "argument needed": ("def get_config(name):\n  return None\n", "", "get_config(name) needs an argument"),
}


@pytest.mark.parametrize("case", list(CONFIG_FILES))
def test_config_file_loader_names_the_file(tmp_path, case):
  text, arg, expected = CONFIG_FILES[case]
  path = tmp_path / "cfg.py"
  path.write_text(text)
  with pytest.raises(ValueError) as e:
    cli.load_config_file(f"{path}{arg}")
  assert str(e.value).startswith(f"--config={path}") and expected in str(e.value), e.value
  assert cli.load_config_file(str(REPO / "configs" / "test.py")).model.image_size == 8


def test_extractor_refuses_images_of_another_size():
  extractor = metrics.FeatureExtractor(name="toy", apply_fn=None, params=None, channels=1, image_size=16)
  with pytest.raises(ValueError, match="the toy extractor takes 16x16 images, got 8x8 ones"):
    metrics.extract_features(np.zeros((2, 8, 8, 1), np.uint8), extractor)


# ---------------------------------------------------------------------------------------------------------------
# A damaged sample part is drawn again, to the same samples
# ---------------------------------------------------------------------------------------------------------------

def test_damaged_part_is_set_aside_and_redrawn_to_the_same_samples(tmp_path, caplog):
  config = load_config("test")
  params = models.init_params(models.create_model(config), jax.random.key(0))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  devices = jax.local_devices()[:2]

  def run(out):
    return generation.generate(config, params, str(out), num_samples=6, respacing="4", per_device_batch=1, seed=3,
                               devices=devices, description="tiny")

  full = np.load(run(tmp_path / "full"))["arr_0"]  # uninterrupted
  assert len(np.unique(full.reshape(6, -1), axis=0)) == 6  # every sample differs: a part's place shows
  out = tmp_path / "resumed"
  run(out)  # parts 0-2, 2-4, 4-6 (2 devices, 1 sample each)
  assert sorted(os.listdir(out / "parts")) == ["00000000-00000002.npz", "00000002-00000004.npz",
                                               "00000004-00000006.npz"]
  part = out / "parts" / "00000002-00000004.npz"
  good = part.read_bytes()
  for i, kind in enumerate(("truncated", "garbage", "empty", "flipped")):
    _damage(part, kind, good)
    damaged = part.read_bytes()
    with caplog.at_level(logging.WARNING):
      caplog.clear()
      resumed = np.load(run(out))["arr_0"]
    np.testing.assert_array_equal(resumed, full)
    assert part.read_bytes() == good, kind  # drawn again, to the same file
    said = [r for r in caplog.records if "Set aside" in r.getMessage()]
    aside = f"{part.name}.damaged{f'.{i}' if i else ''}"  # the earlier damaged copies are kept
    assert len(said) == 1 and said[0].getMessage().startswith(f"Set aside {part} as {aside}; "), said
    assert said[0].levelno == logging.WARNING and "\n" not in said[0].getMessage()
    assert (out / "parts" / aside).read_bytes() == damaged
  # Arrays of the wrong shape count as damage too.
  np.savez(part, images=np.zeros((2, 4, 4, 1), np.uint8), labels=np.zeros(2, np.int64))
  assert generation.set_aside_damaged_parts(str(out / "parts"), 8, 1) == [part.name]
  assert generation.finished_prefix(out / "parts") == 2
  with zipfile.ZipFile(out / "parts" / f"{part.name}.damaged.4") as z:  # after the four above
    assert sorted(z.namelist()) == ["images.npy", "labels.npy"]


def test_damaged_sampling_settings_are_refused_naming_the_file(tmp_path):
  (tmp_path / "sampling.json").write_text('{"model": "tiny", ')
  with pytest.raises(fileio.DamagedFileError, match=f"the sampling settings {tmp_path / 'sampling.json'} is not "
                     r"valid JSON: .*truncated\?\)\. Use another --output_dir"):
    generation._check_settings(str(tmp_path), {"model": "tiny"})  # pylint: disable=protected-access


# ---------------------------------------------------------------------------------------------------------------
# The commands: one FATAL line naming the file or the flag
# ---------------------------------------------------------------------------------------------------------------

BIG = str(2**64)

# name -> (command module and arguments with {d} for the fixture directory, expected text of the FATAL line)
CASES = {
    "main: config with a syntax error": (["main", "--config={d}/syntax.py", "--workdir={d}/m"],
                                         "--config={d}/syntax.py: a syntax error at line 1"),
    "main: config without get_config": (["main", "--config={d}/no_get_config.py", "--workdir={d}/m"],
                                        "--config={d}/no_get_config.py defines no get_config()"),
    "main: get_config of the wrong type": (["main", "--config={d}/wrong_type.py", "--workdir={d}/m"],
                                           "get_config() returned int, not an ml_collections.ConfigDict"),
    "main: argument get_config does not take": (
        ["main", "--config=configs/test.py:foo", "--workdir={d}/m"],
        "--config=configs/test.py:foo: its get_config() cannot take the argument 'foo'"),
    "main: config seed of 2**64": (["main", *TOY_TRAIN_ARGS, "--workdir={d}/m", f"--config.seed={BIG}"],
                                   f"--config.seed={BIG}: a seed must be an integer in [0, 2**63 - 1]"),
    "study: config that fails": (["study", "--config={d}/raises.py", "--workdir={d}/s", "--docs={d}/docs"],
                                 "--config={d}/raises.py: the file fails when it runs (ZeroDivisionError"),
    "study: seeds of 2**64": (["study", *TOY_TRAIN_ARGS, "--workdir={d}/s", "--docs={d}/docs", f"--seeds=0,{BIG}"],
                              f"--seeds={BIG}: a seed must be an integer"),
    "benchmark: config without get_config": (["benchmark", "--config={d}/no_get_config.py"],
                                             "defines no get_config()"),
    "sample: config.json garbage": (["sample", "--workdir={d}/garbage_config"],
                                    "the run's config {d}/garbage_config/config.json is not valid JSON"),
    "sample: config.json field of the wrong type": (
        ["sample", "--workdir={d}/typed_config"],
        "the run's config {d}/typed_config/config.json: model.image_size='abc' is a string, expected an integer"),
    "sample: sampling.json garbage": (["sample", "--workdir={d}/run", "--num_samples=2", "--output_dir={d}/bad_out"],
                                      "the sampling settings {d}/bad_out/sampling.json is not valid JSON"),
    "sample: seed of 2**64": (["sample", "--workdir={d}/run", f"--seed={BIG}"],
                              f"--seed={BIG}: a seed must be an integer in [0, 2**63 - 1]"),
    "digits_classifier: negative seed": (["evaluation.digits_classifier", "--seed=-1", "--output={d}/dc2.npz"],
                                         "--seed=-1: a seed must be an integer"),
    "evaluate: reference garbage": (["evaluate", "--checkpoint={d}/model16", "--extractor=digits",
                                     "--weights={d}/dc.npz", "--reference={d}/garbage.npz", "--num_samples=4"],
                                    "the reference statistics file {d}/garbage.npz is not an .npz archive"),
    "evaluate: reference batch given as the statistics": (
        ["evaluate", "--checkpoint={d}/model16", "--extractor=digits", "--weights={d}/dc.npz",
         "--reference={d}/batch8.npz", "--num_samples=4"], "holds images (arr_0): a reference batch goes to"),
    "evaluate: reference batch of another image size": (
        ["evaluate", "--checkpoint={d}/model16", "--extractor=digits", "--weights={d}/dc.npz",
         "--reference={d}/new_ref.npz", "--reference_npz={d}/batch8.npz", "--num_samples=4"],
        "--reference_npz {d}/batch8.npz: arr_0 has shape [4, 8, 8, 1], expected [N, 16, 16, 1]"),
    "evaluate: digits weights garbage": (["evaluate", "--checkpoint={d}/model16", "--extractor=digits",
                                          "--weights={d}/garbage.npz", "--reference={d}/r.npz"],
                                         "the digits classifier weights file {d}/garbage.npz is not an .npz archive"),
    "convert_inception: garbage weights": (["evaluation.convert_inception", "--input={d}/garbage.npz",
                                            "--output={d}/inception.npz"],
                                           "the Inception weights file {d}/garbage.npz is not an .npz archive"),
}


def _fixtures(d, toy_run):
  """A copy of the session's toy run, the converted 16x16 model, and the damaged files the cases point at, under
  `d`."""
  shutil.copytree(toy_run, d / "run")
  for name, (text, _, _) in CONFIG_FILES.items():
    (d / f"{name}.py").write_text(text)
  workdir_lib.write_config(config_base.get_config(), d / "garbage_config")
  (d / "garbage_config" / "config.json").write_text("\x00{garbage")
  workdir_lib.write_config(config_base.get_config(), d / "typed_config")
  typed = json.loads((d / "typed_config" / "config.json").read_text())
  typed["model"]["image_size"] = "abc"
  (d / "typed_config" / "config.json").write_text(json.dumps(typed))
  (d / "bad_out").mkdir()
  (d / "bad_out" / "sampling.json").write_text("{garbage")
  _damage(d / "garbage.npz", "garbage", b"")
  np.savez(d / "batch8.npz", arr_0=np.zeros((4, 8, 8, 1), np.uint8))
  config = load_config("test")
  config.model.image_size, config.model.channel_mult = 16, (1, 2)
  params = models.init_params(models.create_model(config), jax.random.key(0))
  workdir_lib.save_converted(config, params, d / "model16")
  digits_training.save_params(
      digits.DigitsNet().init(jax.random.key(0), np.zeros((1, 16, 16, 1), np.uint8))["params"],
      str(d / "dc.npz"), accuracy=0.0, seed=0, epochs=0)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, toy_run):
  d = tmp_path_factory.mktemp("checked_loaders")
  _fixtures(d, toy_run)
  return d, run_commands_in_parallel({name: [a.format(d=d) for a in args] for name, (args, _) in CASES.items()})


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_damaged_input_is_one_fatal_line(outcomes, case):
  d, procs = outcomes
  proc = procs[case]
  assert_one_fatal_line(proc, CASES[case][1].format(d=d))
  assert "Compiling" not in proc.stderr and "Training steps" not in proc.stderr


@pytest.mark.slow
def test_failed_commands_wrote_nothing(outcomes):
  d, _ = outcomes
  assert sorted(os.listdir(d / "bad_out")) == ["sampling.json"]
  assert (d / "bad_out" / "sampling.json").read_text() == "{garbage"
  for never in ("m", "s", "docs", "new_ref.npz", "inception.npz", "dc2.npz"):
    assert not (d / never).exists(), never
