"""PyTorch checkpoint import/export against the reference's toy network (tests/data/reference)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REFERENCE_DIR, jitted_apply, load_config, load_reference
from ddpm_ip_jax import convert, reference_checkpoints, workdir
from ddpm_ip_jax.models import abstract_params, create_model


@pytest.fixture(scope="module")
def toy_config():
  flags = json.loads((REFERENCE_DIR / "unet_config.json").read_text())
  return reference_checkpoints.config_from_reference_flags(flags)


@pytest.fixture(scope="module")
def toy_state_dict():
  return load_reference("unet_state_dict")


def toy_output_error(config, params):
  """Max abs error of the network against the reference's `out` (NCHW <-> NHWC at the boundary)."""
  io = load_reference("unet_io")
  x = jnp.asarray(io["x"].transpose(0, 2, 3, 1))
  out = jitted_apply(create_model(config))({"params": params}, x, jnp.asarray(io["t"]))
  assert out.dtype == jnp.float32
  return np.abs(np.asarray(out).transpose(0, 3, 1, 2) - io["out"]).max()


@pytest.mark.parametrize("suffix", ["npz", "pt"])
def test_toy_checkpoint_matches_the_reference_output(toy_config, suffix):
  if suffix == "pt":
    pytest.importorskip("torch")  # the .pt reader needs torch (Python 3.11's CPU build)
  params = reference_checkpoints.load_reference_checkpoint(REFERENCE_DIR / f"unet_state_dict.{suffix}", toy_config)
  assert all(p.dtype == np.float32 for p in jax.tree_util.tree_leaves(params))
  assert toy_output_error(toy_config, params) < 1e-4


def test_pt_and_npz_fixtures_hold_the_same_weights(toy_state_dict):
  torch = pytest.importorskip("torch")
  state = torch.load(REFERENCE_DIR / "unet_state_dict.pt", map_location="cpu", weights_only=True)
  assert sorted(state) == sorted(toy_state_dict)
  for k, v in state.items():
    np.testing.assert_array_equal(v.numpy(), toy_state_dict[k])


def test_flags_of_the_toy_network(toy_config):
  m = toy_config.model
  assert (m.image_size, m.model_channels, m.num_res_blocks) == (16, 32, 2)
  assert m.channel_mult == (1, 2, 2) and m.attention_resolutions == (8, 4)
  assert (m.num_heads, m.num_head_channels, m.num_heads_upsample) == (4, 16, -1)
  assert m.learn_sigma and m.use_scale_shift_norm and m.resblock_updown and m.use_new_attention_order
  assert m.num_classes == 0 and m.dtype == "float32" and m.dropout == 0.0


def test_reference_defaults():
  config = reference_checkpoints.config_from_reference_flags({})
  m, d = config.model, config.diffusion
  assert (m.image_size, m.model_channels, m.num_res_blocks, m.num_heads) == (64, 128, 2, 4)
  assert m.channel_mult == () and m.attention_resolutions == (16, 8)
  assert m.use_scale_shift_norm and not m.resblock_updown and not m.use_new_attention_order
  assert not m.learn_sigma and m.num_classes == 0 and m.dtype == "float32"
  assert (d.steps, d.noise_schedule, d.loss_type, d.predict_xstart, d.sigma_small) == (
      1000, "linear", "mse", False, False)
  assert d.input_perturbation == 0.0 and config.sampling.timestep_respacing == ""


def test_paper_cifar10_flags_give_the_cifar10_config():
  """The CIFAR-10 command of the reference's README against configs/cifar10.py."""
  flags = {
      "input_pertub": 0.15, "image_size": 32, "num_channels": 128, "num_head_channels": 32,
      "num_res_blocks": 3, "attention_resolutions": "16,8", "resblock_updown": True,
      "use_new_attention_order": True, "learn_sigma": True, "dropout": 0.3, "diffusion_steps": 1000,
      "noise_schedule": "cosine", "use_scale_shift_norm": True, "rescale_learned_sigmas": True,
      "use_fp16": True, "timestep_respacing": "100", "channel_mult": "1,2,2,2"}
  config = reference_checkpoints.config_from_reference_flags(flags)
  expected = load_config("cifar10")
  for key, value in expected.model.items():
    if key != "dtype":
      assert config.model[key] == value, key
  assert config.model.dtype == "float16"
  for key in ("steps", "noise_schedule", "loss_type", "input_perturbation", "predict_xstart"):
    assert config.diffusion[key] == expected.diffusion[key], key
  assert config.sampling.timestep_respacing == "100"


@pytest.mark.parametrize("flags, loss_type", [
    ({"use_kl": True}, "rescaled_kl"), ({"use_kl": True, "rescale_learned_sigmas": True}, "rescaled_kl"),
    ({"rescale_learned_sigmas": True}, "rescaled_mse"), ({}, "mse")])
def test_loss_type_from_flags(flags, loss_type):
  assert reference_checkpoints.config_from_reference_flags(flags).diffusion.loss_type == loss_type


def test_flag_conversions():
  config = reference_checkpoints.config_from_reference_flags(
      {"class_cond": "True", "channel_mult": "0.5,1,1,2,2,4,4", "image_size": 512, "sigma_small": True,
       "predict_xstart": True, "attention_resolutions": "32,16,8", "num_channels": 64})
  assert config.model.num_classes == 10  # DDPM-IP's class_cond (script_util.NUM_CLASSES = 10)
  assert config.model.channel_mult == (0.5, 1, 1, 2, 2, 4, 4)
  assert config.diffusion.sigma_small and config.diffusion.predict_xstart
  assert reference_checkpoints.config_from_reference_flags({"rescale_timesteps": True}).diffusion.rescale_timesteps


def test_bad_flags_are_clear_errors():
  with pytest.raises(ValueError, match=r"unknown reference flags \['num_chanels'\]"):
    reference_checkpoints.config_from_reference_flags({"num_chanels": 64})
  with pytest.raises(ValueError, match="attention resolution 3"):
    reference_checkpoints.config_from_reference_flags({"image_size": 32, "attention_resolutions": "3"})
  with pytest.raises(ValueError, match="boolean"):
    reference_checkpoints.config_from_reference_flags({"learn_sigma": "maybe"})


def test_strict_keys_list_every_problem(toy_config, toy_state_dict):
  removed = dict(toy_state_dict)
  del removed["middle_block.1.qkv.weight"]
  with pytest.raises(reference_checkpoints.CheckpointMismatchError, match=r"1 missing: middle_block\.1\.qkv\.weight"):
    reference_checkpoints.params_from_state_dict(removed, toy_config)

  extra = dict(toy_state_dict, **{"label_emb.weight": np.zeros((1000, 128), np.float32)})
  with pytest.raises(reference_checkpoints.CheckpointMismatchError, match=r"1 unexpected: label_emb\.weight"):
    reference_checkpoints.params_from_state_dict(extra, toy_config)

  wrong = dict(toy_state_dict, **{"out.2.weight": np.zeros((3, 32, 3, 3), np.float32)})
  with pytest.raises(reference_checkpoints.CheckpointMismatchError,
                     match=r"1 wrong shape: out\.2\.weight: checkpoint \(3, 32, 3, 3\), model \(6, 32, 3, 3\)"):
    reference_checkpoints.params_from_state_dict(wrong, toy_config)

  all_three = dict(extra, **{"out.2.weight": wrong["out.2.weight"]})
  del all_three["time_embed.0.bias"], all_three["input_blocks.4.1.norm.weight"]
  with pytest.raises(reference_checkpoints.CheckpointMismatchError) as error:
    reference_checkpoints.params_from_state_dict(all_three, toy_config)
  message = str(error.value)
  for name in ("time_embed.0.bias", "input_blocks.4.1.norm.weight", "label_emb.weight", "out.2.weight"):
    assert name in message
  assert isinstance(error.value, ValueError)


def test_wrong_model_config_is_a_mismatch(toy_state_dict):
  flags = json.loads((REFERENCE_DIR / "unet_config.json").read_text())
  flags["learn_sigma"] = False
  with pytest.raises(reference_checkpoints.CheckpointMismatchError, match="out.2"):
    reference_checkpoints.params_from_state_dict(toy_state_dict,
                                                 reference_checkpoints.config_from_reference_flags(flags))


def test_missing_file_names_the_path(toy_config, tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.pt")):
    reference_checkpoints.load_reference_checkpoint(tmp_path / "nope.pt", toy_config)


def test_export_import_round_trip_is_exact(toy_config, toy_state_dict, tmp_path):
  params = reference_checkpoints.params_from_state_dict(toy_state_dict, toy_config)
  exported = reference_checkpoints.export_state_dict(params, toy_config)
  assert sorted(exported) == sorted(toy_state_dict)
  for k, v in exported.items():
    np.testing.assert_array_equal(v, toy_state_dict[k])
  # A model with the other options (label embedding, legacy order, conv resampling, no scale-shift).
  flags = {"image_size": 8, "num_channels": 32, "channel_mult": "1,2", "num_res_blocks": 1,
           "attention_resolutions": "4", "class_cond": True, "use_scale_shift_norm": False}
  config = reference_checkpoints.config_from_reference_flags(flags)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: rng.standard_normal(s.shape).astype(np.float32),
      abstract_params(create_model(config)))
  path = tmp_path / "state.npz"
  reference_checkpoints.save_state_dict_npz(params, config, path)
  assert "label_emb.weight" in np.load(path).files
  again = reference_checkpoints.load_reference_checkpoint(path, config)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def test_command_line_end_to_end(toy_config, toy_state_dict, tmp_path):
  pytest.importorskip("torch")
  out_dir = tmp_path / "converted"
  assert convert.main([f"--flags_file={REFERENCE_DIR / 'unet_config.json'}",
                       f"--input={REFERENCE_DIR / 'unet_state_dict.pt'}", f"--output={out_dir}"]) == 0
  assert json.loads((out_dir / "config.json").read_text())["model"]["image_size"] == 16
  config, params = workdir.load_converted(out_dir)
  assert config.model.to_dict() == toy_config.model.to_dict()
  assert config.diffusion.to_dict() == toy_config.diffusion.to_dict()
  assert toy_output_error(config, params) < 1e-4

  exported = tmp_path / "exported.npz"
  assert convert.main(["--export", f"--input={out_dir}", f"--output={exported}"]) == 0
  with np.load(exported) as f:
    assert sorted(f.files) == sorted(toy_state_dict)
    for k in f.files:
      np.testing.assert_array_equal(f[k], toy_state_dict[k])


def test_command_line_with_inline_flags(tmp_path):
  flags = (REFERENCE_DIR / "unet_config.json").read_text()
  convert.main([f"--flags={flags}", f"--input={REFERENCE_DIR / 'unet_state_dict.npz'}",
                f"--output={tmp_path}"])
  assert (tmp_path / "params").is_dir()
  with pytest.raises(SystemExit):
    convert.main([f"--input={REFERENCE_DIR / 'unet_state_dict.npz'}", f"--output={tmp_path}"])


def _class_conditional(num_classes):
  """(flags, state_dict, io) of the reference's class-conditional toy networks (make_class_conditional.py)."""
  data = dict(np.load(REFERENCE_DIR / f"class_cond{num_classes}.npz"))
  state_dict = {k[len("sd/"):]: v for k, v in data.items() if k.startswith("sd/")}
  return json.loads(str(data["flags"])), state_dict, data


@pytest.mark.parametrize("num_classes", [10, 1000])
def test_class_conditional_checkpoints_give_the_reference_output(num_classes):
  """DDPM-IP's class_cond (10 classes) by default; guided-diffusion's 1000 with "num_classes": 1000."""
  flags, state_dict, io = _class_conditional(num_classes)
  assert ("num_classes" in flags) == (num_classes == 1000)
  config = reference_checkpoints.config_from_reference_flags(flags)
  assert config.model.num_classes == num_classes
  params = reference_checkpoints.params_from_state_dict(state_dict, config)
  x = jnp.asarray(io["x"].transpose(0, 2, 3, 1))
  out = create_model(config).apply({"params": params}, x, jnp.asarray(io["t"]), y=jnp.asarray(io["y"]))
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), io["out"], atol=1e-4, rtol=0)


def test_a_class_count_that_does_not_fit_names_the_flag():
  flags, state_dict, _ = _class_conditional(1000)
  without = {k: v for k, v in flags.items() if k != "num_classes"}  # class_cond alone: DDPM-IP's 10
  with pytest.raises(reference_checkpoints.CheckpointMismatchError,
                     match=r'label_emb\.weight: checkpoint \(1000, 128\), model \(10, 128\)(.|\n)*"num_classes": 1000'):
    reference_checkpoints.params_from_state_dict(state_dict, reference_checkpoints.config_from_reference_flags(without))
  unconditional = dict(without, class_cond=False)
  with pytest.raises(reference_checkpoints.CheckpointMismatchError, match=r'"num_classes": 1000'):
    reference_checkpoints.params_from_state_dict(state_dict,
                                                 reference_checkpoints.config_from_reference_flags(unconditional))
  with pytest.raises(ValueError, match="class_cond is false"):
    reference_checkpoints.config_from_reference_flags(dict(unconditional, num_classes=1000))


def test_the_512_layout_has_the_reference_names_and_shapes():
  """channel_mult 0.5,1,1,2,2,4,4 (guided-diffusion's 512x512 default): the input and output convolutions are
  int(0.5 * C) wide; every state_dict name and shape as the reference builds them (layout512.json)."""
  golden = json.loads((REFERENCE_DIR / "layout512.json").read_text())
  config = reference_checkpoints.config_from_reference_flags(golden["flags"])  # channel_mult "": by image size
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), abstract_params(create_model(config)))
  exported = reference_checkpoints.export_state_dict(params, config)
  assert {k: list(v.shape) for k, v in exported.items()} == golden["shapes"]
  assert exported["input_blocks.0.0.weight"].shape == (32, 3, 3, 3) and exported["out.2.weight"].shape[1] == 32
