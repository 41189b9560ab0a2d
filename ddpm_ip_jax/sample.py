"""Generate many samples on all devices, resumably: `python -m ddpm_ip_jax.sample`.

  python -m ddpm_ip_jax.sample --workdir=runs/cifar10 --num_samples=50000 --steps=100
  python -m ddpm_ip_jax.sample --checkpoint=converted/cifar10_ip --workdir=runs/eval --sampler=ddim --steps=ddim50

The model comes from a training workdir (its config.json and latest checkpoint; EMA params by default) or from
`--checkpoint`, a directory written by `python -m ddpm_ip_jax.convert` (e.g. from a released `.pt`). The chain
is `jax.pmap`-ed over the local devices. Sample i is drawn from `fold_in(key(seed), i)` alone, so the images are
the same for any number of devices, hosts or batch size. Finished batches are written as
`<out>/parts/<start>-<end>.npz` (atomically: a temporary file, then a rename), and a rerun continues after the
last finished batch. The result is `<out>/samples_<N>x<H>x<W>x<C>.npz` with key `arr_0` (uint8 NHWC, the format of
OpenAI's evaluator; `arr_1` holds the labels of a class-conditional model) and a PNG grid.
"""
import dataclasses
import functools
import json
import os
import re
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ddpm_ip_jax import convert
from ddpm_ip_jax import diffusion as diffusion_lib
from ddpm_ip_jax import image_grid
from ddpm_ip_jax import models
from ddpm_ip_jax import sampling

PART_RE = re.compile(r"^(\d{8})-(\d{8})\.npz$")


@dataclasses.dataclass
class LoadedModel:
  config: ml_collections.ConfigDict
  params: Any
  description: str       # where the params come from, recorded with every result
  step: int              # training step of the checkpoint (0 for a converted model)


def load_model_params(*, workdir=None, checkpoint=None, use_ema=True, ema_rate=None) -> LoadedModel:
  """The model config and params from a converted `checkpoint` dir or from a training `workdir`."""
  if checkpoint:
    config, params = convert.load_converted(checkpoint)
    return LoadedModel(config, params, f"converted checkpoint {os.path.abspath(checkpoint)}", 0)
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} not found: --workdir must be a training workdir (or give "
                            "--checkpoint=DIR of a converted model).")
  with open(config_path) as f:
    config = convert.config_from_json(f.read())
  state, step = restore_trained_params(os.path.join(workdir, "checkpoints"), config)
  if not use_ema:
    return LoadedModel(config, state["params"], f"raw params of step {step} in {workdir}", step)
  emas = state["ema_params"]
  key = next(iter(emas)) if ema_rate is None else str(float(ema_rate))
  if key not in emas:
    raise ValueError(f"EMA rate {ema_rate} not in the checkpoint; it has {sorted(emas)}.")
  return LoadedModel(config, emas[key], f"EMA {key} params of step {step} in {workdir}", step)


def restore_trained_params(checkpoint_dir, config):
  """({"params": ..., "ema_params": {rate: ...}}, step) of the latest complete training checkpoint."""
  manager = ocp.CheckpointManager(os.path.abspath(checkpoint_dir)) if os.path.isdir(checkpoint_dir) else None
  step = manager and manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir}")
  state = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  expected = jax.tree.map(lambda a: tuple(a.shape), models.abstract_params(models.create_model(config)))
  for name, tree in [("params", state["params"])] + [(f"ema {k}", v) for k, v in state["ema_params"].items()]:
    if jax.tree.map(lambda a: tuple(a.shape), tree) != expected:
      raise ValueError(f"the {name} of step {step} in {checkpoint_dir} do not match the model of config.json")
  return state, step


def finished_prefix(parts_dir):
  """How many samples, from index 0 on, the part files in `parts_dir` already hold contiguously."""
  if not os.path.isdir(parts_dir):
    return 0
  ranges = sorted(tuple(map(int, m.groups())) for m in map(PART_RE.match, os.listdir(parts_dir)) if m)
  done = 0
  for start, end in ranges:
    if start > done:
      break
    done = max(done, end)
  return done


def _write_atomically(path, **arrays):
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _check_settings(out_dir, settings):
  """Refuses to mix samples of different settings in one output directory."""
  path = os.path.join(out_dir, "sampling.json")
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if previous != settings:
      raise ValueError(f"{out_dir} holds samples made with other settings:\n  {previous}\nnow:\n  {settings}\n"
                       "Use another --output_dir, or delete it to start over.")
  else:
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(settings, f, indent=2, sort_keys=True)


@functools.lru_cache(maxsize=8)
def pmapped_sampler(config_json, respacing, sampler, eta, clip_denoised, seed, devices, eps_scale):
  """p_sample(params, indices [devices, b]) -> (uint8 images [devices, b, H, W, C], labels [devices, b]).

  Cached on the settings, so repeated calls in one process (resumes, periodic evaluation) compile once.
  """
  config = convert.config_from_json(config_json)
  size, channels = config.model.image_size, config.model.in_channels
  num_classes = int(config.model.num_classes)
  diff = diffusion_lib.create_diffusion(config.diffusion, learn_sigma=config.model.learn_sigma,
                                        timestep_respacing=respacing)
  model = models.create_model(config)
  base_key = jax.random.key(seed)

  def device_fn(params, indices):
    """indices [b] int32: the global sample indices this device draws."""
    keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(indices)
    label_keys, chain_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    y = (jax.vmap(lambda k: jax.random.randint(k, (), 0, num_classes))(label_keys) if num_classes else None)
    model_fn = lambda x, t: model.apply({"params": params}, x, t, y=y, train=False)
    x0 = sampling.sample_loop(diff, model_fn, chain_keys, (indices.shape[0], size, size, channels),
                              sampler=sampler, eta=eta, clip_denoised=clip_denoised, eps_scale=eps_scale)
    images = jnp.clip((x0 + 1) * 127.5, 0, 255).astype(jnp.uint8)  # the reference's truncation
    return images, (y if num_classes else jnp.zeros_like(indices))

  return jax.pmap(device_fn, in_axes=(None, 0), devices=devices)


def draw_samples(p_sample, params, start, num_devices, per_device_batch):
  """Samples start .. start + num_devices * per_device_batch - 1 of `p_sample` (a `pmapped_sampler`):
  (uint8 images [n, H, W, C], labels [n])."""
  indices = np.arange(start, start + num_devices * per_device_batch, dtype=np.int32)
  images, labels = jax.device_get(p_sample(params, indices.reshape(num_devices, per_device_batch)))
  return images.reshape((-1,) + images.shape[2:]), labels.reshape(-1)


def generate(config, params, out_dir, *, num_samples, sampler="ancestral", respacing="", eta=0.0,
             clip_denoised=True, per_device_batch=16, seed=0, devices=None, description="", eps_scale=None):
  """Writes (or completes) `num_samples` samples into `out_dir`; returns the path of the final `.npz`.

  Multi-host: every host computes its slice of each global batch and writes its own part files (a shared
  filesystem is assumed); process 0 writes the final file once all parts are there.
  """
  devices = devices or jax.local_devices()
  n_local = len(devices)
  hosts, host = jax.process_count(), jax.process_index()
  per_host = per_device_batch * n_local
  global_batch = per_host * hosts
  size, channels = config.model.image_size, config.model.in_channels
  num_classes = int(config.model.num_classes)
  settings = dict(model=description, num_samples=num_samples, sampler=sampler, respacing=respacing, eta=eta,
                  clip_denoised=clip_denoised, seed=seed, eps_scale=list(eps_scale) if eps_scale else None)
  if host == 0:
    _check_settings(out_dir, settings)
  parts_dir = os.path.join(out_dir, "parts")
  os.makedirs(parts_dir, exist_ok=True)
  final = os.path.join(out_dir, f"samples_{num_samples}x{size}x{size}x{channels}.npz")

  p_sample = pmapped_sampler(config.to_json(), respacing, sampler, float(eta), bool(clip_denoised), int(seed),
                              tuple(devices), tuple(map(float, eps_scale)) if eps_scale else None)
  start = first = finished_prefix(parts_dir)
  if start:
    logging.info("Resuming: %d of %d samples already in %s.", min(start, num_samples), num_samples, parts_dir)
  t0 = time.monotonic()
  while start < num_samples:
    host_start = start + host * per_host
    images, labels = draw_samples(p_sample, params, host_start, n_local, per_device_batch)
    end = min(host_start + per_host, num_samples)
    if end > host_start:  # the last batch may run past num_samples: keep only what is asked for
      keep = end - host_start
      _write_atomically(os.path.join(parts_dir, f"{host_start:08d}-{end:08d}.npz"),
                        images=images[:keep], labels=labels[:keep])
    start += global_batch
    rate = (min(start, num_samples) - first) / (time.monotonic() - t0)
    logging.info("%d/%d samples, %.2f samples/s, ETA %.0f s", min(start, num_samples), num_samples, rate,
                 max(num_samples - start, 0) / rate)

  if hosts > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices("ddpm_ip_jax.sample: all parts written")
  if host == 0:
    _merge_parts(parts_dir, final, num_samples, num_classes > 0)
    with np.load(final) as f:
      grid = image_grid.make_grid(f["arr_0"][:64])
    image_grid.save_png(os.path.join(out_dir, "samples_grid.png"), grid, upscale=max(1, 64 // size))
    logging.info("Wrote %s", final)
  return final


def _merge_parts(parts_dir, final, num_samples, with_labels):
  images, labels, done = [], [], 0
  for name in sorted(n for n in os.listdir(parts_dir) if PART_RE.match(n)):
    start, end = map(int, PART_RE.match(name).groups())
    if end <= done:
      continue  # a batch covered twice (e.g. rerun with another batch size): keep the first copy
    with np.load(os.path.join(parts_dir, name)) as f:
      images.append(f["images"][done - start:])
      labels.append(f["labels"][done - start:])
    done = end
  if done < num_samples:
    raise RuntimeError(f"only {done} of {num_samples} samples in {parts_dir}")
  arrays = {"arr_0": np.concatenate(images)[:num_samples]}
  if with_labels:
    arrays["arr_1"] = np.concatenate(labels)[:num_samples]
  _write_atomically(final, **arrays)


FLAGS = flags.FLAGS


def define_model_flags():
  """Where the model comes from (shared with the evaluation and exposure-bias commands)."""
  flags.DEFINE_string("workdir", None, "Training workdir (model source unless --checkpoint); output goes to "
                      "<workdir>/samples_<settings> unless --output_dir.")
  flags.DEFINE_string("checkpoint", None, "A converted checkpoint DIR (python -m ddpm_ip_jax.convert).")
  flags.DEFINE_bool("use_ema", True, "Use the EMA params (a training workdir only).")
  flags.DEFINE_float("ema_rate", None, "Which EMA rate (default: the first of the config).")


def define_sampler_flags(default_steps=""):
  """How the chain runs (shared with the evaluation and exposure-bias commands)."""
  flags.DEFINE_enum("sampler", "ancestral", sampling.SAMPLERS, "Ancestral (DDPM) or DDIM.")
  flags.DEFINE_string("steps", default_steps, "Respacing: '' (all steps), '100', '10,20,5', 'ddim50'.")
  flags.DEFINE_float("eta", 0.0, "DDIM eta.")
  flags.DEFINE_bool("clip_denoised", True, "Clip the predicted x0 to [-1, 1] at each step.")
  flags.DEFINE_list("eps_scale", None, "Epsilon scaling 'k,b': eps / (k t + b) at sampling time (default off).")
  flags.DEFINE_integer("seed", 0, "Sample i is drawn from fold_in(key(seed), i).")


def define_flags():
  define_model_flags()
  define_sampler_flags()
  flags.DEFINE_string("output_dir", None, "Where to write the samples.")
  flags.DEFINE_integer("num_samples", 50_000, "How many samples.")
  flags.DEFINE_integer("batch_size", 64, "Samples per device per call.")


def eps_scale_from_flags():
  """(k, b) of --eps_scale, or None."""
  if not FLAGS.eps_scale:
    return None
  try:
    k, b = map(float, FLAGS.eps_scale)
  except ValueError:
    raise app.UsageError(f"--eps_scale wants 'k,b' (two numbers), got {','.join(FLAGS.eps_scale)}") from None
  return k, b


def settings_from_flags(loaded):
  """(output dir, eps_scale) of the sampling flags, checked before anything compiles."""
  for name in ("num_samples", "batch_size"):
    if getattr(FLAGS, name) < 1:
      raise app.UsageError(f"--{name} must be >= 1")
  config = loaded.config
  diffusion_lib.space_timesteps(config.diffusion.steps, FLAGS.steps)  # a bad respacing fails here, not in jit
  eps_scale = eps_scale_from_flags()
  tag = f"{FLAGS.sampler}{FLAGS.steps or config.diffusion.steps}"
  tag += f"_eta{FLAGS.eta:g}" if FLAGS.sampler == "ddim" else ""
  tag += f"_es{eps_scale[0]:g},{eps_scale[1]:g}" if eps_scale else ""
  tag += "" if FLAGS.use_ema or FLAGS.checkpoint else "_raw"
  tag += f"_step{loaded.step}" if not FLAGS.checkpoint else ""
  out_dir = FLAGS.output_dir or os.path.join(FLAGS.workdir or FLAGS.checkpoint, f"samples_{tag}_seed{FLAGS.seed}")
  return out_dir, eps_scale


def generate_from_flags(loaded):
  """Runs `generate` with the command-line flags; returns (final .npz path, output dir)."""
  out_dir, eps_scale = settings_from_flags(loaded)
  path = generate(loaded.config, loaded.params, out_dir, num_samples=FLAGS.num_samples, sampler=FLAGS.sampler,
                  respacing=FLAGS.steps, eta=FLAGS.eta, clip_denoised=FLAGS.clip_denoised,
                  per_device_batch=FLAGS.batch_size, seed=FLAGS.seed, description=loaded.description,
                  eps_scale=eps_scale)
  return path, out_dir


def load_from_flags():
  if not FLAGS.workdir and not FLAGS.checkpoint:
    raise app.UsageError("give --workdir (a training run) or --checkpoint (a converted model).")
  return load_model_params(workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint, use_ema=FLAGS.use_ema,
                           ema_rate=FLAGS.ema_rate)


def main(argv):
  del argv
  generate_from_flags(load_from_flags())


if __name__ == "__main__":
  define_flags()
  app.run(main)
