"""Ctrl-C and SIGTERM in the commands that work in batches (`sample`, `evaluate`, `exposure_bias`, `study`): stop
at the next check between batches, say in one line what is kept, exit without a traceback.

The rule, the same for every command: the first SIGINT (Ctrl-C) or SIGTERM asks the command to stop after the
batch (of samples, measurements, or the training run) in progress. The loop's next `check` then raises
`Interrupted`, which `cli.run` prints as one line on stderr,

  interrupted (SIGINT): 12 of 64 samples kept in DIR/parts; run the same command again to resume.

and the process exits with status 128 + the signal's number: 130 for SIGINT, 143 for SIGTERM (the shell's status
of a process a signal ended, so scripts can tell an interruption from a failure, which exits 1). A second signal
stops at once: the same kind of line, saying what the last finished batch kept, and the same status. A
KeyboardInterrupt outside `watch` (Ctrl-C while a model loads) is printed by `cli.run` as one such line too.

How: `watch()` points Python's signal wakeup fd (`signal.set_wakeup_fd`) at a pipe that a daemon thread reads,
and installs a handler that does nothing for both signals. The C-level handler writes each signal's number into
the pipe at once, even while the main thread waits in a long XLA call (Python-level handlers run only when it
returns) and even while another Python handler is installed (the training's own, during the study's training
runs, which then stops the training with a checkpoint). So the thread sees the first signal and marks the stop,
and sees a second one and ends the process itself (`os._exit`: the part file being written is left as a
temporary file, which a rerun ignores).

`watch` acts only in the main thread of a single-process run. In a multi-process run jax's preemption service
takes SIGTERM (as in training), and the commands are not watched: they run on, or a Ctrl-C ends them through
`cli.run`'s line.
"""
import contextlib
import os
import signal
import sys
import threading

from absl import logging
import jax

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
  """A stop that a signal asked for, at a check between batches; `line` is what `cli.run` prints."""

  def __init__(self, signum, kept):
    self.signum = int(signum)
    self.kept = kept
    super().__init__(line(self.signum, kept))

  @property
  def exit_code(self):
    return exit_code(self.signum)


class _State:
  depth = 0  # nesting of `watch` blocks (the outermost installs and restores)
  signum = None  # the first signal that came while watched
  kept = None  # what the last finished batch kept (`note`), for the line


_STATE = _State()
_NOTHING = "stopped before its first batch finished; nothing new was kept"


def signal_name(signum):
  return signal.Signals(signum).name


def exit_code(signum):
  """The exit status of a command a signal interrupted: 128 + its number (130 SIGINT, 143 SIGTERM)."""
  return 128 + int(signum)


def line(signum, kept=None):
  """The one line of an interrupted command."""
  text = (kept or _STATE.kept or _NOTHING).rstrip(".")
  return f"interrupted ({signal_name(signum)}): {text}."


def requested():
  """The number of the signal that asked to stop while watched, or None."""
  return _STATE.signum


def note(kept):
  """Records what the work done so far keeps (`kept`, a few words: "12 of 64 samples kept in DIR; run the same
  command again to resume"), for the line of a second signal or of a KeyboardInterrupt."""
  _STATE.kept = kept


def check(kept):
  """Between batches: records `kept` (see `note`) and raises `Interrupted` if a signal asked to stop."""
  note(kept)
  if _STATE.signum is not None:
    raise Interrupted(_STATE.signum, kept)


def _watched():
  return jax.process_count() == 1 and threading.current_thread() is threading.main_thread()


def _ignore(signum, frame):
  del signum, frame  # the watcher thread acts on the signal (the wakeup fd); nothing to do here


def _watch_pipe(read_fd):
  """The watcher thread: each byte read is the number of a signal that came."""
  while True:
    try:
      data = os.read(read_fd, 64)
    except OSError:
      return
    if not data:
      return
    for signum in data:
      if signum not in SIGNALS:
        continue
      if _STATE.signum is None:
        _STATE.signum = signum
        logging.warning("%s: stopping after the current batch (%s again: stop at once).", signal_name(signum),
                        "Ctrl-C" if signum == signal.SIGINT else signal_name(signum))
      else:
        sys.stderr.write(line(signum) + "\n")
        sys.stderr.flush()
        os._exit(exit_code(signum))  # pylint: disable=protected-access


@contextlib.contextmanager
def watch():
  """`with watch():` turns SIGINT and SIGTERM into a stop at the next `check` (the module docstring); nested
  blocks share the outermost one's. A no-op outside the main thread and in multi-process runs. Enter it after
  `jax.distributed.initialize` (it asks `jax.process_count()`)."""
  if _STATE.depth:  # inside another block: that one's watcher is already running
    _STATE.depth += 1
    try:
      yield
    finally:
      _STATE.depth -= 1
    return
  if not _watched():
    yield
    return
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  _STATE.signum, _STATE.kept = None, None
  handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}
  wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  for sig in SIGNALS:
    signal.signal(sig, _ignore)
  _STATE.depth = 1
  thread = threading.Thread(target=_watch_pipe, args=(read_fd,), daemon=True, name="ddpm_ip_jax.interrupts")
  thread.start()
  try:
    yield
    if _STATE.signum is not None:  # (not reached when a check raised)
      logging.warning("%s came after the last batch: the work is complete.", signal_name(_STATE.signum))
  finally:
    for sig, handler in handlers.items():
      signal.signal(sig, handler)
    signal.set_wakeup_fd(wakeup)
    _STATE.depth = 0
    os.close(write_fd)  # the thread reads the end of the pipe and returns
    thread.join(timeout=5)
    os.close(read_fd)
