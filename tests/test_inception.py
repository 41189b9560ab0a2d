"""The Flax FID InceptionV3 against pytorch-fid's network with the same random weights, its weight loading
(strict keys, BatchNorm folding, the .pth -> .npz converter) and the missing-weights error."""
import sys

import jax
import numpy as np
import pytest

from ddpm_ip_jax.evaluation import convert_inception, inception, metrics

torch = pytest.importorskip("torch")
_TORCHVISION_SCHEMAS = []  # keeps the torch.library fragment alive


def _import_pytorch_fid():
  """pytorch_fid.inception, importable beside the CPU torch.

  PyPI's torchvision 0.28.0 is a CUDA build: its C++ ops do not load beside torch 2.13.0+cpu, and its
  import then fails registering fake kernels for the missing torchvision::nms/qnms ("operator
  torchvision::nms does not exist"). Defining those two schemas (never called: the Inception uses no
  torchvision op) lets the pure-Python model code import. A torchvision whose ops load needs nothing.
  """
  try:
    import torchvision  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except RuntimeError as e:
    if "torchvision::nms does not exist" not in str(e):
      raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SCHEMAS.append(lib)
  return pytest.importorskip("pytorch_fid.inception")


def _random_state_dict(seed=0):
  """Random FID-Inception weights with non-trivial BatchNorm statistics (so the folding is tested),
  scaled (He init, BN roughly renormalising) so the activations stay O(1) through the 94 convs."""
  rng = np.random.default_rng(seed)
  sd = {}
  for name, shape in inception.state_dict_shapes().items():
    if name.endswith("conv.weight"):
      fan_in = np.prod(shape[1:])
      sd[name] = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
    elif name.endswith("bn.weight"):
      sd[name] = rng.uniform(0.5, 1.5, shape)
    elif name.endswith("bn.bias"):
      sd[name] = rng.normal(0, 0.2, shape)
    elif name.endswith("running_mean"):
      sd[name] = rng.normal(0, 0.5, shape)
    elif name.endswith("running_var"):
      sd[name] = rng.uniform(0.5, 2.0, shape)
    elif name == "fc.weight":
      sd[name] = rng.normal(0, 1 / np.sqrt(shape[1]), shape)
    else:
      sd[name] = rng.normal(0, 0.1, shape)
  sd = {k: v.astype(np.float32) for k, v in sd.items()}
  for name in list(sd):
    if name.endswith("bn.running_mean"):  # as a torch state_dict has them
      sd[name.replace("running_mean", "num_batches_tracked")] = np.array(7, np.int64)
  return sd


@pytest.fixture(scope="module")
def state_dict():
  return _random_state_dict()


def test_matches_pytorch_fid(state_dict, monkeypatch):
  pf = _import_pytorch_fid()
  torch_sd = {k: torch.from_numpy(v) for k, v in state_dict.items()}
  # fid_inception_v3() fetches its weights by URL: hand it the random ones (its load is strict, so this
  # also checks that our key table is exactly pytorch-fid's).
  monkeypatch.setattr(pf, "load_state_dict_from_url", lambda *a, **k: torch_sd)
  net = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                       normalize_input=True, use_fid_inception=True).eval()
  mixed_6d = net.blocks[2][6]
  assert type(mixed_6d).__name__ == "FIDInceptionC"
  spatial = {}
  mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: spatial.setdefault("out", o.clone()))

  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)  # CIFAR-size, resized to 299
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0   # pytorch-fid: NCHW in [0, 1]
    pool_t = net(x)[0][:, :, 0, 0]                                      # [2, 2048]
    logits_t = torch.nn.functional.linear(pool_t, torch_sd["fc.weight"])  # unbiased, as the evaluator
  spatial_t = spatial["out"].permute(0, 2, 3, 1)[..., :7].reshape(2, -1).numpy()  # NHWC (h, w, c) order
  pool_t, logits_t = pool_t.numpy(), logits_t.numpy()

  params = inception.params_from_state_dict(state_dict)
  out = jax.jit(lambda p, x: inception.InceptionV3().apply({"params": p}, x))(params, images)
  assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
  assert out["spatial"].shape == (2, 2023)
  assert 0.05 < np.abs(pool_t).mean() < 20 and np.std(pool_t) > 0.05  # non-degenerate activations
  np.testing.assert_allclose(out["pool"], pool_t, atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["logits"], logits_t, atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["spatial"], spatial_t, atol=1e-4, rtol=0)
  # The same images as floats in [-1, 1] give the same features.
  out_f = inception.InceptionV3().apply({"params": params}, images / 127.5 - 1.0)
  np.testing.assert_allclose(out_f["pool"], out["pool"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(32, 32), (400, 350)])
def test_resize_matches_torch_bilinear(size):
  """Up- and downsampling to 299 as F.interpolate(bilinear, align_corners=False): no antialiasing."""
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (1,) + size + (3,), dtype=np.uint8)
  ours = np.asarray(inception.preprocess(images))
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  ref = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
  ref = (2 * ref - 1).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=0)


def test_batchnorm_folding(state_dict):
  """One folded conv against conv -> BatchNorm(eps 0.001, inference) in torch."""
  p = inception.params_from_state_dict(state_dict)["Mixed_6d"]["branch1x1"]
  prefix = "Mixed_6d.branch1x1"
  t = {k: torch.from_numpy(v) for k, v in state_dict.items() if k.startswith(prefix)}
  x = np.random.default_rng(3).normal(size=(1, 768, 2, 2)).astype(np.float32)
  with torch.no_grad():
    y = torch.nn.functional.conv2d(torch.from_numpy(x), t[f"{prefix}.conv.weight"])
    y = torch.nn.functional.batch_norm(y, t[f"{prefix}.bn.running_mean"], t[f"{prefix}.bn.running_var"],
                                       t[f"{prefix}.bn.weight"], t[f"{prefix}.bn.bias"], eps=1e-3)
  ours = np.einsum("bihw,io->bohw", x, p["kernel"][0, 0]) + p["bias"][None, :, None, None]
  np.testing.assert_allclose(ours, y.numpy(), atol=1e-5, rtol=1e-5)


def test_strict_keys(state_dict):
  bad = dict(state_dict)
  del bad["Mixed_7c.branch_pool.bn.running_var"]
  bad["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  bad["fc.weight"] = np.zeros((1000, 2048), np.float32)
  with pytest.raises(inception.InceptionWeightsError) as e:
    inception.params_from_state_dict(bad)
  msg = str(e.value)
  assert "1 missing: Mixed_7c.branch_pool.bn.running_var" in msg
  assert "1 unexpected: AuxLogits.fc.weight" in msg
  assert "fc.weight: file (1000, 2048), network (1008, 2048)" in msg


def test_missing_weights_file_says_where_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    metrics.inception_extractor(tmp_path / inception.WEIGHTS_FILE)
  msg = str(e.value)
  assert str(tmp_path / inception.WEIGHTS_FILE) in msg
  assert inception.WEIGHTS_URL in msg and "never downloads" in msg and "convert_inception" in msg


def test_convert_round_trip(state_dict, tmp_path, capsys):
  """A random state_dict saved by torch.save -> the command -> .npz: same arrays, same Flax params."""
  pth = tmp_path / inception.WEIGHTS_FILE
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, pth)
  npz = tmp_path / "out" / "inception_fid.npz"
  assert convert_inception.main([f"--input={pth}", f"--output={npz}"]) == 0
  assert "wrote" in capsys.readouterr().out
  with np.load(npz) as f:
    converted = {k: f[k] for k in f.files}
  expected = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  assert sorted(converted) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(converted[k], v)
  from_pth = inception.load_inception_params(pth)
  from_npz = inception.load_inception_params(npz)
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_pth, from_npz)
  # A file of another network fails in the converter, before anything is written.
  other = tmp_path / "other.pth"
  torch.save({"conv.weight": torch.zeros(3, 3, 1, 1)}, other)
  with pytest.raises(inception.InceptionWeightsError):
    convert_inception.main([f"--input={other}", f"--output={tmp_path / 'other.npz'}"])
  assert not (tmp_path / "other.npz").exists()


def test_inception_extractor_batches(state_dict, tmp_path):
  """Converted .npz -> inception_extractor -> batched features (last batch padded) = one direct apply;
  reference statistics of the right sizes. (The metrics on top are tested in test_metrics.py; a
  2048-dim Fréchet distance alone takes seconds.)"""
  npz = tmp_path / "inception_fid.npz"
  np.savez(npz, **state_dict)
  extractor = metrics.inception_extractor(npz)
  images = np.random.default_rng(4).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
  ref = metrics.reference_statistics(images, extractor, batch_size=4)
  assert ref.features.shape == (5, 2048) and ref.sigma.shape == (2048, 2048)
  assert ref.spatial_mu.shape == (2023,) and ref.spatial_sigma.shape == (2023, 2023)
  direct = inception.InceptionV3().apply({"params": extractor.params}, images)
  np.testing.assert_allclose(ref.features, direct["pool"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(ref.spatial_mu, np.mean(direct["spatial"], axis=0), atol=1e-5, rtol=0)
