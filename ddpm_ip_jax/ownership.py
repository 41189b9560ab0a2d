"""One owner per directory: the lock a command takes in the directory it writes (a training workdir, the output
directory of `sample` and `evaluate`), so that two commands started into the same directory cannot both write it.

`hold(directory, what)` creates `<directory>/.lock`, a JSON record of the owner (host, pid, start time, command
line and a random token), before the command writes anything there, and removes it again however the `with`
block ends: a return, an exception, the SystemExit of a FATAL line, Ctrl-C. SIGTERM, where nothing else handles
it, releases the lock and then ends the process as the default action would (training and sampling install
their own SIGTERM handlers, which end in a normal return). `acquire` without `with` releases at interpreter exit.

A second command into the same directory finds the record and stops with `DirectoryInUseError` (one FATAL line)
naming the owner and the lock file. A record of this host whose process is gone (a SIGKILLed run, a reboot: its
pid no longer runs, is a zombie, or now belongs to a process that started later) is stale: it is taken over with
one warning. A record of another host cannot be checked from here and counts as live; if that run is really
gone, delete the lock file. In multi-process runs only process 0 takes the lock (`chief`).

Local paths: the record is created with os.open(O_CREAT | O_EXCL), atomic on a local filesystem (and on NFS
v3 and later), so of two runs started together exactly one gets it. A stale record is first renamed aside and
the renamed file checked to be that stale record, so two restarts racing for it cannot both win.

Buckets (gs://..., through `fileio`, etils epath): object storage offers no create-if-absent through epath.
The record is written where no object is, then, `BUCKET_SETTLE_S` seconds later, read back and compared with
the own token: of two runs that both found no lock the later writer owns the object and the earlier one, reading
the other's token, stops. Both go on only if one of them took more than `BUCKET_SETTLE_S` between finding no lock
and its write landing (a stalled request); a run killed before it released leaves a record that only a restart
on the same host can take over.
"""
import atexit
import contextlib
import datetime
import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
import uuid

from absl import logging

from ddpm_ip_jax import fileio

LOCK_NAME = ".lock"
BUCKET_SETTLE_S = 2.0  # between writing the record into a bucket and reading it back
_READ_RETRY_S = 2.0  # how long an empty record (its owner is still writing it) is read again

_HELD = {}  # token -> Lock, the locks this process holds
_previous_sigterm = []  # the SIGTERM handler replaced while locks are held, as a one-element list


class DirectoryInUseError(ValueError):
  """The directory's lock is held by a live run (or one that cannot be checked from this host)."""


def _start_ticks(pid):
  """The start time of process `pid` in clock ticks since boot (Linux /proc), or None where it cannot be read."""
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      return int(f.read().rsplit(b")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def _is_running(pid, start_ticks):
  """Whether `pid` on this host is the process that wrote the record: it runs, is no zombie, and where both
  are known, started when the record says."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's process: it exists
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
        return False
  except (OSError, IndexError):
    pass
  ticks = _start_ticks(pid)
  return start_ticks is None or ticks is None or ticks == start_ticks


def owner_record():
  """The record this process writes into a lock: host, pid, start time, command line, token."""
  return dict(host=socket.gethostname(), pid=os.getpid(), start_ticks=_start_ticks(os.getpid()),
              started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              command=shlex.join(getattr(sys, "orig_argv", sys.argv)), token=uuid.uuid4().hex)


def describe(record):
  """'pid 123 on host h, started <time> (<command>)' of a record."""
  return (f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')} "
          f"({record.get('command')})")


def is_stale(record):
  """Whether the owner of `record` is gone: this host's and its process no longer runs (a record of this very
  process counts as live only while this process holds that lock)."""
  if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
    return False
  if record["pid"] == os.getpid():
    return record.get("token") not in _HELD
  return not _is_running(record["pid"], record.get("start_ticks"))


def _read_record(path):
  """The record in the lock file `path`: a dict, None where there is no file, {} where it cannot be parsed
  (after reading an empty file again for `_READ_RETRY_S`: its owner may be writing it)."""
  deadline = time.monotonic() + _READ_RETRY_S
  while True:
    try:
      text = fileio.read_text(path)
    except FileNotFoundError:
      return None
    try:
      record = json.loads(text)
      return record if isinstance(record, dict) else {}
    except ValueError:
      if text.strip() or time.monotonic() > deadline:
        return {}
      time.sleep(0.05)


def _in_use(directory, what, path, record):
  owner = describe(record) if record else "an owner whose record cannot be read"
  return DirectoryInUseError(
      f"{what} {directory} is in use by another run: {owner} holds its lock {path}. Wait for that run to end or "
      f"use another {what.split()[-1]}; if that run is really gone (e.g. its machine was shut down), delete {path} "
      "and rerun.")


class Lock:
  """A lock this process holds: `path` of the file, the `record` written there. `release()` removes the file if
  it still holds this record (idempotent)."""

  def __init__(self, path, record):
    self.path, self.record = path, record

  def release(self):
    if _HELD.pop(self.record["token"], None) is None:
      return
    atexit.unregister(self.release)
    try:
      current = _read_record(self.path)
      if current and current.get("token") == self.record["token"]:
        fileio.remove(self.path)
    except OSError as e:  # a bucket that is gone, a directory removed under the run: nothing left to release
      logging.warning("Could not remove the lock %s: %s", self.path, e)
    if not _HELD:
      _restore_sigterm()


def _create_local(path, record):
  """Creates the lock file with `record`, atomically; False where a file is there."""
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(json.dumps(record))
    f.flush()
    os.fsync(f.fileno())
  return True


def _remove_stale_local(path, stale):
  """Removes the stale lock file `path` if it still holds `stale` (renamed aside first, so that of two
  restarts only one removes it; a record that changed in between is put back)."""
  aside = f"{path}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}"
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return
  moved = _read_record(aside) or {}
  if moved.get("token") != stale.get("token"):
    try:
      os.link(aside, path)  # never over a lock that appeared meanwhile
    except OSError:
      pass
  os.remove(aside)


def _create_in_bucket(path, record):
  """Writes `record` where no lock object is; after BUCKET_SETTLE_S whether the object still holds it."""
  if fileio.exists(path):
    return False
  fileio.write_text(path, json.dumps(record))
  time.sleep(BUCKET_SETTLE_S)
  current = _read_record(path)
  return bool(current) and current.get("token") == record["token"]


def acquire(directory, what):
  """Takes the lock of `directory` (an existing local directory or a bucket URL) for this process; `what` names
  it in messages ('--workdir', 'the output directory'). Returns the `Lock` (released at interpreter exit at the
  latest).

  Raises:
    DirectoryInUseError: a live run (or one of another host) holds it, or the record cannot be read.
  """
  directory = fileio.absolute(directory)
  path = fileio.join(directory, LOCK_NAME)
  record = owner_record()
  for _ in range(5):  # a record removed or taken over between the tries: try again
    if fileio.is_url(path):
      taken = _create_in_bucket(path, record)
    else:
      taken = _create_local(path, record)
    if taken:
      lock = Lock(path, record)
      _HELD[record["token"]] = lock
      atexit.register(lock.release)
      _release_on_sigterm()
      return lock
    current = _read_record(path)
    if current is None:
      continue  # released meanwhile
    if not current or not is_stale(current):
      raise _in_use(directory, what, path, current)
    logging.warning("Taking over the lock %s of a run that is gone: %s.", path, describe(current))
    if fileio.is_url(path):
      fileio.remove(path)
    else:
      _remove_stale_local(path, current)
  raise _in_use(directory, what, path, _read_record(path))


@contextlib.contextmanager
def hold(directory, what, *, chief=True):
  """`with hold(directory, what):` holds the lock of `directory` for the block (see `acquire`) and yields it;
  a no-op yielding None where `chief` is False (the processes other than 0 of a multi-process run)."""
  lock = acquire(directory, what) if chief else None
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()


def _on_sigterm(signum, frame):
  """Releases the held locks, then ends the process by the signal as the default action does."""
  del frame
  for lock in list(_HELD.values()):
    lock.release()
  signal.signal(signum, signal.SIG_DFL)
  os.kill(os.getpid(), signum)


def _release_on_sigterm():
  """Installs `_on_sigterm` where SIGTERM has its default action (main thread only)."""
  if _previous_sigterm or threading.current_thread() is not threading.main_thread():
    return
  if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
    _previous_sigterm.append(signal.signal(signal.SIGTERM, _on_sigterm))


def _restore_sigterm():
  """Puts the default SIGTERM action back if `_on_sigterm` is still the handler."""
  if _previous_sigterm and threading.current_thread() is threading.main_thread():
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
      signal.signal(signal.SIGTERM, _previous_sigterm[0])
    _previous_sigterm.clear()
