"""What a run directory holds and how it is read back: the run's `config.json`, its checkpoints, and the
converted-checkpoint directories of `python -m ddpm_ip_jax.convert`.

  <workdir>/config.json        the full config of a training run (written by training)
  <workdir>/checkpoints/<step>  orbax checkpoints of the train state (checkpointing.py)
  <dir>/config.json + <dir>/params   a converted PyTorch checkpoint (written by `save_converted`)

`load_model` is the one way the sampling, evaluation and exposure-bias commands get a model and its params.
"""
import dataclasses
import json
from typing import Any

from etils import epath
import jax
import ml_collections

from ddpm_ip_jax import checkpointing
from ddpm_ip_jax import config_base
from ddpm_ip_jax import fileio
from ddpm_ip_jax import models
from ddpm_ip_jax.train_state import ema_key

CONFIG_FILE = "config.json"


def checkpoint_dir(workdir):
  return fileio.join(workdir, "checkpoints")


def config_to_json(config):
  return config.to_json_best_effort(indent=2, sort_keys=True)


def _kind(value):
  """A JSON-ish name of the type of `value`, for the error messages."""
  if isinstance(value, bool):
    return "true/false"
  if isinstance(value, int):
    return "an integer"
  if isinstance(value, float):
    return "a number"
  if isinstance(value, (dict, ml_collections.ConfigDict)):
    return "an object"
  return {str: "a string", list: "a list", tuple: "a list", type(None): "null"}.get(type(value), type(value).__name__)


def config_from_dict(values, source="the config"):
  """A project config from the dict of a `config_to_json` text: the schema's defaults updated, lists back to
  tuples. A field whose value has another type than the schema's (`"image_size": "abc"`, an object where a number
  belongs) is a DamagedFileError naming `source` and the field; fields the schema lacks are kept as they are."""
  config = config_base.get_config()

  def update(node, values, prefix):
    for k, v in values.items():
      field = f"{prefix}{k}"
      default = node[k] if k in node else None
      if isinstance(default, ml_collections.ConfigDict):
        if not isinstance(v, dict):
          raise fileio.DamagedFileError(f"{source}: {field} is {_kind(v)}, expected an object of the config's "
                                        f"section {field}.")
        update(default, v, field + ".")
        continue
      if isinstance(v, list) and isinstance(default, tuple):
        v = tuple(v)
      wrong = (isinstance(default, (int, float)) and not isinstance(default, bool) and v is not None
               and (isinstance(v, bool) or not isinstance(v, (int, float))
                    or (isinstance(default, int) and isinstance(v, float))))
      try:
        if wrong:
          raise TypeError(field)
        node[k] = v
      except TypeError:
        raise fileio.DamagedFileError(f"{source}: {field}={v!r} is {_kind(v)}, expected {_kind(default)} "
                                      f"(as {default!r}).") from None

  update(config, values, "")
  return config


def config_from_json(text):
  """A project config from `config_to_json` (a text this process wrote: see `read_config` for a file)."""
  return config_from_dict(json.loads(text))


# What a resumed run must share with the run that wrote the checkpoints: the network, the diffusion (the method
# itself), the data, and the parts of the training state whose structure the checkpoint fixes.
RESUME_FIELDS = ("model", "diffusion", "data.dataset", "data.data_dir", "training.ema_rates",
                 "training.schedule_sampler")


def _flatten(node, prefix=""):
  items = {}
  for k, v in node.items():
    path = f"{prefix}{k}"
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      items.update(_flatten(v, path + "."))
    else:
      items[path] = tuple(v) if isinstance(v, list) else v
  return items


def config_changes(saved, new, fields=RESUME_FIELDS):
  """{path: (saved value, new value)} for every leaf under `fields` where the two configs differ."""
  old, now = _flatten(saved.to_dict()), _flatten(new.to_dict())
  inside = lambda path: any(path == f or path.startswith(f + ".") for f in fields)  # noqa: E731
  missing = "<absent>"
  return {path: (old.get(path, missing), now.get(path, missing)) for path in sorted(set(old) | set(now))
          if inside(path) and old.get(path, missing) != now.get(path, missing)}


def write_config(config, directory):
  """Writes `directory`/config.json (atomically)."""
  fileio.makedirs(directory)
  fileio.write_text(fileio.join(str(directory), CONFIG_FILE), config_to_json(config))


def read_config(directory):
  """The config of `directory`/config.json, checked (`fileio.load_json_checked`, `config_from_dict`): a missing,
  empty, truncated or garbage file, or a field of the wrong type, is an error naming the file."""
  path = fileio.join(str(directory), CONFIG_FILE)
  what = "the run's config"
  return config_from_dict(fileio.load_json_checked(path, what, dict), f"{what} {path}")


def save_converted(config, params, directory):
  """Writes DIR/config.json and the orbax checkpoint DIR/params of {"params": params}."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  directory = epath.Path(fileio.absolute(directory))
  write_config(config, directory)
  checkpointer = ocp.StandardCheckpointer()
  # Host arrays: the checkpoint records no device layout, so any process of any topology can restore it.
  checkpointer.save(directory / "params", {"params": jax.device_get(params)}, force=True)
  checkpointer.wait_until_finished()


def load_converted(directory):
  """(config, params) from a directory written by `save_converted`."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  directory = epath.Path(fileio.absolute(directory))
  for needed in (CONFIG_FILE, "params"):
    if not (directory / needed).exists():
      raise FileNotFoundError(f"{directory / needed} not found: not a converted checkpoint directory.")
  config = read_config(directory)
  target = {"params": models.abstract_params(models.create_model(config))}
  try:
    restored = ocp.StandardCheckpointer().restore(directory / "params", target)
  except (ValueError, OSError, KeyError, TypeError) as e:  # orbax's and tensorstore's kinds for a damaged one
    text = str(e).strip()
    raise fileio.DamagedFileError(
        f"the converted params {directory / 'params'} cannot be restored for the model of its config.json "
        f"({type(e).__name__}: {text.splitlines()[0] if text else ''}): damaged, or another model's? Convert the "
        "checkpoint again.") from None
  return config, restored["params"]


@dataclasses.dataclass
class LoadedModel:
  config: ml_collections.ConfigDict
  params: Any
  description: str       # where the params come from, recorded with every result
  step: int              # training step of the checkpoint (0 for a converted model)
  raw: bool = False      # the raw (not EMA) params of a training run


def restore_trained_params(workdir, config):
  """({"params": ..., "ema_params": {rate key: ...}}, step) of the latest complete checkpoint of a training
  workdir, each params tree checked against the model of `config`."""
  ckpt_dir = checkpoint_dir(workdir)
  state, step = checkpointing.restore_trained(ckpt_dir)
  expected = jax.tree.map(lambda a: tuple(a.shape), models.abstract_params(models.create_model(config)))
  for name, tree in [("params", state["params"])] + [(f"ema {k}", v) for k, v in state["ema_params"].items()]:
    if jax.tree.map(lambda a: tuple(a.shape), tree) != expected:
      raise ValueError(f"the {name} of step {step} in {ckpt_dir} do not match the model of config.json")
  return state, step


def load_model(*, workdir=None, checkpoint=None, use_ema=True, ema_rate=None) -> LoadedModel:
  """The model config and params from a converted `checkpoint` dir or from a training `workdir`: its EMA
  params at `ema_rate` (default the first in the checkpoint), or with use_ema=False the raw params;
  use_ema=None follows the run's config.sampling.use_ema."""
  if checkpoint:
    config, params = load_converted(checkpoint)
    return LoadedModel(config, params, f"converted checkpoint {fileio.absolute(checkpoint)}", 0)
  if not fileio.exists(fileio.join(workdir, CONFIG_FILE)):
    raise FileNotFoundError(f"{fileio.join(workdir, CONFIG_FILE)} not found: --workdir must be a training "
                            "workdir (or give --checkpoint=DIR of a converted model).")
  config = read_config(workdir)
  state, step = restore_trained_params(workdir, config)
  if use_ema is None:
    use_ema = config.sampling.use_ema
  if not use_ema:
    return LoadedModel(config, state["params"], f"raw params of step {step} in {workdir}", step, raw=True)
  emas = state["ema_params"]
  key = next(iter(emas)) if ema_rate is None else ema_key(ema_rate)
  if key not in emas:
    raise ValueError(f"EMA rate {ema_rate} not in the checkpoint; it has {sorted(emas)}.")
  return LoadedModel(config, emas[key], f"EMA {key} params of step {step} in {workdir}", step)
