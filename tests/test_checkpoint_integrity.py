"""No silent bit rot: every checkpoint carries the CRC-32 of its arrays (checkpointing.CHECKSUM_FILE), and a step
whose arrays come back different (bytes flipped in its data files, which orbax reads without complaint) is named
and passed over like an unreadable one; a step without the file (an older run) is accepted quietly. And a FATAL
never hangs: a checkpoints/ or samples/ that is a file stops training before it starts, and orbax's writer
threads of a failed save do not keep the process alive.

The checkpoints are the toy config's train state (configs/test.py), saved in this process; the sample and
training commands run as subprocesses only for what they print and how they exit.
"""
import json
import logging
import os
import shutil
import threading
import time

import jax
import numpy as np
import pytest

from helpers import TOY_TRAIN_ARGS, assert_one_fatal_line, run_commands_in_parallel, toy_config
from ddpm_ip_jax import checkpointing
from ddpm_ip_jax import train_step
from ddpm_ip_jax import workdir as workdir_lib


def _state_at(state, step):
  """`state` with step `step` and params shifted by step / 1000 (still trainable): the two saved steps differ."""
  return state.replace(step=np.asarray(step, np.int32),
                       params=jax.tree.map(lambda p: p + np.float32(step * 1e-3), state.params))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A toy workdir (config.json) with checkpoints 2 and 4; returns (workdir, fresh state, {step: state})."""
  config = toy_config()
  fresh = jax.device_get(train_step.create_training(config).state)
  workdir = tmp_path_factory.mktemp("integrity") / "run"
  workdir_lib.write_config(config, str(workdir))
  manager = checkpointing.make_manager(workdir_lib.checkpoint_dir(str(workdir)), max_to_keep=5)
  states = {step: _state_at(fresh, step) for step in (2, 4)}
  for step, state in states.items():
    checkpointing.save(manager, step, state)
  checkpointing.finish(manager)
  return workdir, fresh, states


@pytest.fixture
def run(saved, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(saved[0], workdir)
  return workdir


def _data_files(step_dir):
  """The array data files of a step (orbax's ocdbt `d/` directories), largest first."""
  files = [os.path.join(root, f) for root, _, names in os.walk(step_dir) if os.path.basename(root) == "d"
           for f in names]
  return sorted(files, key=os.path.getsize, reverse=True)


def flip_bytes(step_dir):
  """Inverts three bytes in the middle of the step's largest data file: array values change and nothing fails
  to decode (bit rot that orbax does not notice)."""
  path = _data_files(step_dir)[0]
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    for fraction in (0.3, 0.5, 0.7):
      data[int(len(data) * fraction)] ^= 0xFF
    f.seek(0)
    f.write(data)


def _flat(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(_flat(a), _flat(b), strict=True))


def _restore(run, target):
  manager = checkpointing.make_manager(workdir_lib.checkpoint_dir(str(run)), create=False)
  with checkpointing.closing(manager):
    state, step = checkpointing.restore_latest(manager, target)
    return state, step, manager, checkpointing.unreadable_steps(manager, step)


def _warnings(caplog):
  """Warnings and errors logged by the code under test. asyncio's "Task exception was never retrieved" is left
  out: tensorstore's reads of the truncated checkpoint of another test in this process can be garbage-collected,
  and logged, at any later time (seen once under load)."""
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name != "asyncio"]


def test_every_step_has_the_checksums_of_all_its_arrays_and_restores_without_a_word(saved, run, caplog):
  _, fresh, states = saved
  for step in (2, 4):
    sums = checkpointing.array_checksums(states[step])
    assert len(sums) == len(jax.tree_util.tree_leaves(fresh)) and "params/out_2/kernel" in sums
    text = (run / "checkpoints" / str(step) / checkpointing.CHECKSUM_FILE).read_text()
    assert f'"crc32": {sums["params/out_2/kernel"]["crc32"]}' in text
  with caplog.at_level(logging.INFO):
    state, step, _, newer = _restore(run, fresh)
  assert step == 4 and newer == [] and _equal(state, states[4])
  assert _warnings(caplog) == [] and "unverified" not in caplog.text


def test_flipped_bytes_in_the_newest_step_fall_back_to_the_previous_one_with_one_warning(saved, run, caplog):
  _, fresh, states = saved
  flip_bytes(run / "checkpoints" / "4")
  # orbax itself reads the damaged step without an error, into other numbers than were saved.
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  raw = ocp.StandardCheckpointer().restore(run / "checkpoints" / "4" / "default", fresh)
  assert not _equal(raw, states[4])
  with caplog.at_level(logging.WARNING):
    state, step, manager, newer = _restore(run, fresh)
  assert step == 2 and _equal(state, states[2]) and newer == [4]
  (line,) = _warnings(caplog)
  assert f"The checkpoint of step 4 ({run / 'checkpoints' / '4'}) cannot be read (CorruptCheckpointError" in line
  assert "differ from the checksums written with them" in line and "using step 2" in line
  # What training does with it: set aside, out of the way of the next saves.
  assert checkpointing.set_aside(manager, newer) == [str(run / "checkpoints" / "4.unreadable")]
  assert manager.all_steps() == [2]
  # Sampling and evaluation (read-only, nested dicts) fall back the same way.
  state, step = checkpointing.restore_trained(workdir_lib.checkpoint_dir(str(run)))
  assert step == 2


def test_an_unreadable_checksum_file_counts_as_damage(saved, run, caplog):
  (run / "checkpoints" / "4" / checkpointing.CHECKSUM_FILE).write_text("{not json")
  with caplog.at_level(logging.WARNING):
    _, step, _, newer = _restore(run, saved[1])
  assert step == 2 and newer == [4]
  assert "checksum file" in _warnings(caplog)[0]


def test_a_step_without_checksums_is_restored_with_one_info_line(saved, run, caplog):
  _, fresh, states = saved
  for step in (2, 4):
    (run / "checkpoints" / str(step) / checkpointing.CHECKSUM_FILE).unlink()
  with caplog.at_level(logging.INFO):
    state, step, _, newer = _restore(run, fresh)
  assert step == 4 and newer == [] and _equal(state, states[4])
  assert _warnings(caplog) == []
  assert [r.getMessage() for r in caplog.records if "unverified" in r.getMessage()] == [
      "The checkpoint of step 4 has no checksums.json (saved before checksums were written): restored unverified."]


def _writer_threads():
  from orbax.checkpoint._src.futures import future  # pylint: disable=import-outside-toplevel
  return [t for t in threading.enumerate() if isinstance(t, future._SignalingThread) and t.is_alive()]  # pylint: disable=protected-access


def test_a_failed_save_leaves_no_orbax_thread_behind(tmp_path):
  # The step directory cannot be created: orbax's other writer threads would wait 5 minutes for it.
  (tmp_path / "checkpoints").write_text("a file")
  manager = checkpointing.make_manager(str(tmp_path / "checkpoints"))
  start = time.monotonic()
  with pytest.raises(NotADirectoryError):
    with checkpointing.closing(manager):
      checkpointing.save(manager, 1, {"w": np.zeros((3,), np.float32)})
      checkpointing.finish(manager)
  assert _writer_threads() == [] and time.monotonic() - start < 30


# ---- The commands, end to end (subprocesses) ----

@pytest.mark.slow
def test_the_commands_never_use_damaged_weights_and_stop_at_once_on_a_file_in_the_way(saved, tmp_path):
  one, both, resume = tmp_path / "one", tmp_path / "both", tmp_path / "resume"
  for run, damaged in ((one, ("4",)), (both, ("2", "4")), (resume, ("4",))):
    shutil.copytree(saved[0], run)
    for step in damaged:
      flip_bytes(run / "checkpoints" / step)
  blocked = {}
  for name in ("checkpoints", "samples"):
    blocked[name] = tmp_path / f"{name}_file"
    blocked[name].mkdir()
    (blocked[name] / name).write_text("a file")
  sample = ["--num_samples=2", "--batch_size=1", "--steps=2"]
  runs = {
      "one": ("sample", f"--workdir={one}", f"--output_dir={tmp_path / 'out_one'}", *sample),
      "both": ("sample", f"--workdir={both}", f"--output_dir={tmp_path / 'out_both'}", *sample),
      "resume": ("main", *TOY_TRAIN_ARGS, f"--workdir={resume}", "--config.training.num_train_steps=6"),
      **{name: ("main", *TOY_TRAIN_ARGS, f"--workdir={workdir}") for name, workdir in blocked.items()},
  }
  procs = run_commands_in_parallel(runs, workers=2, timeout=120)

  assert procs["one"].returncode == 0, procs["one"].stderr[-3000:]
  assert f"The checkpoint of step 4 ({one / 'checkpoints' / '4'}) cannot be read (CorruptCheckpointError" in (
      procs["one"].stderr)
  used = json.loads((tmp_path / "out_one" / "sampling.json").read_text())["model"]
  assert used == f"EMA 0.995 params of step 2 in {one}", used
  # Training names it, sets it aside, resumes from step 2 and saves steps 4 and 6 anew, with their checksums.
  err = procs["resume"].stderr
  assert procs["resume"].returncode == 0, err[-3000:]
  assert f"The checkpoint of step 4 ({resume / 'checkpoints' / '4'}) cannot be read (CorruptCheckpointError" in err
  assert "Resuming from the checkpoint of step 2." in err and (resume / "checkpoints" / "4.unreadable").is_dir()
  assert (resume / "checkpoints" / "6" / checkpointing.CHECKSUM_FILE).is_file()
  line = assert_one_fatal_line(procs["both"])
  assert "No checkpoint in" in line and "step 4: CorruptCheckpointError" in line and "step 2: Corrupt" in line
  assert not (tmp_path / "out_both").exists()
  for name, workdir in blocked.items():
    line = assert_one_fatal_line(procs[name])
    assert f"{workdir / name} is a file, but training writes a directory there; move it away" in line, line
    assert "Training steps" not in procs[name].stderr
    assert os.listdir(workdir) == [name]  # nothing written
