"""A real local Google Cloud Storage server for the tests: gcp-storage-emulator (the GCS JSON API on localhost).

gcsfs and google-cloud-storage follow STORAGE_EMULATOR_HOST, tensorstore (orbax's array writer) follows
TENSORSTORE_GCS_HTTP_URL, and EPATH_USE_TF=false makes etils epath use gcsfs. TensorFlow's own GCS filesystem
(tf.io.gfile: TensorBoard event files, tfds data_dir) has no endpoint setting and cannot be pointed at it.
"""
import contextlib
import os
import socket
import subprocess
import sys
import time


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running(bucket="bkt"):
  """Starts the emulator with an empty in-memory `bucket`; yields the environment that points every client at
  it (also set in this process's os.environ while it runs); stops it at the end."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  launcher = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator_server.py")
  server = subprocess.Popen([sys.executable, launcher, "start", "--host=127.0.0.1",
                             f"--port={port}", "--in-memory", f"--default-bucket={bucket}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "EPATH_USE_TF": "false",
         "GOOGLE_CLOUD_PROJECT": "test"}
  saved = {k: os.environ.get(k) for k in env}
  try:
    deadline = time.monotonic() + 30
    while True:
      with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
          break
      if server.poll() is not None or time.monotonic() > deadline:
        raise RuntimeError("gcp-storage-emulator did not start")
      time.sleep(0.1)
    os.environ.update(env)
    yield env
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.terminate()
    server.wait(timeout=10)
