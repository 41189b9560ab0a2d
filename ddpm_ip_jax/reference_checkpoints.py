"""PyTorch DDPM-IP / guided-diffusion checkpoints <-> Flax params, and the reference's flags -> a project config
(docs/method.md sections 2 and 3).

  config = config_from_reference_flags({"image_size": 32, "num_channels": 128, ...})
  params = load_reference_checkpoint("model.pt", config)      # or the same weights as .npz
  out = create_model(config).apply({"params": params}, x_nhwc, t)

The command is `python -m ddpm_ip_jax.convert` (a released `.pt` into a directory that `workdir.load_model`
reads, and back).

Layouts: Conv2d (O,I,kh,kw) <-> (kh,kw,I,O); Conv1d (O,I,1) <-> Dense (I,O) (attention qkv/proj_out);
Linear (O,I) <-> (I,O); GroupNorm weight/bias <-> scale/bias; Embedding (N,D) as is.
"""
import re

import jax
import numpy as np

from ddpm_ip_jax import config_base
from ddpm_ip_jax import fileio
from ddpm_ip_jax import state_dicts
from ddpm_ip_jax.models import abstract_params, create_model

# The reference's flag defaults (docs/method.md section 2).
REFERENCE_FLAG_DEFAULTS = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "num_head_channels": -1,
    "attention_resolutions": "16,8",
    "channel_mult": "",
    "dropout": 0.0,
    "class_cond": False,
    "use_checkpoint": False,  # gradient checkpointing: memory only, no effect on the numbers
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
    "input_pertub": 0.0,
    "learn_sigma": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
    "sigma_small": False,
}
# class_cond=True means 10 classes in DDPM-IP's code (script_util.NUM_CLASSES = 10); guided-diffusion's code and
# its released class-conditional ImageNet models use 1000. Not a reference flag: "num_classes" in the flags of
# `config_from_reference_flags` says which (default DDPM-IP's).
DDPM_IP_CLASSES = 10
PROJECT_FLAGS = ("num_classes",)

# Flax module names are the state_dict names with "." -> "_"; these carry numeric indices.
_INDEXED = re.compile(r"^(time_embed|input_blocks|middle_block|output_blocks|out_layers|out|"
                      r"in_layers|emb_layers)_(\d+(?:_\d+)*)$")
_CONV1D = ("qkv", "proj_out")


class CheckpointMismatchError(ValueError):
  """A state_dict that does not fit the configured model: missing, unexpected or wrongly shaped keys."""


def _as_bool(name, value):
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
    return value.lower() in ("true", "yes", "1")
  if isinstance(value, int) and value in (0, 1):
    return bool(value)
  raise ValueError(f"reference flag {name} must be a boolean, got {value!r}.")


def _as_number(x):
  f = float(x)
  return int(f) if f.is_integer() else f


def _as_tuple(name, value, number):
  """"16,8" / "" / [16, 8] / 16 -> a tuple."""
  if isinstance(value, str):
    parts = [p.strip() for p in value.split(",") if p.strip()]
  elif isinstance(value, (list, tuple)):
    parts = list(value)
  elif isinstance(value, (int, float)):
    parts = [value]
  else:
    raise ValueError(f"reference flag {name} must be a comma-separated string, got {value!r}.")
  try:
    return tuple(number(p) for p in parts)
  except ValueError as e:
    raise ValueError(f"reference flag {name}={value!r} is not a list of numbers.") from e


def _as_int(name, value):
  """An integer flag (an int, or a string/float holding one); ValueError naming the flag otherwise."""
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = None
  if isinstance(value, bool) or number is None or number != int(number):
    raise ValueError(f"reference flag {name}={value!r} must be an integer.")
  return int(number)


def _as_float(name, value):
  try:
    if isinstance(value, bool):
      raise TypeError
    return float(value)
  except (TypeError, ValueError):
    raise ValueError(f"reference flag {name}={value!r} must be a number.") from None


def _check_finite(params):
  """ValueError naming the tensors (and how many values) that hold NaN/Inf."""
  bad = [(jax.tree_util.keystr(path), int(np.size(a) - np.isfinite(a).sum()))
         for path, a in jax.tree.flatten_with_path(params)[0] if not np.isfinite(a).all()]
  if bad:
    listed = ", ".join(f"{name} ({count} values)" for name, count in bad[:5])
    raise ValueError(f"the checkpoint holds NaN/Inf in {len(bad)} tensor(s): {listed}"
                     + (" ..." if len(bad) > 5 else "") + "; it would sample black images. Convert a checkpoint "
                     "from before the run diverged.")


def config_from_reference_flags(flags):
  """The project config (config_base.get_config() with the model and diffusion sections filled) for the
  reference's command-line flags `flags` (its own names and values; missing ones at its defaults)."""
  unknown = sorted(set(flags) - set(REFERENCE_FLAG_DEFAULTS) - set(PROJECT_FLAGS))
  if unknown:
    raise ValueError(f"unknown reference flags {unknown}; known: {sorted(REFERENCE_FLAG_DEFAULTS)}, and "
                     f"{', '.join(PROJECT_FLAGS)} (1000 for guided-diffusion's class-conditional models).")
  f = {**REFERENCE_FLAG_DEFAULTS, **flags}
  config = config_base.get_config()
  m = config.model
  m.image_size = _as_int("image_size", f["image_size"])
  m.in_channels = 3
  m.model_channels = _as_int("num_channels", f["num_channels"])
  m.num_res_blocks = _as_int("num_res_blocks", f["num_res_blocks"])
  m.channel_mult = _as_tuple("channel_mult", f["channel_mult"], _as_number)
  m.attention_resolutions = _as_tuple("attention_resolutions", f["attention_resolutions"], int)
  m.num_heads = _as_int("num_heads", f["num_heads"])
  m.num_head_channels = _as_int("num_head_channels", f["num_head_channels"])
  m.num_heads_upsample = _as_int("num_heads_upsample", f["num_heads_upsample"])
  m.dropout = _as_float("dropout", f["dropout"])
  class_cond = _as_bool("class_cond", f["class_cond"])
  if "num_classes" in f and not class_cond:
    raise ValueError(f"num_classes={f['num_classes']!r} is given but class_cond is false; set \"class_cond\": true.")
  m.num_classes = _as_int("num_classes", f.get("num_classes", DDPM_IP_CLASSES)) if class_cond else 0
  if class_cond and m.num_classes < 1:
    raise ValueError(f"num_classes={m.num_classes} must be positive for a class-conditional model.")
  m.learn_sigma = _as_bool("learn_sigma", f["learn_sigma"])
  m.use_scale_shift_norm = _as_bool("use_scale_shift_norm", f["use_scale_shift_norm"])
  m.resblock_updown = _as_bool("resblock_updown", f["resblock_updown"])
  m.use_new_attention_order = _as_bool("use_new_attention_order", f["use_new_attention_order"])
  m.dtype = "float16" if _as_bool("use_fp16", f["use_fp16"]) else "float32"
  _as_bool("use_checkpoint", f["use_checkpoint"])  # validated; no effect on the numbers

  d = config.diffusion
  d.steps = _as_int("diffusion_steps", f["diffusion_steps"])
  d.noise_schedule = str(f["noise_schedule"])
  d.predict_xstart = _as_bool("predict_xstart", f["predict_xstart"])
  d.sigma_small = _as_bool("sigma_small", f["sigma_small"])
  d.rescale_timesteps = _as_bool("rescale_timesteps", f["rescale_timesteps"])
  d.input_perturbation = _as_float("input_pertub", f["input_pertub"])
  # Loss type from the flags (docs/method.md section 2).
  if _as_bool("use_kl", f["use_kl"]):
    d.loss_type = "rescaled_kl"
  elif _as_bool("rescale_learned_sigmas", f["rescale_learned_sigmas"]):
    d.loss_type = "rescaled_mse"
  else:
    d.loss_type = "mse"
  config.sampling.timestep_respacing = str(f["timestep_respacing"])
  create_model(config)  # validates the model section with a clear error
  return config


def _torch_name(path):
  """Flax params path (tuple of names) -> state_dict name."""
  parts = []
  for p in path[:-1]:
    match = _INDEXED.match(p)
    parts.append(f"{match.group(1)}.{match.group(2).replace('_', '.')}" if match else p)
  leaf = path[-1]
  parts.append("bias" if leaf == "bias" else "weight")
  return ".".join(parts)


def _kind(path, ndim):
  leaf = path[-1]
  if leaf == "kernel":
    if ndim == 4:
      return "conv2d"
    return "conv1d" if path[-2] in _CONV1D else "linear"
  return "plain"  # GroupNorm scale/bias, biases, the label embedding


def _torch_shape(kind, shape):
  if kind == "conv2d":
    kh, kw, i, o = shape
    return (o, i, kh, kw)
  if kind == "conv1d":
    return (shape[1], shape[0], 1)
  if kind == "linear":
    return (shape[1], shape[0])
  return tuple(shape)


def _to_flax(kind, a):
  if kind == "conv2d":
    return a.transpose(2, 3, 1, 0)
  if kind == "conv1d":
    return a[:, :, 0].T
  if kind == "linear":
    return a.T
  return a


def _to_torch(kind, a):
  if kind == "conv2d":
    return a.transpose(3, 2, 0, 1)
  if kind == "conv1d":
    return a.T[:, :, None]
  if kind == "linear":
    return a.T
  return a


def _expected(config):
  """{state_dict name: (flax path, kind, torch shape)} for the model of `config`, without allocating."""
  shapes = abstract_params(create_model(config))
  table = {}
  for key_path, leaf in jax.tree.flatten_with_path(shapes)[0]:
    path = tuple(k.key for k in key_path)
    kind = _kind(path, len(leaf.shape))
    table[_torch_name(path)] = (path, kind, _torch_shape(kind, leaf.shape))
  return table


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def params_from_state_dict(state_dict, config):
  """Flax params (nested dict of float32 numpy arrays) from a PyTorch-layout {name: array}, checked
  strictly against the model of `config`; raises CheckpointMismatchError listing every problem."""
  expected = _expected(config)
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(expected))
  wrong = sorted(f"{k}: checkpoint {tuple(np.shape(state_dict[k]))}, model {expected[k][2]}"
                 for k in set(expected) & set(state_dict)
                 if tuple(np.shape(state_dict[k])) != expected[k][2])
  if missing or unexpected or wrong:
    lines = ["the checkpoint does not match the configured model (check the flags/config):"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
      if items:
        lines.append(f"  {len(items)} {title}: " + ", ".join(items))
    label = state_dict.get("label_emb.weight")
    if label is not None and config.model.num_classes != np.shape(label)[0]:
      lines.append(f"  the checkpoint is class-conditional with {np.shape(label)[0]} classes: give the flags "
                   f"\"class_cond\": true, \"num_classes\": {np.shape(label)[0]} (DDPM-IP's class_cond means 10, "
                   "guided-diffusion's 1000).")
    elif label is None and config.model.num_classes:
      lines.append("  the checkpoint is not class-conditional (no label_emb.weight): set \"class_cond\": false.")
    raise CheckpointMismatchError("\n".join(lines))
  params = {}
  for name, (path, kind, _) in expected.items():
    a = np.asarray(state_dict[name])
    if not np.issubdtype(a.dtype, np.floating):
      raise CheckpointMismatchError(f"{name} has dtype {a.dtype}, expected floating point weights.")
    _set(params, path, np.ascontiguousarray(_to_flax(kind, a.astype(np.float32))))
  return params


def load_reference_checkpoint(path, config):
  """Flax params (float32 numpy) of a reference `.pt` state_dict or the same weights as `.npz`."""
  state = state_dicts.read_state_dict(path, what="checkpoint")
  try:
    params = params_from_state_dict(state, config)
  except CheckpointMismatchError as e:
    raise CheckpointMismatchError(f"{path}: {e}") from None
  _check_finite(params)
  return params


def export_state_dict(params, config):
  """The inverse of `params_from_state_dict`: {state_dict name: float32 array in PyTorch layout}."""
  expected = _expected(config)
  out = {}
  for name, (path, kind, shape) in expected.items():
    try:
      a = np.asarray(_get(params, path), dtype=np.float32)
    except KeyError as e:
      raise CheckpointMismatchError(f"params lack {'/'.join(path)} (state_dict {name}).") from e
    out[name] = np.ascontiguousarray(_to_torch(kind, a))
    if out[name].shape != shape:
      raise CheckpointMismatchError(f"params {'/'.join(path)} has shape {a.shape}, the model wants "
                                    f"{name} {shape} in PyTorch layout.")
  n_params = len(jax.tree.leaves(params))
  if n_params != len(expected):
    raise CheckpointMismatchError(f"params have {n_params} arrays, the configured model {len(expected)}.")
  return out


def save_state_dict_npz(params, config, path):
  """Writes the PyTorch-layout state_dict of `params` to an `.npz` keyed by state_dict name."""
  fileio.save_npz(path, **export_state_dict(params, config))
