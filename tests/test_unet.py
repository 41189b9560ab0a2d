"""The ADM UNet: paper parameter counts, the options of the reference model builder, validation."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddpm_ip_jax import config_base
from helpers import jitted_apply, load_config
from ddpm_ip_jax import reference_checkpoints
from ddpm_ip_jax.models import (abstract_params, count_params, create_model, init_params,
                                timestep_embedding)
from ddpm_ip_jax.models.unet import AttentionBlock


@pytest.mark.parametrize("name, expected", [
    ("cifar10", 57_094_662), ("imagenet32", 57_094_662), ("lsun_tower64", 295_136_454),
    ("celeba64", 295_136_454), ("ffhq128", 542_811_398)])
def test_paper_parameter_counts(name, expected):
  """docs/method.md section 2, counted from shapes only (jax.eval_shape allocates nothing)."""
  shapes = abstract_params(create_model(load_config(name)))
  assert all(isinstance(s, jax.ShapeDtypeStruct) and s.dtype == jnp.float32
             for s in jax.tree_util.tree_leaves(shapes))
  assert count_params(shapes) == expected


def tiny_model_config(**overrides):
  """An 8x8 two-level UNet with attention at resolution 4 (the second level) and in the middle."""
  m = config_base.get_config().model
  m.image_size = 8
  m.model_channels = 32
  m.channel_mult = (1, 2)
  m.num_res_blocks = 1
  m.attention_resolutions = (4,)
  m.num_heads = 2
  m.learn_sigma = True
  for k, v in overrides.items():
    m[k] = v
  return m


def random_params(model, seed=0, scale=0.2):
  """Params with every array random (zero-initialised layers included), so every weight matters."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), abstract_params(model))


def run(model, params, x, t, y=None, **kwargs):
  """A jitted forward pass, compiled once per model (faster than op-by-op dispatch on CPU)."""
  return jitted_apply(model)({"params": params}, x, t, y, **kwargs)


def inputs(batch=3, size=8, seed=1):
  x = jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)
  t = jnp.array([0, 17, 999][:batch], jnp.int32)
  return x, t


def test_timestep_embedding_is_cos_first_on_integer_steps():
  t = np.array([0, 1, 500, 999])
  half = 16
  freqs = np.exp(-math.log(10000) * np.arange(half) / half)
  args = t[:, None] * freqs[None]
  expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
  got = np.asarray(timestep_embedding(jnp.asarray(t), 32))
  np.testing.assert_allclose(got, expected, atol=2e-4)
  np.testing.assert_array_equal(got[0], np.r_[np.ones(half), np.zeros(half)])


def test_fresh_init_is_float32_torch_like_and_zero_where_the_reference_zeroes():
  # One level (compiling the init's random draws is slow on CPU).
  m = create_model(tiny_model_config(channel_mult=(1,), attention_resolutions=(8,)))
  params = init_params(m, jax.random.key(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  for zeroed in (params["out_2"], params["input_blocks_1_0"]["out_layers_3"],
                 params["input_blocks_1_1"]["proj_out"], params["middle_block_1"]["proj_out"]):
    assert not np.any(zeroed["kernel"]) and not np.any(zeroed["bias"])
  # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 32 channels * 3 * 3.
  kernel = np.asarray(params["input_blocks_1_0"]["in_layers_2"]["kernel"])
  bound = 1 / math.sqrt(32 * 9)
  assert 0.95 * bound < np.abs(kernel).max() <= bound
  np.testing.assert_array_equal(params["input_blocks_1_0"]["in_layers_0"]["scale"], np.ones(32))
  x, t = inputs()
  out = run(m, params, x, t)
  assert out.shape == (3, 8, 8, 6) and out.dtype == jnp.float32
  assert not np.any(np.asarray(out))  # the output conv starts at zero


def numpy_attention(x, params, heads, new_order):
  """Direct numpy transcription of the reference's AttentionBlock on x [B,H,W,C] (float64)."""
  b, hh, ww, c = x.shape
  ch = c // heads
  xs = x.reshape(b, hh * ww, c).astype(np.float64)
  g = xs.reshape(b, -1, 32, c // 32)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = g.var(axis=(1, 3), keepdims=True)
  n = ((g - mean) / np.sqrt(var + 1e-5)).reshape(b, -1, c)
  n = n * params["norm"]["scale"] + params["norm"]["bias"]
  qkv = n @ params["qkv"]["kernel"] + params["qkv"]["bias"]  # [B, T, 3C]
  out = np.zeros_like(xs)
  for i in range(heads):
    if new_order:
      q, k, v = (qkv[:, :, j * c + i * ch: j * c + (i + 1) * ch] for j in range(3))
    else:
      q, k, v = (qkv[:, :, i * 3 * ch + j * ch: i * 3 * ch + (j + 1) * ch] for j in range(3))
    w = np.einsum("btc,bsc->bts", q, k) / math.sqrt(ch)
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out[:, :, i * ch:(i + 1) * ch] = np.einsum("bts,bsc->btc", w, v)
  out = out @ params["proj_out"]["kernel"] + params["proj_out"]["bias"]
  return (xs + out).reshape(b, hh, ww, c)


@pytest.mark.parametrize("new_order", [True, False])
def test_attention_block_matches_numpy(new_order):
  block = AttentionBlock(num_heads=4, use_new_attention_order=new_order, dtype=jnp.float32)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 64))
  shapes = jax.eval_shape(block.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(3)
  params = jax.tree_util.tree_map(
      lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  got = jax.jit(block.apply)({"params": params}, x)
  np_params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  expected = numpy_attention(np.asarray(x), np_params, 4, new_order)
  np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5)


def _legacy_qkv_permutation(c, heads):
  """perm with legacy_column[j] = new_column[perm[j]] (same q/k/v/head/channel for both orders)."""
  ch = c // heads
  return np.array([part * c + h * ch + i for h in range(heads) for part in range(3) for i in range(ch)])


def test_legacy_attention_order_is_a_channel_permutation_of_the_new_order():
  """Same weights: different outputs; qkv columns permuted to the legacy layout: same output."""
  new = create_model(tiny_model_config(use_new_attention_order=True))
  legacy = create_model(tiny_model_config(use_new_attention_order=False))
  params = random_params(new)
  x, t = inputs()
  out_new = np.asarray(run(new, params, x, t))
  out_legacy = np.asarray(run(legacy, params, x, t))
  assert np.abs(out_new - out_legacy).max() > 1e-3

  permuted = jax.tree_util.tree_map(lambda a: a, params)
  for block in ("input_blocks_3_1", "middle_block_1", "output_blocks_0_1", "output_blocks_1_1"):
    qkv = params[block]["qkv"]
    perm = _legacy_qkv_permutation(qkv["kernel"].shape[0], 2)
    permuted[block] = dict(params[block], qkv={"kernel": qkv["kernel"][:, perm],
                                               "bias": qkv["bias"][perm]})
  out_permuted = np.asarray(run(legacy, permuted, x, t))
  np.testing.assert_allclose(out_permuted, out_new, atol=1e-5)


def test_class_conditioning():
  model = create_model(tiny_model_config(num_classes=3))
  params = random_params(model)
  assert params["label_emb"]["embedding"].shape == (3, 128)
  x, t = inputs()
  out0 = run(model, params, x, t, jnp.array([0, 0, 0]))
  out1 = run(model, params, x, t, jnp.array([1, 1, 1]))
  out_mixed = run(model, params, x, t, jnp.array([0, 1, 0]))
  assert np.abs(np.asarray(out0 - out1)).max() > 1e-3
  np.testing.assert_allclose(out_mixed[0], out0[0], atol=1e-6)
  np.testing.assert_allclose(out_mixed[1], out1[1], atol=1e-6)
  with pytest.raises(ValueError, match="class-conditional"):
    run(model, params, x, t)
  unconditional = create_model(tiny_model_config())
  with pytest.raises(ValueError, match="unconditional"):
    run(unconditional, random_params(unconditional), x, t, jnp.array([0, 0, 0]))


def test_dropout_only_in_training():
  model = create_model(tiny_model_config(dropout=0.3))
  no_dropout = create_model(tiny_model_config(dropout=0.0))
  params = random_params(model)
  x, t = inputs()
  eval_out = run(model, params, x, t)
  np.testing.assert_array_equal(eval_out, run(no_dropout, params, x, t))

  def train(seed):
    return run(model, params, x, t, train=True, rngs={"dropout": jax.random.key(seed)})

  np.testing.assert_array_equal(train(0), train(0))
  assert np.abs(np.asarray(train(0) - train(1))).max() > 1e-3
  assert np.abs(np.asarray(train(0) - eval_out)).max() > 1e-3


def test_conv_resampling_without_scale_shift_has_the_reference_names_and_count():
  """resblock_updown=False: Downsample `op` / Upsample `conv`; no scale-shift: emb_layers to out_ch.
  702,499 counted by hand from the reference's UNetModel for this configuration."""
  cfg = tiny_model_config(resblock_updown=False, use_scale_shift_norm=False, learn_sigma=False)
  model = create_model(cfg)
  shapes = abstract_params(model)
  assert count_params(shapes) == 702_499
  state = reference_checkpoints.export_state_dict(random_params(model), cfg)
  assert state["input_blocks.2.0.op.weight"].shape == (32, 32, 3, 3)
  assert state["output_blocks.1.2.conv.weight"].shape == (64, 64, 3, 3)
  assert state["input_blocks.1.0.emb_layers.1.weight"].shape == (32, 128)
  assert state["out.2.weight"].shape == (3, 32, 3, 3)
  assert not any("in_layers" in k for k in state if k.startswith("input_blocks.2."))
  x, t = inputs()
  out = run(model, random_params(model), x, t)
  assert out.shape == (3, 8, 8, 3) and np.all(np.isfinite(out))


def test_resblock_updown_and_conv_resampling_differ_in_structure():
  updown = abstract_params(create_model(tiny_model_config(resblock_updown=True)))
  assert "in_layers_0" in updown["input_blocks_2_0"] and "op" not in updown["input_blocks_2_0"]
  assert "emb_layers_1" in updown["output_blocks_1_2"]


@pytest.mark.parametrize("dtype, tolerance", [("bfloat16", 0.03), ("float16", 0.005)])
def test_low_precision_compute_close_to_float32_with_float32_params(dtype, tolerance):
  """Max abs error under `tolerance` x the output's max magnitude (measured: bfloat16 about 0.009,
  float16 about 0.001: 8 and 11 mantissa bits)."""
  f32 = create_model(tiny_model_config())
  low = create_model(tiny_model_config(dtype=dtype))
  assert all(s.dtype == jnp.float32 for s in jax.tree_util.tree_leaves(abstract_params(low)))
  params = random_params(f32, scale=0.1)
  x, t = inputs()
  ref = np.asarray(run(f32, params, x, t))
  out = run(low, params, x, t)
  assert out.dtype == jnp.float32
  err = np.abs(np.asarray(out) - ref).max()
  assert 0 < err < tolerance * np.abs(ref).max(), (err, np.abs(ref).max())


def test_heads_by_channels_and_decoder_heads():
  """num_head_channels overrides num_heads; num_heads_upsample changes only the decoder."""
  x, t = inputs()
  base = create_model(tiny_model_config(num_heads=2))
  params = random_params(base)
  out = np.asarray(run(base, params, x, t))
  same = create_model(tiny_model_config(num_heads=1, num_head_channels=32))  # 64 channels / 32 = 2 heads
  np.testing.assert_array_equal(out, run(same, params, x, t))
  up = create_model(tiny_model_config(num_heads=2, num_heads_upsample=4))
  assert np.abs(out - np.asarray(run(up, params, x, t))).max() > 1e-4


def test_create_model_accepts_project_config_and_model_section():
  config = load_config("cifar10")
  assert create_model(config) == create_model(config.model)
  assert create_model(config).out_channels == 6
  assert create_model(config_base.get_config()).channel_mult == ()  # resolved by image size inside


@pytest.mark.parametrize("overrides, message", [
    (dict(image_size=12, channel_mult=(1, 2, 2, 2)), "not divisible by 2"),
    (dict(attention_resolutions=(2,)), "attention resolution 2 is not reached"),
    (dict(model_channels=48), "multiple of the 32 GroupNorm groups"),
    (dict(num_head_channels=24), "not divisible by num_head_channels"),
    (dict(num_heads=3), "not divisible by num_heads 3"),
    (dict(image_size=48, channel_mult=()), "has no default"),
    (dict(dtype="float64"), "model.dtype"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_configs_fail_at_creation(overrides, message):
  with pytest.raises(ValueError, match=message):
    create_model(tiny_model_config(**overrides))


def test_bad_input_shape_is_a_clear_error():
  model = create_model(tiny_model_config())
  params = random_params(model)
  x, t = inputs()
  with pytest.raises(ValueError, match="NHWC"):
    run(model, params, jnp.transpose(x, (0, 3, 1, 2)), t)


def test_model_section_configdict_only():
  section = ml_collections.ConfigDict(tiny_model_config().to_dict())
  assert create_model(section).image_size == 8


def test_remat_modes_give_the_same_output_and_gradients():
  """model.remat trades memory for recomputation in the backward pass; the numbers (dropout masks included) and
  the parameter names stay the same."""
  x, t = inputs(batch=2)
  results = {}
  for remat in ("", "convs", "blocks"):
    model = create_model(tiny_model_config(dropout=0.3, remat=remat))
    params = random_params(model)

    def loss(p, model=model):
      out = model.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.key(3)})
      return jnp.mean(out ** 2)

    results[remat] = jax.jit(jax.value_and_grad(loss))(params)
    assert jax.tree.structure(results[remat][1]) == jax.tree.structure(results[""][1])
  for remat in ("convs", "blocks"):
    np.testing.assert_allclose(results[remat][0], results[""][0], rtol=1e-6)
    for got, want in zip(jax.tree.leaves(results[remat][1]), jax.tree.leaves(results[""][1])):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="model.remat"):
    create_model(tiny_model_config(remat="everything"))
