"""The one path layer: every read and write of a workdir, a samples directory, statistics or a report goes through
here, so that a path may be local or a URL (`gs://bucket/runs/c10`, read and written through etils `epath`, the
layer orbax itself uses). Local paths are made absolute (after `~` expansion); URLs are left as they are.

Writes cannot be left half-done: a local file is written to a temporary file next to the target and renamed over
it; an object in a bucket appears whole or not at all (an upload is atomic).
"""
import contextlib
import io
import os

from etils import epath
import numpy as np


def is_url(path):
  """Whether `path` has a scheme (gs://, s3://, ...)."""
  return "://" in str(path)


def absolute(path):
  """`path` as an absolute local path, or the URL unchanged (never `abspath("gs://...")`)."""
  path = str(path)
  return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def join(base, *names):
  """`base`/`names`... for a local path or a URL."""
  if is_url(base):
    return "/".join([str(base).rstrip("/"), *names])
  return os.path.join(base, *names)


def parent(path):
  """The directory holding `path` (a local path or a URL)."""
  return str(epath.Path(absolute(path)).parent)


def exists(path):
  return epath.Path(path).exists()


def is_dir(path):
  return epath.Path(path).is_dir()


def makedirs(path):
  """Creates the directory `path` and its parents (a no-op where it exists)."""
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def remove(path):
  """Deletes the file `path`."""
  epath.Path(path).unlink()


def remove_tree(path):
  """Deletes the directory `path` and everything in it."""
  epath.Path(path).rmtree()


def rename(src, dst):
  """Renames the file or directory `src` to `dst` (on the same file system or bucket)."""
  epath.Path(src).rename(dst)


def listdir(path):
  """The names in the directory `path`; [] where it does not exist."""
  path = epath.Path(path)
  return sorted(p.name for p in path.iterdir()) if path.exists() else []


def read_bytes(path):
  return epath.Path(path).read_bytes()


def read_text(path):
  return epath.Path(path).read_text()


@contextlib.contextmanager
def atomic_path(path, suffix=""):
  """Yields a temporary local path next to `path` to write to; on success renames it to `path` (atomic on one
  filesystem), on an exception removes it. `suffix` ends the temporary name (".npz": np.savez adds none)."""
  tmp = f"{path}.tmp{suffix}"
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _naming(error, path):
  """The OSError `error` of writing `path` as one whose text names `path` (a full disk's ENOSPC names no file; a
  failed write of the temporary file names that one): the same errno, so the same subclass."""
  tmp = f"{path}.tmp"
  if error.filename is not None and not str(error.filename).startswith(tmp):
    return error  # it names another path already (e.g. a parent directory that cannot be created)
  if error.errno is None:
    return OSError(f"writing {path}: {error}")
  return OSError(error.errno, error.strerror or str(error), str(path))


def write_bytes(path, data):
  """Writes `data` to `path` whole (see the module docstring); creates the parent directory. An OSError (a full
  disk, a read-only filesystem) names `path`."""
  try:
    if is_url(path):
      epath.Path(path).write_bytes(data)
      return
    parent = os.path.dirname(str(path))
    if parent:
      makedirs(parent)
    with atomic_path(path) as tmp:
      with open(tmp, "wb") as f:
        f.write(data)
  except OSError as e:
    named = _naming(e, path)
    if named is e:
      raise
    raise named from e


def write_text(path, text):
  write_bytes(path, text.encode("utf-8"))


def save_npz(path, **arrays):
  """np.savez of `arrays` to `path`, written whole."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes(path, buffer.getvalue())


def load_npz(path):
  """{name: array} of the .npz at `path` (read whole)."""
  if is_url(path):
    with np.load(io.BytesIO(read_bytes(path))) as f:
      return {k: f[k] for k in f.files}
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def save_figure(fig, path, **kwargs):
  """A matplotlib figure as a PNG at `path`."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", **kwargs)
  write_bytes(path, buffer.getvalue())
