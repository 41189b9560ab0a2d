"""Orbax checkpoints of the train state: saved asynchronously, the last K kept plus every M-th step,
and the run resumes from the latest complete one.

Orbax writes each step into `<step>.orbax-checkpoint-tmp-<time>` and renames it to `<step>` only when
every file is written, and lists only renamed (finalized) steps: a run killed in the middle of a save
resumes from the checkpoint before it.

Every saved step also holds `checksums.json`: the CRC-32 of each array's bytes, keyed by its path in the state
(`params/out_2/kernel`), written once orbax has finalized the step. A restore recomputes them and treats a
checkpoint whose arrays differ (bit rot, a damaged copy) like an unreadable one. Steps saved before checksums
were written are restored unverified.
"""
import contextlib
import errno
import json
import threading
import time
import warnings
import weakref
import zlib

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from ddpm_ip_jax import fileio


def make_manager(directory, *, max_to_keep=None, keep_period=0, create=True):
  """A CheckpointManager for `directory` (created if needed) that keeps the last `max_to_keep`
  checkpoints plus every step divisible by `keep_period` (0: none). The caller decides when to save."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      keep_period=keep_period or None,
      create=create,
      enable_async_checkpointing=True,
  )
  return ocp.CheckpointManager(fileio.absolute(directory), options=options)


class CheckpointWriteError(OSError):
  """The disk (or the file-size limit) ran out while a checkpoint was written."""


# How a full disk shows in orbax/tensorstore errors (ENOSPC, EDQUOT, EFBIG), which are mostly ValueErrors.
_DISK_FULL = ("No space left", "Disk quota exceeded", "File too large", "os_error_code='28'",
              "os_error_code='122'", "os_error_code='27'")
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def _disk_full_is_one_error(manager):
  """Turns a failed write for lack of space into a CheckpointWriteError that names the step being written and
  the last good one, after removing the partial write (orbax's `<step>.orbax-checkpoint-tmp*` directories)."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  # re-raised unless it is a full disk
    full = (isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS) or any(m in str(e) for m in _DISK_FULL)
    if not full:
      raise
    partial = [n for n in fileio.listdir(manager.directory) if ".orbax-checkpoint-tmp" in n]
    for name in partial:
      _remove_partial(fileio.join(manager.directory, name))
    manager.reload()
    good = manager.latest_step()
    writing = sorted({n.split(".")[0] for n in partial}) or ["?"]
    raise CheckpointWriteError(
        f"No space left to write the checkpoint of step {', '.join(writing)} in {manager.directory} "
        f"({_first_line(e, 160)}); the partial write is removed. "
        + (f"The last good checkpoint is step {good}: free space and rerun the same command to resume from it."
           if good is not None else "There is no complete checkpoint yet.")) from None


def _remove_partial(path, tries=20):
  """Deletes a partial write. orbax's remaining writer threads may still be failing into it (and recreate its
  directories), so it deletes until the path stays gone for a moment."""
  for attempt in range(tries):
    try:
      fileio.remove_tree(path)
    except FileNotFoundError:
      pass
    except OSError:
      if attempt == tries - 1:
        raise
    time.sleep(0.2)
    if not fileio.exists(path):
      return
  raise OSError(f"could not remove the partial checkpoint {path}")


CHECKSUM_FILE = "checksums.json"  # in each step directory, beside orbax's files

# manager -> (step, checksums) of the save in flight, written into the step once orbax has finalized it.
_unwritten_checksums = weakref.WeakKeyDictionary()


class CorruptCheckpointError(ValueError):
  """A checkpoint's arrays differ from the checksums written with them (or those cannot be read)."""


def _leaf_name(path):
  """'params/out_2/kernel' for a key path, the same for the train state and for the nested dicts that a
  restore without a target gives back."""
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return "/".join(names)


def _crc32(array):
  return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def array_checksums(state):
  """{leaf name: {"crc32", "dtype", "shape"}} of every array of `state` (host or device arrays)."""
  sums = {}
  for path, leaf in jax.tree.flatten_with_path(jax.device_get(state))[0]:
    array = np.asarray(leaf)
    sums[_leaf_name(path)] = {"crc32": _crc32(array), "dtype": str(array.dtype), "shape": list(array.shape)}
  return sums


def _checksum_path(manager, step):
  return fileio.join(str(manager.directory), str(step), CHECKSUM_FILE)


def _write_checksums(manager):
  """Writes the checksums of the save that `manager.wait_until_finished()` has just completed into its step."""
  pending = _unwritten_checksums.pop(manager, None)
  if pending is None:
    return
  step, sums = pending
  if fileio.is_dir(fileio.join(str(manager.directory), str(step))):  # finalized (not deleted meanwhile)
    fileio.write_text(_checksum_path(manager, step), json.dumps({"algorithm": "crc32", "arrays": sums}))


def verify(manager, step, state):
  """Checks the restored `state` of `step` against the step's checksum file: a CorruptCheckpointError names
  the arrays that differ. Returns False for a step without one (saved before checksums were written), True
  when verified. Arrays restored with another dtype or shape than saved (into another target) are not checked:
  their bytes differ by design, and a shape mismatch has its own error."""
  path = _checksum_path(manager, step)
  try:
    text = fileio.read_text(path)
  except FileNotFoundError:
    return False
  try:
    saved = json.loads(text)["arrays"]
  except (ValueError, KeyError, TypeError) as e:
    raise CorruptCheckpointError(f"its checksum file {path} cannot be read ({e})") from None
  damaged, checked = [], 0
  for name, record in array_checksums(state).items():
    expected = saved.get(name)
    if expected is None or (expected.get("dtype"), expected.get("shape")) != (record["dtype"], record["shape"]):
      continue
    checked += 1
    if expected.get("crc32") != record["crc32"]:
      damaged.append(name)
  if damaged:
    raise CorruptCheckpointError(
        f"{len(damaged)} of its {checked} arrays differ from the checksums written with them "
        f"({', '.join(damaged[:3])}{', ...' if len(damaged) > 3 else ''}): its files are damaged")
  return True


def save(manager, step, state):
  """Starts saving `state` (a pytree of host or device arrays) as `step`; returns without waiting for
  the write. The next save or `finish` waits for it; a full disk is a CheckpointWriteError there. The
  checksums of its arrays are computed now and written into the step once it is finalized (process 0)."""
  state = jax.device_get(state)
  wait(manager)  # the previous save's failure, if any, surfaces here
  with _disk_full_is_one_error(manager):
    saved = manager.save(int(step), args=ocp.args.StandardSave(state), force=True)
  if saved and jax.process_index() == 0:
    _unwritten_checksums[manager] = (int(step), array_checksums(state))
  return saved


def wait(manager):
  """Waits for the save in flight, then writes its checksums; a full disk is a CheckpointWriteError."""
  with _disk_full_is_one_error(manager):
    try:
      manager.wait_until_finished()
    except BaseException:
      _unwritten_checksums.pop(manager, None)  # the step was not finalized
      raise
  _write_checksums(manager)


def finish(manager):
  """Waits for the save in flight and closes the manager."""
  wait(manager)
  manager.close()


def _release_stuck_writers():
  """Ends orbax's writer threads that wait for a signal that will never come: after a failed save (e.g. the
  step directory could not be created) they wait for it for 5 minutes, and the process cannot exit before they
  end. Each is marked cancelled and sent the signals it waits for, so that it returns at once. Relies on
  orbax's private `_SignalingThread`; does nothing where that is not there."""
  try:
    from orbax.checkpoint._src.futures import future  # pylint: disable=import-outside-toplevel
    signaling_thread, set_signals = future._SignalingThread, future.set_signals  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    return
  stuck = [t for t in threading.enumerate() if isinstance(t, signaling_thread) and t.is_alive()]
  if stuck:  # their writes, never started, would each be reported at exit
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
  for thread in stuck:
    try:
      thread._cancelled = True  # pylint: disable=protected-access
      set_signals(thread._receive_signals, operation_id=thread._operation_id)  # pylint: disable=protected-access
    except Exception as e:  # pylint: disable=broad-except  # best effort on the way out of a failure
      logging.info("Could not release the checkpoint writer thread %s: %s", thread.name, e)
  deadline = time.monotonic() + 10
  for thread in stuck:
    threading.Thread.join(thread, timeout=max(0.0, deadline - time.monotonic()))  # its own join raises


@contextlib.contextmanager
def closing(manager):
  """Closes `manager` on the way out. On an exception it waits for the save in flight (a failure of that save
  is logged, not raised over the exception), then ends orbax's threads of a failed save, so that the error
  reaches the user at once instead of after orbax's 5-minute wait."""
  try:
    yield manager
  except BaseException:
    try:
      manager.close()
    except Exception as e:  # pylint: disable=broad-except  # the exception on its way out is the one to report
      logging.warning("Closing the checkpoints in %s after the error: %s", manager.directory, _first_line(e))
    _release_stuck_writers()
    raise
  manager.close()


def _shape_mismatches(restored, target, limit=5):
  """'path: saved shape vs expected shape' for up to `limit` leaves whose shapes differ (orbax restores a
  checkpoint of another model size into the target's structure without complaint)."""
  saved = dict(jax.tree.flatten_with_path(restored)[0])
  lines = []
  for path, leaf in jax.tree.flatten_with_path(target)[0]:
    have = saved.get(path)
    if have is not None and np.shape(have) != np.shape(leaf):
      lines.append(f"{jax.tree_util.keystr(path)}: {np.shape(have)} in the checkpoint, {np.shape(leaf)} here")
  return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def restore_latest(manager, target=None):
  """Returns (state, step) from the newest readable finalized checkpoint, or (target, None) if there is none.

  `target` is a state of the same structure (e.g. the freshly initialised one); its leaves give the
  shapes and dtypes, and a checkpoint whose arrays have other shapes is a `ValueError` ("does not match").
  A newest checkpoint that cannot be read (truncated or deleted files, an empty step directory, garbage
  metadata) or whose arrays differ from its checksums (`verify`: bit rot) is reported by step and path, and the
  newest older one that can is used instead; the steps newer than the one returned are
  `unreadable_steps(manager, step)`. When no checkpoint can be read, the error names every step and what went
  wrong. Without a target the checkpoint comes back as saved, as nested dicts.
  """
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      if target is None:
        state = manager.restore(step, args=ocp.args.StandardRestore())
      else:
        state = manager.restore(step, args=ocp.args.StandardRestore(jax.device_get(target)))
      verified = verify(manager, step, state)
    except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many kinds for damaged files
      failures.append((step, e))
      continue
    if target is not None:
      mismatches = _shape_mismatches(state, target)
      if mismatches:
        raise ValueError(
            f"The checkpoint of step {step} in {manager.directory} does not match this config (other model "
            f"size?): {'; '.join(mismatches)}. Use a new workdir or the config of that run.")
    for bad, e in failures:
      logging.warning("The checkpoint of step %d (%s) cannot be read (%s: %s); using step %d, the newest "
                      "readable one.", bad, fileio.join(manager.directory, str(bad)), type(e).__name__,
                      _first_line(e), step)
    if not verified:
      logging.info("The checkpoint of step %d has no %s (saved before checksums were written): restored "
                   "unverified.", step, CHECKSUM_FILE)
    return state, step
  if not failures:
    return target, None
  raise ValueError(
      f"No checkpoint in {manager.directory} can be restored here: "
      + "; ".join(f"step {s}: {type(e).__name__}: {_first_line(e)}" for s, e in failures)
      + ". If the checkpoints are intact, they do not match this config (other model size, EMA rates or "
      "timestep sampler?): use a new workdir or the config of that run.")


def _first_line(error, limit=300):
  text = str(error).strip().splitlines()
  return (text[0] if text else "")[:limit]


def unreadable_steps(manager, restored_step):
  """The finalized steps newer than `restored_step` (all of them when it is None): the ones `restore_latest`
  could not read."""
  return sorted(s for s in manager.all_steps() if restored_step is None or s > restored_step)


def set_aside(manager, steps):
  """Renames each unreadable step directory `<step>` to `<step>.unreadable` (orbax lists only integer names),
  so that the run's next saves and the keep-the-last-K deletions do not mix with it; returns the new paths."""
  moved = []
  for step in steps:
    src = fileio.join(manager.directory, str(step))
    dst = f"{src}.unreadable"
    fileio.rename(src, dst)
    moved.append(dst)
  manager.reload()
  return moved


def restore_trained(checkpoint_dir):
  """(the latest complete training checkpoint in `checkpoint_dir` as nested dicts, its step): read-only, for
  sampling and evaluation; FileNotFoundError when there is none."""
  state, step = None, None
  if fileio.is_dir(checkpoint_dir):
    with closing(make_manager(checkpoint_dir, create=False)) as manager:
      state, step = restore_latest(manager)
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir}")
  return state, step
