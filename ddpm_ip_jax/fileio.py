"""Writes that a crash cannot leave half-done: a temporary file next to the target, renamed over it at the end."""
import contextlib
import os


@contextlib.contextmanager
def atomic_path(path, suffix=""):
  """Yields a temporary path next to `path` to write to; on success renames it to `path` (atomic on one
  filesystem), on an exception removes it. `suffix` ends the temporary name (".npz": np.savez adds none)."""
  tmp = f"{path}.tmp{suffix}"
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path, text):
  """Writes `text` to `path` atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      f.write(text)
