"""The ADM UNet of guided-diffusion / DDPM-IP in Flax linen (docs/method.md section 3), NHWC.

Submodules are named after the reference's PyTorch state_dict with "." replaced by "_"
(`input_blocks_4_1/qkv` holds `input_blocks.4.1.qkv.*`), so that `ddpm_ip_jax.convert` maps a
checkpoint name by name. Parameters are always float32. The compute dtype follows the reference's fp16
mode: convolutions and attention (its qkv/proj_out are Conv1d) run in `dtype`; GroupNorm, the softmax,
the small time-embedding linears and the output head run in float32; the output is float32.
"""
import math
from typing import Any, Optional, Sequence
import zlib

import flax.linen as nn
import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np

from ddpm_ip_jax.models import conv as conv_lib
from ddpm_ip_jax.models import dropout as dropout_lib
from ddpm_ip_jax.models import group_norm as group_norm_lib

# Default channel multipliers by image size when none is given (docs/method.md section 2).
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Rematerialisation of the res and attention blocks in the backward pass (model.remat): "" keeps every
# activation; "convs" keeps the blocks' convolution and matmul outputs and recomputes the norms, activations and
# dropout masks between them; "blocks" keeps only each block's inputs and recomputes the block.
REMAT_MODES = ("", "convs", "blocks")
NUM_GROUPS = group_norm_lib.NUM_GROUPS


class HostInit:
  """An initializer flax calls as usual (`init(key, shape, dtype)`, drawn by JAX) that can also draw on the host
  (`host(rng, shape)`, NumPy): `init_params` uses the host draws, which need no compilation.

  kind "uniform": U(-value, value); "normal": N(0, value^2); "constant": every entry `value`."""

  def __init__(self, kind, value):
    if kind not in ("uniform", "normal", "constant"):
      raise ValueError(f"unknown initializer kind {kind!r}")
    self.kind, self.value = kind, float(value)

  def __call__(self, key, shape, dtype=jnp.float32):
    if self.kind == "uniform":
      return jax.random.uniform(key, shape, dtype, -self.value, self.value)
    if self.kind == "normal":
      return self.value * jax.random.normal(key, shape, dtype)
    return jnp.full(shape, self.value, dtype)

  def host(self, rng, shape):
    if self.kind == "uniform":
      return rng.uniform(-self.value, self.value, shape).astype(np.float32)
    if self.kind == "normal":
      return (self.value * rng.standard_normal(shape)).astype(np.float32)
    return np.full(shape, self.value, np.float32)


ZEROS, ONES = HostInit("constant", 0.0), HostInit("constant", 1.0)


def _torch_uniform(fan_in):
  """PyTorch's default Conv/Linear initialiser: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (weights and biases)."""
  return HostInit("uniform", 1.0 / math.sqrt(fan_in))


def _conv(features, kernel_size, fan_in_channels, dtype, name, strides=1, zero=False):
  """A kxk conv with the reference's padding (k // 2 on every side, also when strided) and init."""
  pad = kernel_size // 2
  fan_in = fan_in_channels * kernel_size * kernel_size
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(strides, strides),
      padding=((pad, pad), (pad, pad)), dtype=dtype, param_dtype=jnp.float32,
      conv_general_dilated=conv_lib.conv_general_dilated,  # XLA's conv; on a CPU a faster filter gradient
      kernel_init=ZEROS if zero else _torch_uniform(fan_in),
      bias_init=ZEROS if zero else _torch_uniform(fan_in), name=name)


def _dense(features, fan_in, dtype, name, zero=False, cls=nn.Dense):
  return cls(
      features, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=ZEROS if zero else _torch_uniform(fan_in),
      bias_init=ZEROS if zero else _torch_uniform(fan_in), name=name)


class _TwoHalvesDense(nn.Dense):
  """`nn.Dense` with an even number of features whose output comes as its two halves [B, features / 2], each
  from its own product with the kernel's column half (the same params as `nn.Dense`: kernel [in, features], bias
  [features]). Slicing a [B, 2C] output instead leaves the slices to every elementwise loop that reads scale or
  shift, where their strided indexing keeps XLA:CPU from vectorising the loop (models/group_norm.py)."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    half = self.features // 2
    return tuple(jnp.dot(x, kernel[:, i * half:(i + 1) * half]) + bias[i * half:(i + 1) * half] for i in (0, 1))


def _group_norm(x, name):
  """GroupNorm(32 groups, eps 1e-5) computed in float32, cast back to x's dtype. Call inside a compact method."""
  y = group_norm_lib.GroupNorm(scale_init=ONES, bias_init=ZEROS, name=name)(x.astype(jnp.float32))
  return y.astype(x.dtype)


def _group_norm_silu(x, name, scale=None, shift=None):
  """SiLU(GroupNorm(x)), with ADM's scale-shift norm `GroupNorm(x) * (1 + scale) + shift` before the SiLU when
  scale and shift [B, C] are given. In float32 as one operation (group_norm.group_norm_silu); in a low-precision
  dtype as the reference runs it: GroupNorm in float32, cast back, the rest in that dtype."""
  if x.dtype == jnp.float32:
    return group_norm_lib.GroupNormSiLU(scale_init=ONES, bias_init=ZEROS, name=name)(x, scale, shift)
  h = _group_norm(x, name)
  if scale is not None:
    h = h * (1 + scale[:, None, None, :]) + shift[:, None, None, :]
  return nn.silu(h)


def timestep_embedding(t, dim, max_period=10000):
  """Sinusoidal embedding [B, dim] of integer steps t [B] (docs/method.md section 3): cos first, no rescaling."""
  half = dim // 2
  # Same float32 operation order as the reference: exp(-ln(P) * i / half).
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def _downsample_pool(x):
  """Average pool 2x2, stride 2: [B,H,W,C] -> [B,H/2,W/2,C]."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _upsample_nearest(x):
  """Nearest neighbour x2: [B,H,W,C] -> [B,2H,2W,C]."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _saved(x):
  """Marks a convolution or matmul output as kept by model.remat="convs"."""
  return ad_checkpoint.checkpoint_name(x, "conv")


_REMAT_POLICIES = {"convs": jax.checkpoint_policies.save_only_these_names("conv"), "blocks": None}


def _block_class(cls, remat):
  """`cls`, or `cls` rematerialised as `remat` says (REMAT_MODES); the parameters and their names are the same."""
  return nn.remat(cls, policy=_REMAT_POLICIES[remat]) if remat else cls


class Downsample(nn.Module):
  """Conv resampling down (res-block up/down off): strided 3x3 conv, [B,H,W,C] -> [B,H/2,W/2,C]."""
  dtype: Any

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    return _conv(c, 3, c, self.dtype, "op", strides=2)(x)


class Upsample(nn.Module):
  """Conv resampling up (res-block up/down off): nearest x2 then 3x3 conv, [B,H,W,C] -> [B,2H,2W,C]."""
  dtype: Any

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    return _conv(c, 3, c, self.dtype, "conv")(_upsample_nearest(x))


class ResBlock(nn.Module):
  """ADM residual block with time conditioning, optionally resampling ("up"/"down") on the way."""
  out_channels: int
  dropout: float
  use_scale_shift_norm: bool
  resample: Optional[str]  # None | "up" | "down"
  dtype: Any
  train: bool = False      # dropout on (an attribute, not an argument, so that nn.remat needs no static args)

  @nn.compact
  def __call__(self, x, emb):
    """x [B,H,W,Cin] in the compute dtype, emb [B,4C] float32 -> [B,H',W',out_channels]."""
    cin = x.shape[-1]
    h = _group_norm_silu(x, "in_layers_0")
    if self.resample is not None:
      resample = _upsample_nearest if self.resample == "up" else _downsample_pool
      h, x = resample(h), resample(x)
    h = _saved(_conv(self.out_channels, 3, cin, self.dtype, "in_layers_2")(h))
    # The reference keeps this Linear in float32 in its fp16 mode and casts the result.
    if self.use_scale_shift_norm:
      # scale is the first half of the Linear's 2C outputs, shift the second
      scale, shift = _dense(2 * self.out_channels, emb.shape[-1], jnp.float32, "emb_layers_1",
                            cls=_TwoHalvesDense)(nn.silu(emb))
      h = _group_norm_silu(h, "out_layers_0", scale.astype(h.dtype), shift.astype(h.dtype))
    else:
      emb_out = _dense(self.out_channels, emb.shape[-1], jnp.float32, "emb_layers_1")(nn.silu(emb))
      h = _group_norm_silu(h + emb_out.astype(h.dtype)[:, None, None, :], "out_layers_0")
    if self.dropout > 0:
      h = dropout_lib.Dropout(rate=self.dropout, deterministic=not self.train)(h)
    h = _saved(_conv(self.out_channels, 3, self.out_channels, self.dtype, "out_layers_3", zero=True)(h))
    if cin != self.out_channels:
      x = _saved(_conv(self.out_channels, 1, cin, self.dtype, "skip_connection")(x))
    return x + h


class AttentionBlock(nn.Module):
  """Self-attention over the H*W positions: x + proj_out(attention(qkv(GN(x))))."""
  num_heads: int
  use_new_attention_order: bool
  dtype: Any

  @nn.compact
  def __call__(self, x):
    """x [B,H,W,C] -> [B,H,W,C]."""
    b, height, width, c = x.shape
    heads, ch = self.num_heads, c // self.num_heads
    h = _group_norm(x, "norm").reshape(b, height * width, c)
    qkv = _saved(_dense(3 * c, c, self.dtype, "qkv")(h))  # [B, T, 3C], a Conv1d(C, 3C, 1) in the reference
    if self.use_new_attention_order:
      # q, k, v are the 1st/2nd/3rd C channels, each then split into heads.
      qkv = qkv.reshape(b, -1, 3, heads, ch).transpose(2, 0, 3, 1, 4)
    else:
      # Legacy: split into heads first, then each head's 3*ch channels into q, k, v.
      qkv = qkv.reshape(b, -1, heads, 3, ch).transpose(3, 0, 2, 1, 4)
    # [3, B, heads, T, ch]: heads ahead of positions, so that both products are plain batched matmuls (with the
    # heads between positions and channels XLA:CPU ran the forward pass 4x slower at T = 256: 35 -> 8.5 ms).
    q, k, v = qkv[0], qkv[1], qkv[2]
    scale = 1 / math.sqrt(math.sqrt(ch))  # ch^-1/4 on both q and k, as the reference
    weight = jnp.einsum("bhtc,bhsc->bhts", q * scale, k * scale)
    weight = jax.nn.softmax(weight.astype(jnp.float32), axis=-1).astype(v.dtype)
    a = jnp.einsum("bhts,bhsc->bhtc", weight, v)  # then [B, T, heads, ch]: channel index = head*ch + c
    a = a.transpose(0, 2, 1, 3).reshape(b, -1, c)
    out = _saved(_dense(c, c, self.dtype, "proj_out", zero=True)(a))
    return x + out.reshape(b, height, width, c)


def resolve_channel_mult(image_size, channel_mult):
  """The channel multipliers, the reference's default for the image size when none are given."""
  if channel_mult:
    return tuple(channel_mult)
  if image_size not in DEFAULT_CHANNEL_MULT:
    raise ValueError(f"model.channel_mult is empty and image size {image_size} has no default "
                     f"(defaults exist for {sorted(DEFAULT_CHANNEL_MULT)}); set model.channel_mult.")
  return DEFAULT_CHANNEL_MULT[image_size]


def _heads(channels, num_heads, num_head_channels):
  return channels // num_head_channels if num_head_channels != -1 else num_heads


class UNet(nn.Module):
  """ADM UNet (docs/method.md section 3). Fields are the reference model builder's arguments.

  attention_resolutions are resolutions (e.g. (16, 8)); r at image size S is the level with downsampling
  factor S // r. Call: apply({'params': p}, x [B,H,W,in] float, t [B] int, y [B] int or None,
  train=bool) -> [B,H,W,out_channels] float32. Dropout (train=True) needs the rng 'dropout'.
  """
  image_size: int
  in_channels: int = 3
  model_channels: int = 128
  out_channels: int = 3
  num_res_blocks: int = 2
  channel_mult: Sequence[float] = ()
  attention_resolutions: Sequence[int] = (16, 8)
  num_heads: int = 4
  num_head_channels: int = -1
  num_heads_upsample: int = -1
  dropout: float = 0.0
  num_classes: int = 0
  use_scale_shift_norm: bool = True
  resblock_updown: bool = False
  use_new_attention_order: bool = False
  dtype: str = "float32"
  remat: str = ""          # REMAT_MODES: memory for compute in the backward pass; the same numbers

  def __post_init__(self):
    check_model_args(self.image_size, self.in_channels, self.model_channels, self.out_channels,
                     self.num_res_blocks, self.channel_mult, self.attention_resolutions,
                     self.num_heads, self.num_head_channels, self.num_heads_upsample, self.dropout,
                     self.num_classes, self.dtype)
    if self.remat not in REMAT_MODES:
      raise ValueError(f"model.remat must be one of {REMAT_MODES}, got {self.remat!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, t, y=None, train=False):
    if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, self.in_channels):
      raise ValueError(f"UNet expects x of shape [B, {self.image_size}, {self.image_size}, "
                       f"{self.in_channels}] (NHWC), got {x.shape}.")
    if t.shape != (x.shape[0],):
      raise ValueError(f"UNet expects t of shape [{x.shape[0]}], got {t.shape}.")
    if self.num_classes > 0 and y is None:
      raise ValueError(f"This model is class-conditional ({self.num_classes} classes): pass labels y [B].")
    if self.num_classes == 0 and y is not None:
      raise ValueError("This model is unconditional (num_classes = 0) but labels y were given.")
    dtype = DTYPES[self.dtype]
    mc = self.model_channels
    mult = resolve_channel_mult(self.image_size, self.channel_mult)
    attention_ds = {self.image_size // r for r in self.attention_resolutions}
    heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample

    res_cls, attention_cls = _block_class(ResBlock, self.remat), _block_class(AttentionBlock, self.remat)

    def res_block(h, emb, out_ch, name, resample=None):
      return res_cls(out_ch, self.dropout, self.use_scale_shift_norm, resample, dtype, train=train, name=name)(
          h, emb)

    def attention(h, heads, name):
      return attention_cls(heads, self.use_new_attention_order, dtype, name=name)(h)

    ted = 4 * mc
    emb = timestep_embedding(t, mc)
    emb = _dense(ted, mc, jnp.float32, "time_embed_0")(emb)
    emb = _dense(ted, ted, jnp.float32, "time_embed_2")(nn.silu(emb))
    if self.num_classes > 0:
      if y.shape != (x.shape[0],):
        raise ValueError(f"UNet expects y of shape [{x.shape[0]}], got {y.shape}.")
      emb = emb + nn.Embed(self.num_classes, ted, embedding_init=HostInit("normal", 1.0),
                           name="label_emb")(y)

    # Encoder.
    ch = int(mult[0] * mc)
    h = _conv(ch, 3, self.in_channels, dtype, "input_blocks_0_0")(x.astype(dtype))
    hs = [h]
    ds, n = 1, 1
    for level, m in enumerate(mult):
      for _ in range(self.num_res_blocks):
        ch = int(m * mc)
        h = res_block(h, emb, ch, f"input_blocks_{n}_0")
        if ds in attention_ds:
          h = attention(h, _heads(ch, self.num_heads, self.num_head_channels), f"input_blocks_{n}_1")
        hs.append(h)
        n += 1
      if level != len(mult) - 1:
        if self.resblock_updown:
          h = res_block(h, emb, ch, f"input_blocks_{n}_0", resample="down")
        else:
          h = Downsample(dtype, name=f"input_blocks_{n}_0")(h)
        hs.append(h)
        n += 1
        ds *= 2

    # Middle.
    h = res_block(h, emb, ch, "middle_block_0")
    h = attention(h, _heads(ch, self.num_heads, self.num_head_channels), "middle_block_1")
    h = res_block(h, emb, ch, "middle_block_2")

    # Decoder: num_res_blocks + 1 blocks per level, each on [h, skip] concatenated along channels.
    n = 0
    for level, m in reversed(list(enumerate(mult))):
      for i in range(self.num_res_blocks + 1):
        ch = int(m * mc)
        h = res_block(jnp.concatenate([h, hs.pop()], axis=-1), emb, ch, f"output_blocks_{n}_0")
        k = 1
        if ds in attention_ds:
          h = attention(h, _heads(ch, heads_up, self.num_head_channels), f"output_blocks_{n}_1")
          k = 2
        if level and i == self.num_res_blocks:
          if self.resblock_updown:
            h = res_block(h, emb, ch, f"output_blocks_{n}_{k}", resample="up")
          else:
            h = Upsample(dtype, name=f"output_blocks_{n}_{k}")(h)
          ds //= 2
        n += 1

    # Output head in float32, as the reference.
    h = _group_norm_silu(h.astype(jnp.float32), "out_0")
    return _conv(self.out_channels, 3, ch, jnp.float32, "out_2", zero=True)(h)


def check_model_args(image_size, in_channels, model_channels, out_channels, num_res_blocks,
                     channel_mult, attention_resolutions, num_heads, num_head_channels,
                     num_heads_upsample, dropout, num_classes, dtype):
  """Raises ValueError with a clear message for a model configuration the UNet cannot build."""
  for name, value, low in (("image_size", image_size, 1), ("in_channels", in_channels, 1),
                           ("model_channels", model_channels, 1), ("out_channels", out_channels, 1),
                           ("num_res_blocks", num_res_blocks, 0), ("num_classes", num_classes, 0)):
    if int(value) != value or value < low:
      raise ValueError(f"model.{name} must be an integer >= {low}, got {value!r}.")
  if dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"model.dropout must be in [0, 1), got {dropout}.")
  mult = resolve_channel_mult(image_size, channel_mult)
  levels = len(mult)
  if image_size % 2 ** (levels - 1):
    raise ValueError(f"model.image_size {image_size} is not divisible by 2**{levels - 1} "
                     f"(the {levels} levels of channel_mult {mult}).")
  for m in mult:
    ch = int(m * model_channels)
    if m <= 0 or ch % NUM_GROUPS:
      raise ValueError(f"channel multiplier {m} x model_channels {model_channels} = {ch} channels is not "
                       f"a positive multiple of the {NUM_GROUPS} GroupNorm groups: use a multiple of {NUM_GROUPS}.")
  factors = {2 ** level: int(mult[level] * model_channels) for level in range(levels)}
  attention_channels = []
  for r in attention_resolutions:
    if r <= 0 or image_size % r or image_size // r not in factors:
      raise ValueError(f"attention resolution {r} is not reached by image size {image_size} with "
                       f"{levels} levels (reachable: {sorted(image_size // f for f in factors)}).")
    attention_channels.append(factors[image_size // r])
  # The middle block always has attention, at the last level's channels.
  attention_channels.append(factors[2 ** (levels - 1)])
  if num_head_channels != -1:
    if num_head_channels <= 0:
      raise ValueError(f"model.num_head_channels must be -1 or positive, got {num_head_channels}.")
    for ch in attention_channels:
      if ch % num_head_channels:
        raise ValueError(f"attention channels {ch} are not divisible by num_head_channels "
                         f"{num_head_channels}.")
  else:
    heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
    for name, heads in (("num_heads", num_heads), ("num_heads_upsample", heads_up)):
      if heads <= 0:
        raise ValueError(f"model.{name} must be positive, got {heads}.")
      for ch in attention_channels:
        if ch % heads:
          raise ValueError(f"attention channels {ch} are not divisible by {name} {heads}.")


def model_section(config):
  """The model section of a project config, or the config itself when it is already that section."""
  return config.model if "model" in config else config


def create_model(config):
  """The UNet for `config.model` (or a ConfigDict that is the model section); validated here."""
  m = model_section(config)
  return UNet(
      image_size=int(m.image_size),
      in_channels=int(m.in_channels),
      model_channels=int(m.model_channels),
      out_channels=int(m.in_channels) * (2 if m.learn_sigma else 1),
      num_res_blocks=int(m.num_res_blocks),
      channel_mult=tuple(m.channel_mult),
      attention_resolutions=tuple(int(r) for r in m.attention_resolutions),
      num_heads=int(m.num_heads),
      num_head_channels=int(m.num_head_channels),
      num_heads_upsample=int(m.num_heads_upsample),
      dropout=float(m.dropout),
      num_classes=int(m.num_classes),
      use_scale_shift_norm=bool(m.use_scale_shift_norm),
      resblock_updown=bool(m.resblock_updown),
      use_new_attention_order=bool(m.use_new_attention_order),
      dtype=str(m.dtype),
      remat=str(m.get("remat", "")),
  )


def _dummy_inputs(model, batch_size=1):
  x = jnp.zeros((batch_size, model.image_size, model.image_size, model.in_channels), jnp.float32)
  t = jnp.zeros((batch_size,), jnp.int32)
  y = jnp.zeros((batch_size,), jnp.int32) if model.num_classes > 0 else None
  return x, t, y


_INIT_FIELDS = {"kernel_init": "kernel", "bias_init": "bias", "scale_init": "scale", "embedding_init": "embedding"}


def _key_words(key):
  """The uint32 words of a JAX key (typed or raw)."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return [int(w) for w in np.asarray(key).reshape(-1)]


def init_params(model, key):
  """Freshly initialised float32 params of `model` (the reference's initialisation: PyTorch's default uniform,
  zeros where it zeroes, ones/zeros for the norms, N(0, 1) label embeddings).

  Drawn on the host, without compiling `model.init` (tens of seconds on a CPU for the paper networks): the
  parameter shapes come from tracing the init abstractly, each parameter's initializer from its module (every
  parameter of the UNet has a `HostInit`), and each parameter is drawn by NumPy from (key, its path), so the
  same key gives the same parameters on every platform and device count."""
  x, t, y = _dummy_inputs(model)
  found = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      for field, name in _INIT_FIELDS.items():
        init = getattr(context.module, field, None)
        if init is not None:
          found[(*context.module.path, name)] = init
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, t, y))["params"]
  words = _key_words(key)

  def draw(path, shape):
    names = tuple(getattr(p, "key", str(p)) for p in path)
    init = found.get(names)
    if not isinstance(init, HostInit):
      raise ValueError(f"parameter {'/'.join(names)} has no HostInit initializer; init_params draws every "
                       "parameter on the host (give its module one)")
    rng = np.random.default_rng([*words, zlib.crc32("/".join(names).encode())])
    return jax.device_put(init.host(rng, shape.shape))  # (jnp.asarray compiles a copy per shape: 0.4 s a start)

  return jax.tree.map_with_path(draw, shapes)


def abstract_params(model):
  """The params tree of `model` as jax.ShapeDtypeStruct leaves, without allocating anything."""
  x, t, y = _dummy_inputs(model)
  return jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, t, y))["params"]


def count_params(params):
  """Number of scalars in a params tree (arrays or ShapeDtypeStructs)."""
  return int(sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)))
