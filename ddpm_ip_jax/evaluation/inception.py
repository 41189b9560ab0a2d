"""The FID InceptionV3 in Flax linen, NHWC: the network of pytorch-fid (`FIDInceptionA/C/E_1/E_2`),
which is the TensorFlow "2015-12-05" graph of the OpenAI evaluator (docs/method.md section 5).

  params = load_inception_params("pt_inception-2015-12-05-6726825d.pth")   # or the converted .npz
  out = InceptionV3().apply({"params": params}, images_uint8_nhwc)
  out["pool"]     [B, 2048]  pool_3 features (FID, precision/recall)
  out["logits"]   [B, 1008]  pool_3 @ fc.weight, no bias: the OpenAI evaluator's IS softmax input
  out["spatial"]  [B, 2023]  the first 7 channels of TF `mixed_6/conv` (= Mixed_6d.branch1x1 after its ReLU),
                             17x17x7 flattened in (h, w, c) order as the OpenAI evaluator does (sFID)

The weights are never downloaded: the user supplies pytorch-fid's state_dict (see `WEIGHTS_HELP`).
Every BatchNorm (eps 0.001, inference mode) is folded into the preceding bias-free conv at load time, so
the Flax params are conv {kernel (kh,kw,I,O), bias (O,)} named after the state_dict modules
(`Mixed_5b/branch1x1` holds `Mixed_5b.branch1x1.conv.weight` and `Mixed_5b.branch1x1.bn.*`).
The quirks of the FID variant against torchvision's Inception: the average pools of the A, C and first E
block exclude the padding from the count (count_include_pad=False) and the last E block max-pools.
"""
import pathlib
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_ip_jax import state_dicts

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_HELP = (
    f"ddpm-ip-jax never downloads the FID Inception weights. Download {WEIGHTS_FILE} (pytorch-fid's "
    f"weights, md5 prefix 6726825d) yourself from {WEIGHTS_URL}, put it anywhere (e.g. "
    f"~/.cache/ddpm_ip_jax/{WEIGHTS_FILE}) and pass that path as the Inception weights path of the "
    "evaluation (`inception_extractor(path)` / the evaluation command's weights flag). Without torch, "
    "convert it once where torch is installed: python -m ddpm_ip_jax.evaluation.convert_inception "
    f"--input={WEIGHTS_FILE} --output=inception_fid.npz, and pass the .npz instead.")
BN_EPS = 1e-3
NUM_CLASSES = 1008  # the TF graph's 1008-way softmax (1000 ImageNet classes + 8 unused)
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # sFID keeps the first 7 of the 192 channels of mixed_6/conv (17x17x7 = 2023 dims)


class InceptionWeightsError(ValueError):
  """An Inception weights file that does not fit the FID network: missing, unexpected or misshaped keys."""


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


class _Blocks(nn.Module):
  """Base of the Inception blocks: `conv` is BasicConv2d (conv + folded BatchNorm + ReLU)."""
  precision: Optional[str] = "highest"

  def conv(self, x, features, kernel, name, strides=1, padding=0):
    return _basic_conv(x, features, kernel, name, self.precision, strides, padding)


def _basic_conv(x, features, kernel, name, precision, strides=1, padding=0):
  """pytorch-fid's BasicConv2d with the BatchNorm folded in: ReLU(conv(x) + bias). Call inside a
  compact method (the conv becomes a submodule `name` of the caller)."""
  ph, pw = _pair(padding)
  y = nn.Conv(features, _pair(kernel), strides=_pair(strides), padding=((ph, ph), (pw, pw)),
              precision=precision, name=name)(x)
  return nn.relu(y)


def _avg_pool_3x3(x):
  """3x3, stride 1, pad 1, padding excluded from the count (the FID blocks' quirk)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(_Blocks):
  """35x35 block (Mixed_5b/c/d): 64 + 64 + 96 + pool_features channels."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv(x, 64, 1, "branch1x1")
    b5 = self.conv(self.conv(x, 48, 1, "branch5x5_1"), 64, 5, "branch5x5_2", padding=2)
    b3 = self.conv(x, 64, 1, "branch3x3dbl_1")
    b3 = self.conv(b3, 96, 3, "branch3x3dbl_2", padding=1)
    b3 = self.conv(b3, 96, 3, "branch3x3dbl_3", padding=1)
    bp = self.conv(_avg_pool_3x3(x), self.pool_features, 1, "branch_pool")
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Blocks):
  """35x35 -> 17x17 reduction (Mixed_6a): 384 + 96 + input channels."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv(x, 384, 3, "branch3x3", strides=2)
    bd = self.conv(x, 64, 1, "branch3x3dbl_1")
    bd = self.conv(bd, 96, 3, "branch3x3dbl_2", padding=1)
    bd = self.conv(bd, 96, 3, "branch3x3dbl_3", strides=2)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(_Blocks):
  """17x17 block (Mixed_6b..e) with factorised 7x7 convs: 4 x 192 channels. Returns (out, branch1x1)."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = self.conv(x, 192, 1, "branch1x1")
    b7 = self.conv(x, c7, 1, "branch7x7_1")
    b7 = self.conv(b7, c7, (1, 7), "branch7x7_2", padding=(0, 3))
    b7 = self.conv(b7, 192, (7, 1), "branch7x7_3", padding=(3, 0))
    bd = self.conv(x, c7, 1, "branch7x7dbl_1")
    bd = self.conv(bd, c7, (7, 1), "branch7x7dbl_2", padding=(3, 0))
    bd = self.conv(bd, c7, (1, 7), "branch7x7dbl_3", padding=(0, 3))
    bd = self.conv(bd, c7, (7, 1), "branch7x7dbl_4", padding=(3, 0))
    bd = self.conv(bd, 192, (1, 7), "branch7x7dbl_5", padding=(0, 3))
    bp = self.conv(_avg_pool_3x3(x), 192, 1, "branch_pool")
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(_Blocks):
  """17x17 -> 8x8 reduction (Mixed_7a): 320 + 192 + input channels."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv(self.conv(x, 192, 1, "branch3x3_1"), 320, 3, "branch3x3_2", strides=2)
    b7 = self.conv(x, 192, 1, "branch7x7x3_1")
    b7 = self.conv(b7, 192, (1, 7), "branch7x7x3_2", padding=(0, 3))
    b7 = self.conv(b7, 192, (7, 1), "branch7x7x3_3", padding=(3, 0))
    b7 = self.conv(b7, 192, 3, "branch7x7x3_4", strides=2)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(_Blocks):
  """8x8 block (Mixed_7b: average pool without padding in the count; Mixed_7c: max pool): 2048 channels."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = self.conv(x, 320, 1, "branch1x1")
    b3 = self.conv(x, 384, 1, "branch3x3_1")
    b3 = jnp.concatenate([self.conv(b3, 384, (1, 3), "branch3x3_2a", padding=(0, 1)),
                          self.conv(b3, 384, (3, 1), "branch3x3_2b", padding=(1, 0))], axis=-1)
    bd = self.conv(x, 448, 1, "branch3x3dbl_1")
    bd = self.conv(bd, 384, 3, "branch3x3dbl_2", padding=1)
    bd = jnp.concatenate([self.conv(bd, 384, (1, 3), "branch3x3dbl_3a", padding=(0, 1)),
                          self.conv(bd, 384, (3, 1), "branch3x3dbl_3b", padding=(1, 0))], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = self.conv(pooled, 192, 1, "branch_pool")
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(images):
  """uint8 [B,H,W,3] in [0, 255] or float [B,H,W,3] in [-1, 1] -> float32 [B,299,299,3] in [-1, 1].

  As pytorch-fid: bilinear resize with half-pixel centres and no antialiasing (F.interpolate,
  align_corners=False), then 2x - 1 on [0, 1] values (the order does not matter: the resize is affine).
  """
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) * (2.0 / 255.0) - 1.0
  else:
    x = images.astype(jnp.float32)
  b, h, w, c = x.shape
  if (h, w) != (INPUT_SIZE, INPUT_SIZE):
    x = jax.image.resize(x, (b, INPUT_SIZE, INPUT_SIZE, c), method="linear", antialias=False)
  return x


class InceptionV3(nn.Module):
  """The FID InceptionV3: images [B,H,W,3] (uint8 or [-1,1] floats, any size) -> dict of features.

  `precision` is that of every conv/matmul: "highest" keeps float32 on GPUs (no TF32), as the TF graph.
  """
  precision: Optional[str] = "highest"

  @nn.compact
  def __call__(self, images):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"InceptionV3 wants NHWC RGB images [B,H,W,3], got shape {images.shape}.")
    x = preprocess(images)                                       # [B,299,299,3]
    p = self.precision
    conv = lambda y, f, k, name, **kw: _basic_conv(y, f, k, name, p, **kw)  # noqa: E731
    x = conv(x, 32, 3, "Conv2d_1a_3x3", strides=2)             # [B,149,149,32]
    x = conv(x, 32, 3, "Conv2d_2a_3x3")                        # [B,147,147,32]
    x = conv(x, 64, 3, "Conv2d_2b_3x3", padding=1)             # [B,147,147,64]
    x = nn.max_pool(x, (3, 3), strides=(2, 2))                 # [B,73,73,64]
    x = conv(x, 80, 1, "Conv2d_3b_1x1")                        # [B,73,73,80]
    x = conv(x, 192, 3, "Conv2d_4a_3x3")                       # [B,71,71,192]
    x = nn.max_pool(x, (3, 3), strides=(2, 2))                 # [B,35,35,192]
    x = InceptionA(precision=p, pool_features=32, name="Mixed_5b")(x)   # [B,35,35,256]
    x = InceptionA(precision=p, pool_features=64, name="Mixed_5c")(x)   # [B,35,35,288]
    x = InceptionA(precision=p, pool_features=64, name="Mixed_5d")(x)   # [B,35,35,288]
    x = InceptionB(precision=p, name="Mixed_6a")(x)                      # [B,17,17,768]
    x, _ = InceptionC(precision=p, channels_7x7=128, name="Mixed_6b")(x)
    x, _ = InceptionC(precision=p, channels_7x7=160, name="Mixed_6c")(x)
    x, mixed_6_conv = InceptionC(precision=p, channels_7x7=160, name="Mixed_6d")(x)  # TF mixed_6
    x, _ = InceptionC(precision=p, channels_7x7=192, name="Mixed_6e")(x)  # [B,17,17,768]
    x = InceptionD(precision=p, name="Mixed_7a")(x)                      # [B,8,8,1280]
    x = InceptionE(precision=p, max_pool=False, name="Mixed_7b")(x)      # [B,8,8,2048]
    x = InceptionE(precision=p, max_pool=True, name="Mixed_7c")(x)       # [B,8,8,2048]
    pool = jnp.mean(x, axis=(1, 2))                                      # [B,2048] pool_3
    logits = nn.Dense(NUM_CLASSES, use_bias=False, precision=p, name="fc")(pool)
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)  # [B,2023]
    return {"pool": pool, "logits": logits, "spatial": spatial}


def abstract_params(model=None):
  """The Flax params tree of the FID InceptionV3 as ShapeDtypeStructs (no allocation, no compute)."""
  model = model or InceptionV3()
  images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)["params"]


def _conv_paths(params):
  """[(flax path of a folded conv, its kernel shape (kh,kw,I,O))] in a fixed order."""
  out = []
  for key_path, leaf in jax.tree.flatten_with_path(params)[0]:
    path = tuple(k.key for k in key_path)
    if path[-1] == "kernel" and path[0] != "fc":
      out.append((path[:-1], tuple(leaf.shape)))
  return out


def state_dict_shapes():
  """{pytorch-fid state_dict name: shape} of the FID network (without the optional
  `*.bn.num_batches_tracked` counters, which are accepted and ignored)."""
  params = abstract_params()
  table = {}
  for path, (kh, kw, i, o) in _conv_paths(params):
    prefix = ".".join(path)
    table[f"{prefix}.conv.weight"] = (o, i, kh, kw)
    for stat in ("weight", "bias", "running_mean", "running_var"):
      table[f"{prefix}.bn.{stat}"] = (o,)
  d, k = params["fc"]["kernel"].shape
  table["fc.weight"] = (k, d)
  table["fc.bias"] = (k,)
  return table


def _listed(items, most=5):
  """The first `most` of `items`, comma-separated, and how many more."""
  more = f", ... ({len(items) - most} more)" if len(items) > most else ""
  return ", ".join(items[:most]) + more


def check_state_dict(state_dict, source=""):
  """Raises InceptionWeightsError, in one line naming the file `source`, for missing, unexpected or misshaped
  keys (strict, as the UNet import; the first few of each kind): a file of another network fails here, not with
  wrong features later."""
  expected = state_dict_shapes()
  optional = {k for k in state_dict if k.endswith(".bn.num_batches_tracked")
              and f"{k[:-len('num_batches_tracked')]}running_mean" in expected}
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(expected) - optional)
  wrong = sorted(f"{k}: file {tuple(np.shape(state_dict[k]))}, network {expected[k]}"
                 for k in set(expected) & set(state_dict)
                 if tuple(np.shape(state_dict[k])) != expected[k])
  bad_dtype = sorted(k for k in set(expected) & set(state_dict)
                     if not np.issubdtype(np.asarray(state_dict[k]).dtype, np.floating))
  if missing or unexpected or wrong or bad_dtype:
    found = [f"{len(items)} {title}: {_listed(items)}" for title, items in
             (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
              ("not floating point", bad_dtype)) if items]
    raise InceptionWeightsError(f"the Inception weights {source + ' ' if source else ''}do not match the FID "
                                f"InceptionV3 (expected pytorch-fid's {WEIGHTS_FILE} or an .npz converted from it): "
                                + "; ".join(found) + ".")


def params_from_state_dict(state_dict):
  """Flax params (float32 numpy) from pytorch-fid's state_dict {name: array}: strict key check, then each
  BatchNorm folded into its conv in float64: k = W * g / sqrt(v + 0.001), b = beta - m * g / sqrt(v + 0.001).
  fc.bias is checked but not used: the Inception Score takes the unbiased logits (module docstring)."""
  check_state_dict(state_dict)
  get = lambda name: np.asarray(state_dict[name], dtype=np.float64)  # noqa: E731
  params = {}
  for path, _ in _conv_paths(abstract_params()):
    prefix = ".".join(path)
    scale = get(f"{prefix}.bn.weight") / np.sqrt(get(f"{prefix}.bn.running_var") + BN_EPS)
    kernel = get(f"{prefix}.conv.weight") * scale[:, None, None, None]     # (O,I,kh,kw)
    bias = get(f"{prefix}.bn.bias") - get(f"{prefix}.bn.running_mean") * scale
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = {"kernel": np.ascontiguousarray(kernel.transpose(2, 3, 1, 0), dtype=np.float32),
                      "bias": bias.astype(np.float32)}
  params["fc"] = {"kernel": np.ascontiguousarray(get("fc.weight").T, dtype=np.float32)}
  return params


def read_state_dict(path):
  """{name: array} from pytorch-fid's `.pth` (needs torch) or an `.npz` keyed by state_dict name."""
  return state_dicts.read_state_dict(path, what="Inception weights", help_text=WEIGHTS_HELP)


def load_inception_params(path):
  """Folded Flax params of the FID InceptionV3 from the user-supplied weights file (.pth or .npz), checked
  (`read_state_dict`, `check_state_dict`): errors name the file."""
  state = read_state_dict(path)
  check_state_dict(state, str(path))
  return params_from_state_dict(state)


def save_weights_npz(input_path, output_path):
  """Reads `input_path` (.pth or .npz), checks it, writes float32 arrays to `output_path` (.npz)."""
  state = read_state_dict(input_path)
  check_state_dict(state, str(input_path))
  arrays = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()
            if not k.endswith("num_batches_tracked")}
  output_path = pathlib.Path(output_path)
  if output_path.suffix != ".npz":
    raise ValueError(f"--output must end in .npz, got {output_path}.")
  output_path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(output_path, **arrays)
  return arrays
