"""Where the training and evaluation numbers go: TensorBoard event files when asked for, the log otherwise.

TensorFlow (through clu's summary writer) is imported only when a TensorBoard writer is created, so a run with
`config.training.tensorboard=False` (or `evaluate --tensorboard=false`) needs neither TensorFlow nor tfds.
The console gets one line per log interval from the training loop itself; what a writer records is logged at
DEBUG level only (absl `--verbosity=1` shows it).
"""
import collections
import contextlib
import importlib.util
import time

from absl import logging

from ddpm_ip_jax import runtime


class Writer:
  """write_scalars / write_images / flush / close, into TensorBoard events when `summary_writer` is given."""

  def __init__(self, summary_writer=None):
    self._summary = summary_writer

  def write_scalars(self, step, scalars):
    logging.debug("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(scalars.items())))
    if self._summary is not None:
      self._summary.write_scalars(step, scalars)

  def write_images(self, step, images):
    """images: name -> uint8 [n, h, w, c]."""
    if self._summary is not None:
      self._summary.write_images(step, images)

  def flush(self):
    if self._summary is not None:
      self._summary.flush()

  def close(self):
    if self._summary is not None:
      self._summary.close()


def _summary_writer_module():
  """clu's summary_writer, with TensorFlow kept off the accelerators; ImportError with the fix when missing."""
  try:
    runtime.tensorflow_cpu()  # the writer's TensorFlow must not take the accelerators
    from clu.metric_writers import summary_writer  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"TensorBoard events need TensorFlow ({e}); install it (pip install tensorflow-cpu) or "
                      "turn the events off (config.training.tensorboard=False, evaluate --tensorboard=false)") from e
  return summary_writer


def check_tensorboard_installed():
  """ImportError when TensorFlow or clu, which TensorBoard events need, is not installed, found without importing
  either (seconds for TensorFlow: `make_writer` imports it later, while the training step compiles)."""
  missing = [name for name in ("tensorflow", "clu") if importlib.util.find_spec(name) is None]
  if missing:
    raise ImportError(f"TensorBoard events need TensorFlow and clu ({' and '.join(missing)} not installed); "
                      "install them (pip install tensorflow-cpu clu) or turn the events off "
                      "(config.training.tensorboard=False, evaluate --tensorboard=false)")


def check_tensorboard():
  """ImportError now (not after hours of work) when TensorBoard events cannot be written; creates no file."""
  _summary_writer_module()


def make_writer(directory, tensorboard):
  """A Writer for `directory` (a local path or a URL: TensorFlow's file systems write the events)."""
  if not tensorboard:
    return Writer()
  return Writer(_summary_writer_module().SummaryWriter(str(directory)))


class SectionTimes:
  """Seconds spent in named sections (checkpoint, sample, fid) since the last `pop`."""

  def __init__(self):
    self._seconds = collections.defaultdict(float)

  @contextlib.contextmanager
  def timed(self, name):
    t0 = time.monotonic()
    try:
      yield
    finally:
      self._seconds[name] += time.monotonic() - t0

  def pop(self):
    seconds, self._seconds = dict(self._seconds), collections.defaultdict(float)
    return seconds
