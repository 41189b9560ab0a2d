"""URLs checked at start (fileio.check_url, fileio.probe_url, cli.check_urls): an unsupported scheme, a gs:// URL
without a bucket and a bucket that does not answer are one ValueError naming the flag, within seconds."""
import time

from etils import epath
import pytest

from ddpm_ip_jax import fileio

GCS_PATH = type(epath.Path("gs://bkt/run"))  # the class epath uses for gs:// (its exists() is its own)


@pytest.mark.parametrize("url,message", [
    ("s3://bucket/run", "--workdir=s3://bucket/run: s3:// is not supported"),
    ("file:///tmp/run", "--workdir=file:///tmp/run: give the local path itself (/tmp/run), without file://"),
    ("gs:///run", "--workdir=gs:///run: no bucket"),
    ("gs://", "--workdir=gs://: no bucket"),
    ("hdfs://host/run", "hdfs:// is not supported"),
])
def test_unusable_urls_are_named(url, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    fileio.check_url(url, "--workdir")


@pytest.mark.parametrize("path", ["gs://bucket/run", "gs://bucket", "runs/x", "/tmp/x", ""])
def test_usable_paths_pass(path):
  fileio.check_url(path, "--workdir")


def test_a_bucket_that_does_not_answer_is_one_error_within_the_timeout(monkeypatch):
  monkeypatch.setattr(GCS_PATH, "exists", lambda self: time.sleep(30))
  t0 = time.monotonic()
  with pytest.raises(ValueError, match=r"--workdir=gs://bkt/run: the bucket gs://bkt did not answer within 0.5 s"):
    fileio.probe_url("gs://bkt/run", "--workdir", timeout_s=0.5)
  assert time.monotonic() - t0 < 5


def test_a_bucket_that_refuses_is_one_error_with_the_first_line(monkeypatch):
  def refuse(self):
    raise PermissionError("403 Forbidden: no access\nlong details")
  monkeypatch.setattr(GCS_PATH, "exists", refuse)
  with pytest.raises(ValueError, match=r"gs://bkt cannot be used: PermissionError: 403 Forbidden: no access$"):
    fileio.probe_url("gs://bkt/run", "--output_dir")


def test_a_bucket_that_answers_passes(monkeypatch):
  monkeypatch.setattr(GCS_PATH, "exists", lambda self: False)
  fileio.probe_url("gs://bkt/run", "--workdir")


def test_the_console_shows_each_gcsfs_warning_once_and_keeps_other_warnings():
  import logging  # pylint: disable=import-outside-toplevel
  from ddpm_ip_jax import cli  # pylint: disable=import-outside-toplevel

  def record(path, text):
    return logging.LogRecord("x", logging.WARNING, path, 1, text, None, None)

  console = cli._OwnInfoOnly()  # pylint: disable=protected-access
  gcsfs = "/venv/site-packages/gcsfs/extended_gcsfs.py"
  said = [console.filter(record(gcsfs, text)) for text in ("no bucket type", "no bucket type", "other")]
  assert said == [True, False, True]
  assert all(console.filter(record("/venv/site-packages/jax/x.py", "a jax warning")) for _ in range(2))
