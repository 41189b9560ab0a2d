"""Writes, with the PyTorch reference's own code, the fixtures here that the shared ones do not cover:
class_cond10.npz and class_cond1000.npz (two small class-conditional networks, their weights and their output,
for tests/test_convert.py) and rescale_timesteps.npz (the toy network of unet_state_dict.npz in a 4000-step
cosine diffusion that feeds it t * 1000 / T, for tests/test_sampling.py) and layout512.json (the state_dict
names and shapes of a 512x512 network, whose first channel multiplier is 0.5, for tests/test_convert.py).

  python tests/data/reference/make_extra_fixtures.py --reference_repo=/path/to/DDPM-IP

Needs torch and a checkout of the reference (the folder holding its `guided_diffusion/`). The 10-class network is
what DDPM-IP's `script_util.create_model(class_cond=True)` builds (its NUM_CLASSES = 10); the 1000-class one is
guided-diffusion's ImageNet layout, built with the same `UNetModel` and num_classes=1000. As for the shared
fixtures, every parameter (the zero-initialised output layers and the norm scales included) gets random values,
so that every weight matters. Each file holds `flags` (JSON of the reference flags, plus num_classes for the
1000-class one), `sd/<state_dict name>` (PyTorch layouts), and `x` (4,3,8,8), `t`, `y`, `out` (eval mode).
"""
import argparse
import json
import os
import sys

import numpy as np

FLAGS = {"image_size": 8, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1", "attention_resolutions": "8",
         "num_heads": 2, "num_head_channels": -1, "num_heads_upsample": -1, "learn_sigma": True, "class_cond": True,
         "use_scale_shift_norm": True, "resblock_updown": True, "use_new_attention_order": True, "dropout": 0.0}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--reference_repo", required=True)
  args = p.parse_args()
  sys.path.insert(0, os.path.abspath(args.reference_repo))
  import torch as th  # pylint: disable=import-outside-toplevel
  from guided_diffusion import script_util  # pylint: disable=import-outside-toplevel
  from guided_diffusion.unet import UNetModel  # pylint: disable=import-outside-toplevel

  th.manual_seed(0)
  rng = np.random.default_rng(0)
  here = os.path.dirname(os.path.abspath(__file__))
  x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
  t = np.array([0, 1, 500, 999], np.int64)
  for num_classes in (10, 1000):
    if num_classes == 10:
      model = script_util.create_model(**{**FLAGS, "use_checkpoint": False, "use_fp16": False})
      flags = dict(FLAGS)
    else:  # guided-diffusion's layout: the same network (attention at 8 = downsample rate 1) with 1000 classes
      model = UNetModel(image_size=8, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                        attention_resolutions=(1,), dropout=0.0, channel_mult=(1,), num_classes=1000, num_heads=2,
                        num_head_channels=-1, num_heads_upsample=2, use_scale_shift_norm=True, resblock_updown=True,
                        use_new_attention_order=True)
      flags = {**FLAGS, "num_classes": 1000}
    with th.no_grad():
      for param in model.parameters():
        param.copy_(th.randn_like(param) * 0.1)
    model.eval()
    y = rng.integers(0, num_classes, (4,)).astype(np.int64)
    with th.no_grad():
      out = model(th.from_numpy(x), th.from_numpy(t), y=th.from_numpy(y)).numpy()
    arrays = {f"sd/{k}": v.detach().numpy() for k, v in model.state_dict().items()}
    np.savez(os.path.join(here, f"class_cond{num_classes}.npz"), flags=json.dumps(flags), x=x, t=t, y=y, out=out,
             **arrays)
    print(f"class_cond{num_classes}.npz: {len(arrays)} tensors, label_emb {arrays['sd/label_emb.weight'].shape}")
  rescaled(here, rng)
  layout512(here)


def layout512(here):
  """The state_dict names and shapes of a 512x512 network (guided-diffusion's channel_mult 0.5,1,1,2,2,4,4: the
  input and output convolutions are int(0.5 * C) wide), small C; shapes only."""
  from guided_diffusion import script_util  # pylint: disable=import-outside-toplevel
  flags = {"image_size": 512, "num_channels": 64, "num_res_blocks": 1, "channel_mult": "",
           "attention_resolutions": "32,16,8", "num_heads": 4, "num_head_channels": 16, "num_heads_upsample": -1,
           "learn_sigma": True, "class_cond": True, "use_scale_shift_norm": True, "resblock_updown": True,
           "use_new_attention_order": False, "dropout": 0.0}
  model = script_util.create_model(**{**flags, "use_checkpoint": False, "use_fp16": False})
  shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
  with open(os.path.join(here, "layout512.json"), "w") as f:
    json.dump({"flags": flags, "shapes": shapes}, f, indent=0, sort_keys=True)
  print(f"layout512.json: {len(shapes)} tensors, input conv {shapes['input_blocks.0.0.weight']}")


def rescaled(here, rng):
  """p_mean_variance of the toy network with rescale_timesteps=True, T = 4000 (cosine, learned sigma): all steps
  and respaced to 10 (where the network sees original step * 1000 / 4000)."""
  import torch as th  # pylint: disable=import-outside-toplevel
  from guided_diffusion import script_util  # pylint: disable=import-outside-toplevel
  with open(os.path.join(here, "unet_config.json")) as f:
    flags = json.load(f)
  model = script_util.create_model(**{**flags, "use_checkpoint": False, "use_fp16": False})
  state = np.load(os.path.join(here, "unet_state_dict.npz"))
  model.load_state_dict({k: th.from_numpy(state[k]) for k in state.files})
  model.eval()
  x_t = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
  out = {"x_t": x_t}
  for spec in ("", "10"):
    diffusion = script_util.create_gaussian_diffusion(
        steps=4000, learn_sigma=True, noise_schedule="cosine", rescale_timesteps=True,
        rescale_learned_sigmas=True, timestep_respacing=spec)
    t = np.array([0, 1, 2, 3], np.int64) if spec else np.array([0, 1, 2000, 3999], np.int64)
    with th.no_grad():
      pmv = diffusion.p_mean_variance(model, th.from_numpy(x_t), th.from_numpy(t), clip_denoised=True)
    name = spec or "all"
    out[f"{name}/t"] = t
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
      out[f"{name}/{key}"] = pmv[key].numpy()
  np.savez(os.path.join(here, "rescale_timesteps.npz"), **out)
  print("rescale_timesteps.npz")


if __name__ == "__main__":
  main()
