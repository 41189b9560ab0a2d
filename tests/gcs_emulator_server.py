"""gcp-storage-emulator, completed with the two parts of the GCS JSON API it leaves out and tensorstore (orbax's
array writer) relies on to update the manifest of an OCDBT checkpoint:

- media downloads carry the object's generation in the `x-goog-generation` header (tensorstore reads it to
  know which version it read; without it: "Malformed StorageGeneration");
- uploads, reads and deletes honour the `ifGenerationMatch` / `ifGenerationNotMatch` preconditions (412
  Precondition Failed, 304 Not Modified), with which tensorstore makes its read-modify-write of the manifest
  atomic.

Requests are served one at a time, so a precondition check and the write it guards do not interleave with
another request. Everything else is the emulator's own code. Run as the emulator's command line:

  python tests/gcs_emulator_server.py start --host=127.0.0.1 --port=PORT --in-memory --default-bucket=bkt
"""
import functools
from http import HTTPStatus
import sys
import threading

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_ONE_AT_A_TIME = threading.RLock()


def _generation(storage, bucket, name):
  """The object's current generation as a string, "0" when it does not exist (as GCS's preconditions count)."""
  try:
    return str(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return "0"


def _precondition(request, storage, bucket, name):
  """The HTTP status that the request's preconditions demand instead of serving it, or None."""
  query = request.query
  current = _generation(storage, bucket, name)
  if "ifGenerationMatch" in query and query["ifGenerationMatch"][0] != current:
    return HTTPStatus.PRECONDITION_FAILED
  if "ifGenerationNotMatch" in query and query["ifGenerationNotMatch"][0] == current:
    return HTTPStatus.NOT_MODIFIED
  return None


def _guarded(handler, name_of):
  """`handler` with the preconditions checked first (for the object `name_of(request)` names, if any)."""

  @functools.wraps(handler)
  def wrapped(request, response, storage, *args, **kwargs):
    with _ONE_AT_A_TIME:
      name = name_of(request)
      if name is not None:
        status = _precondition(request, storage, request.params["bucket_name"], name)
        if status is not None:
          response.status = status
          return None
      return handler(request, response, storage, *args, **kwargs)

  return wrapped


def _download_with_generation(handler):
  @functools.wraps(handler)
  def wrapped(request, response, storage, *args, **kwargs):
    out = handler(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])
    return out

  return wrapped


def _object_id(request):
  return request.params.get("object_id")


def _media_upload_name(request):
  kind = request.query.get("uploadType", [""])[0]
  return request.query["name"][0] if kind == "media" and "name" in request.query else None


def install():
  """Patches the handlers; must run before gcp_storage_emulator.server (which binds them in its routes) loads."""
  objects.download = _guarded(_download_with_generation(objects.download), _object_id)
  objects.get = _guarded(objects.get, _object_id)
  objects.delete = _guarded(objects.delete, _object_id)
  objects.insert = _guarded(objects.insert, _media_upload_name)


if __name__ == "__main__":
  install()
  from gcp_storage_emulator import __main__ as emulator  # pylint: disable=import-outside-toplevel
  emulator.main(sys.argv[1:])
