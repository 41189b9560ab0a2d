"""The one path layer: every read and write of a workdir, a samples directory, statistics or a report goes through
here, so that a path may be local or a URL (`gs://bucket/runs/c10`, read and written through etils `epath`, the
layer orbax itself uses). Local paths are made absolute (after `~` expansion); URLs are left as they are.

Writes cannot be left half-done: a local file is written to a temporary file next to the target and renamed over
it; an object in a bucket appears whole or not at all (an upload is atomic).

Reads of what a command takes back in (a run's config.json, sample parts, statistics, weights) go through the
checked loaders `load_json_checked` and `load_npz_checked`: a missing, empty, truncated or garbage file, or one
without the arrays it must hold, is an OSError or a `DamagedFileError` (a ValueError) whose one line names the
file, what it should be and what is wrong with it.
"""
import contextlib
import io
import json
import os
import zipfile
import zlib

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


# ---------------------------------------------------------------------------------------------------------------
# URLs checked at start
# ---------------------------------------------------------------------------------------------------------------

# What the commands read and write besides local paths: Google Cloud Storage, through etils epath (the tests run it
# against a local emulator). Other schemes would fail deep inside epath or TensorFlow.
SUPPORTED_SCHEMES = ("gs",)
BUCKET_PROBE_TIMEOUT_S = 30.0  # one metadata request; the clients would retry for minutes without network


def check_url(path, what):
  """ValueError naming `what` (the flag or config field) for a URL this project cannot use: an unsupported scheme
  (s3://, file://, ...) or a gs:// URL without a bucket. Local paths pass."""
  path = str(path)
  if not is_url(path):
    return
  scheme, rest = path.split("://", 1)
  if scheme == "file":
    raise ValueError(f"{what}={path}: give the local path itself ({rest or '/'}), without file://.")
  if scheme not in SUPPORTED_SCHEMES:
    raise ValueError(f"{what}={path}: {scheme}:// is not supported; use a local path or a gs://bucket/path URL.")
  if not rest.split("/", 1)[0]:
    raise ValueError(f"{what}={path}: no bucket; a gs:// URL is gs://<bucket>/<path>.")


def probe_url(path, what, timeout_s=BUCKET_PROBE_TIMEOUT_S):
  """One metadata request for the URL `path` within `timeout_s`: ValueError naming `what` when the bucket cannot be
  reached (no network or credentials: the storage clients retry for minutes) or refuses the request. The request
  runs in a daemon thread, so a hung client does not keep the process alive."""
  import threading  # pylint: disable=import-outside-toplevel
  outcome = []

  def request():
    try:
      epath.Path(path).exists()
      outcome.append(None)
    except Exception as e:  # pylint: disable=broad-except  # any client's failure, reported in one line below
      outcome.append(e)

  thread = threading.Thread(target=request, daemon=True, name="ddpm_ip_jax.probe_url")
  thread.start()
  thread.join(timeout_s)
  bucket = "gs://" + str(path).split("://", 1)[1].split("/", 1)[0]
  if not outcome:
    raise ValueError(f"{what}={path}: the bucket {bucket} did not answer within {timeout_s:g} s (no network, or "
                     "no credentials: gcloud auth application-default login).")
  if outcome[0] is not None:
    first = str(outcome[0]).strip().splitlines()
    raise ValueError(f"{what}={path}: the bucket {bucket} cannot be used: {type(outcome[0]).__name__}: "
                     f"{first[0] if first else ''}")


# ---------------------------------------------------------------------------------------------------------------
# Checked reading: every file the commands read back
# ---------------------------------------------------------------------------------------------------------------

class DamagedFileError(ValueError):
  """A file that is there but cannot be what it should be (empty, truncated, garbage, another format, arrays of
  the wrong kind); the message names the file, what it should hold and what is wrong."""


def _read_failure(path, what, error):
  """The OSError to raise for a file that cannot be read at all, naming `what` and `path`."""
  if isinstance(error, FileNotFoundError):
    return FileNotFoundError(f"{what} {path} not found.")
  if isinstance(error, IsADirectoryError):
    return IsADirectoryError(f"{what} {path} is a directory, not a file.")
  text = str(error).strip()
  reason = getattr(error, "strerror", None) or (text.splitlines()[0] if text else type(error).__name__)
  return OSError(f"{what} {path} cannot be read: {reason}.")


def read_bytes_checked(path, what):
  """The bytes of the file `path`: OSError naming `what` (e.g. "the run's config") and the path when it is
  missing or unreadable, DamagedFileError when it is empty."""
  path = str(path)
  try:
    data = read_bytes(path)
  except OSError as e:
    raise _read_failure(path, what, e) from None
  if not data:
    raise DamagedFileError(f"{what} {path} is empty (0 bytes): a write that never finished?")
  return data


_JSON_TYPES = {dict: "an object {...}", list: "a list [...]", str: "a string", int: "a number", float: "a number",
               bool: "true/false", type(None): "null"}


def _load_json(path, what, kind):
  data = read_bytes_checked(path, what)
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DamagedFileError(f"{what} {path} is not UTF-8 text (byte {e.start}): not a JSON file.") from None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    truncated = " (it ends early: truncated?)" if e.pos >= len(text.rstrip()) else ""
    raise DamagedFileError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
                           f"{truncated}.") from None
  if not isinstance(value, kind):
    raise DamagedFileError(f"{what} {path} holds {_JSON_TYPES.get(type(value), type(value).__name__)}, expected "
                           f"{_JSON_TYPES.get(kind, kind.__name__)}.")
  return value


def _npz_reason(error):
  """What a numpy/zip error while reading an .npz means, in a few words."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  if "pickled" in text or "allow_pickle" in text:
    return "it holds pickled (object) arrays, which are never loaded"
  return f"{type(error).__name__}: {text}"


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive's first entry, or an empty archive
_NPY_MAGIC = b"\x93NUMPY"


def _load_npz(path, what, arrays, only):
  path = str(path)
  if is_url(path):
    source = io.BytesIO(read_bytes_checked(path, what))
    head = source.getvalue()[:6]
  else:
    try:
      with open(path, "rb") as f:
        head = f.read(6)
    except OSError as e:
      raise _read_failure(path, what, e) from None
    source = path
  if not head:
    raise DamagedFileError(f"{what} {path} is empty (0 bytes): a write that never finished?")
  if head.startswith(_NPY_MAGIC):
    raise DamagedFileError(f"{what} {path} is a single .npy array, not an .npz archive.")
  if not head.startswith(_ZIP_MAGIC):
    raise DamagedFileError(f"{what} {path} is not an .npz archive (it does not begin as a zip file does): garbage "
                           "or another format.")
  try:
    with np.load(source, allow_pickle=False) as f:
      loaded = {k: f[k] for k in f.files if only is None or k in only}
  except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError) as e:
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
      raise _read_failure(path, what, e) from None
    reason = _npz_reason(e)
    guess = "" if "pickled" in reason else ": truncated or damaged?"
    raise DamagedFileError(f"{what} {path} is not a readable .npz archive ({reason}){guess}") from None
  for name, (kinds, shape) in (arrays or {}).items():
    check_array(loaded, name, path, what, kinds=kinds, shape=shape)
  return loaded


@contextlib.contextmanager
def _hinted(hint):
  """Appends `hint` (what to do about it) to the message of a DamagedFileError raised inside."""
  try:
    yield
  except DamagedFileError as e:
    if not hint:
      raise
    text = str(e)
    raise DamagedFileError(f"{text}{'' if text.endswith(('.', '?', ')')) else '.'} {hint}") from None


def load_json_checked(path, what, kind=dict, hint=""):
  """The JSON value of the file `path`, which must be of Python type `kind` (dict: a JSON object). OSError naming
  `what` (e.g. "the run's config") and the path for a missing or unreadable file; DamagedFileError naming them and
  the problem for an empty, non-UTF-8, truncated or malformed file or a value of another type, with `hint` (what to
  do about it) after it."""
  with _hinted(hint):
    return _load_json(path, what, kind)


def load_npz_checked(path, what, arrays=None, hint="", only=None):
  """{name: array} of the .npz at `path`, read whole (or, given `only`, those of its arrays named there) and
  checked: OSError naming `what` and the path for a missing or unreadable file; DamagedFileError for an empty,
  truncated or garbage one (not a zip archive, a member that does not decompress, pickled object arrays, an .npy
  file), with `hint` after it. `arrays` ({name: (dtype kinds, shape)}, see `check_array`) lists arrays that must
  be there and what they must be."""
  with _hinted(hint):
    return _load_npz(path, what, arrays, only)


def check_array(arrays, name, path, what, *, kinds=None, shape=None):
  """arrays[name], which must be there, of a dtype whose kind is in `kinds` ("u": unsigned, "i": signed, "f":
  floating, "b": bool; None: any) and of `shape` (a tuple, None for any length at that axis; None: any shape);
  DamagedFileError naming the file otherwise."""
  if name not in arrays:
    raise DamagedFileError(f"{what} {path} has no array {name!r} (it has {sorted(arrays) or 'none'}).")
  a = arrays[name]
  if kinds is not None and a.dtype.kind not in kinds:
    names = {"u": "unsigned integer", "i": "integer", "f": "floating point", "b": "bool"}
    raise DamagedFileError(f"{what} {path}: {name} has dtype {a.dtype}, expected "
                           f"{' or '.join(names.get(k, k) for k in kinds)}.")
  if shape is not None and (a.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, a.shape))):
    want = "[" + ", ".join("N" if s is None else str(s) for s in shape) + "]"
    raise DamagedFileError(f"{what} {path}: {name} has shape {list(a.shape)}, expected {want}.")
  return a
