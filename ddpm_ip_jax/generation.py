"""Many samples on all devices, resumably: the pmapped whole-chain sampler and its part files.

Sample i is drawn from `fold_in(key(seed), i)` alone, so the images are the same for any number of devices,
hosts or batch size. `generate` writes finished batches as `<out>/parts/<start>-<end>.npz` (atomically) and
continues after the last finished batch when rerun; the result is `<out>/samples_<N>x<H>x<W>x<C>.npz` with key
`arr_0` (uint8 NHWC, the format of OpenAI's evaluator; `arr_1` holds the labels of a class-conditional model)
and a PNG grid. Ctrl-C or SIGTERM stops after the batch in progress (`interrupts`: one line saying how many
samples the parts keep, exit 130 or 143); the same call again resumes. `sample_in_memory` draws without files
(the periodic FID during training).
"""
import contextlib
import functools
import json
import re
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from ddpm_ip_jax import diffusion as diffusion_lib
from ddpm_ip_jax import fileio
from ddpm_ip_jax import images as images_lib
from ddpm_ip_jax import interrupts
from ddpm_ip_jax import models
from ddpm_ip_jax import ownership
from ddpm_ip_jax import sampling
from ddpm_ip_jax import workdir as workdir_lib

PART_RE = re.compile(r"^(\d{8})-(\d{8})\.npz$")


@functools.lru_cache(maxsize=8)
def pmapped_sampler(config_json, respacing, sampler, eta, clip_denoised, seed, devices, eps_scale, labels=None):
  """p_sample(params, indices [devices, b]) -> (uint8 images [devices, b, H, W, C], labels [devices, b],
  finite [devices, b]: whether the sample's float image had no NaN/Inf before the uint8 conversion).

  A class-conditional model draws sample i's class uniformly from its key (as the reference's sampling script
  draws them), or, with `labels` (a tuple of classes), takes labels[i % len(labels)].

  Cached on the settings, so repeated calls in one process (resumes, periodic evaluation) compile once.
  """
  config = workdir_lib.config_from_json(config_json)
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
    if labels:
      y = jnp.asarray(labels, jnp.int32)[indices % len(labels)]
    elif num_classes:
      y = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_classes))(label_keys)
    else:
      y = None
    model_fn = lambda x, t: model.apply({"params": params}, x, t, y=y, train=False)
    x0 = sampling.sample_loop(diff, model_fn, chain_keys, (indices.shape[0], size, size, channels),
                              sampler=sampler, eta=eta, clip_denoised=clip_denoised, eps_scale=eps_scale)
    drawn = y if num_classes else jnp.zeros_like(indices)
    return images_lib.to_uint8(x0), drawn, jnp.all(jnp.isfinite(x0), axis=(1, 2, 3))

  return jax.pmap(device_fn, in_axes=(None, 0), devices=devices)


def check_sample_labels(config, labels):
  """ValueError unless `labels` (classes to sample, or empty) suit the model of `config`."""
  if not labels:
    return
  num_classes = int(config.model.num_classes)
  if num_classes == 0:
    raise ValueError(f"labels {list(labels)} given, but the model is not class-conditional.")
  bad = [y for y in labels if not 0 <= int(y) < num_classes]
  if bad:
    raise ValueError(f"labels {bad} outside [0, {num_classes}): the model has {num_classes} classes.")


def create_pmapped_sampler(config, *, respacing="", sampler="ancestral", eta=0.0, clip_denoised=True, seed=0,
                           devices=None, eps_scale=None, labels=None):
  """`pmapped_sampler` for a config object and plain settings (devices: default all local devices)."""
  check_sample_labels(config, labels)
  return pmapped_sampler(config.to_json(), respacing, sampler, float(eta), bool(clip_denoised), int(seed),
                         tuple(devices or jax.local_devices()),
                         tuple(map(float, eps_scale)) if eps_scale else None,
                         tuple(int(y) for y in labels) if labels else None)


class NonFiniteSamplesError(ValueError):
  """Samples came out NaN/Inf: as uint8 they would be black images, so nothing is written for them."""


def draw_samples(p_sample, params, start, num_devices, per_device_batch):
  """Samples start .. start + num_devices * per_device_batch - 1 of `p_sample` (a `pmapped_sampler`):
  (uint8 images [n, H, W, C], labels [n]); `NonFiniteSamplesError` if any came out NaN/Inf."""
  indices = np.arange(start, start + num_devices * per_device_batch, dtype=np.int32)
  images, labels, finite = jax.device_get(p_sample(params, indices.reshape(num_devices, per_device_batch)))
  finite = finite.reshape(-1)
  if not finite.all():
    bad = indices[~finite]
    raise NonFiniteSamplesError(
        f"{bad.size} of the {finite.size} samples {start}..{indices[-1]} came out NaN/Inf (first: sample "
        f"{bad[0]}); nothing was written for them. {sampling.NON_FINITE_CAUSES}")
  return images.reshape((-1,) + images.shape[2:]), labels.reshape(-1)


def sample_in_memory(config, params, *, num_samples, respacing, per_device_batch, seed=0, sampler="ancestral"):
  """uint8 samples [N,H,W,C] of `params` on the local devices, kept in memory (no files): for periodic FID."""
  devices = jax.local_devices()
  p_sample = create_pmapped_sampler(config, respacing=respacing, sampler=sampler, seed=seed, devices=devices)
  per_call = per_device_batch * len(devices)
  images = [draw_samples(p_sample, params, start, len(devices), per_device_batch)[0]
            for start in range(0, num_samples, per_call)]
  return np.concatenate(images)[:num_samples]


def finished_prefix(parts_dir):
  """How many samples, from index 0 on, the part files in `parts_dir` already hold contiguously."""
  ranges = sorted(tuple(map(int, m.groups())) for m in map(PART_RE.match, fileio.listdir(parts_dir)) if m)
  done = 0
  for start, end in ranges:
    if start > done:
      break
    done = max(done, end)
  return done


DAMAGED_SUFFIX = ".damaged"


def load_part(path, size, channels):
  """{"images": uint8 [n, size, size, channels], "labels": [n]} of the part file `path` (`<start>-<end>.npz`,
  n = end - start), checked (`fileio.load_npz_checked`): a DamagedFileError naming it when it is not that."""
  start, end = map(int, PART_RE.match(str(path).rstrip("/").rsplit("/", 1)[-1]).groups())
  n = end - start
  return fileio.load_npz_checked(path, "the sample part", {"images": ("u", (n, size, size, channels)),
                                                           "labels": ("iu", (n,))})


def _aside_name(name, taken):
  """`<name>.damaged`, or `.damaged.1`, `.damaged.2`, ... where earlier damaged copies are in `taken`."""
  candidates = (f"{name}{DAMAGED_SUFFIX}" + (f".{i}" if i else "") for i in range(len(taken) + 1))
  return next(c for c in candidates if c not in taken)


def set_aside_damaged_parts(parts_dir, size, channels):
  """Reads every part file of `parts_dir` (`load_part`); each one that is damaged (truncated, empty, garbage,
  arrays of the wrong shape) is renamed to `<name>.damaged` (`_aside_name`), with one warning naming it, so that
  `finished_prefix` stops before it and `generate` draws its samples again: sample i comes from
  fold_in(key(seed), i) alone, so the redrawn part holds the same images. Returns the names set aside."""
  damaged, names = [], set(fileio.listdir(parts_dir))
  for name in sorted(n for n in names if PART_RE.match(n)):
    path = fileio.join(parts_dir, name)
    try:
      load_part(path, size, channels)
    except fileio.DamagedFileError as e:
      aside = _aside_name(name, names)
      fileio.rename(path, fileio.join(parts_dir, aside))
      logging.warning("Set aside %s as %s; its samples are drawn again. %s", path, aside, e)
      damaged.append(name)
  return damaged


def _check_settings(out_dir, settings):
  """Refuses to mix samples of different settings in one output directory; returns the path of sampling.json
  when this call wrote it (a new output directory), else None."""
  path = fileio.join(out_dir, "sampling.json")
  if fileio.exists(path):
    previous = fileio.load_json_checked(path, "the sampling settings", dict,
                                        hint="Use another --output_dir, or delete this one to start over.")
    if previous != settings:
      raise ValueError(f"{out_dir} holds samples made with other settings:\n  {previous}\nnow:\n  {settings}\n"
                       "Use another --output_dir, or delete it to start over.")
    return None
  fileio.write_text(path, json.dumps(settings, indent=2, sort_keys=True))
  return path


@contextlib.contextmanager
def _undone_if_nothing_drawn(parts_dir, settings_written, parts_made):
  """On an exception out of the block while the parts folder holds no file (a failed first batch: NaN weights,
  say), removes what this call made (the sampling.json it wrote, the parts folder it created), so that the output
  directory is left as it was."""
  try:
    yield
  except BaseException:
    if not fileio.listdir(parts_dir):
      if parts_made:
        fileio.remove_tree(parts_dir)
      if settings_written:
        fileio.remove(settings_written)
    raise


def generate(config, params, out_dir, *, num_samples, sampler="ancestral", respacing="", eta=0.0,
             clip_denoised=True, per_device_batch=16, seed=0, devices=None, description="", eps_scale=None,
             labels=None):
  """Writes (or completes) `num_samples` samples into `out_dir`; returns the path of the final `.npz`.

  Multi-host: every host computes its slice of each global batch and writes its own part files (a shared
  filesystem is assumed); process 0 writes the final file once all parts are there.
  """
  devices = devices or jax.local_devices()
  settings = dict(model=description, num_samples=num_samples, sampler=sampler, respacing=respacing, eta=eta,
                  clip_denoised=clip_denoised, seed=seed, eps_scale=list(eps_scale) if eps_scale else None)
  if labels:  # the classes asked for; without them the classes are drawn uniformly (or the model is unconditional)
    settings["labels"] = [int(y) for y in labels]
  chief = jax.process_index() == 0
  settings_written = _check_settings(out_dir, settings) if chief else None
  parts_dir = fileio.join(out_dir, "parts")
  parts_made = chief and not fileio.exists(parts_dir)
  fileio.makedirs(parts_dir)
  with _undone_if_nothing_drawn(parts_dir, settings_written, parts_made):
    p_sample = create_pmapped_sampler(config, respacing=respacing, sampler=sampler, eta=eta,
                                      clip_denoised=clip_denoised, seed=seed, devices=devices,
                                      eps_scale=eps_scale, labels=labels)
    return _generate(config, params, p_sample, out_dir, parts_dir, num_samples, per_device_batch, len(devices))


def _generate(config, params, p_sample, out_dir, parts_dir, num_samples, per_device_batch, n_local):
  """`generate`'s sampling into `parts_dir` (resumed where it holds parts) and its final file."""
  hosts, host = jax.process_count(), jax.process_index()
  per_host = per_device_batch * n_local
  global_batch = per_host * hosts
  size, channels = config.model.image_size, config.model.in_channels
  num_classes = int(config.model.num_classes)
  final = fileio.join(out_dir, f"samples_{num_samples}x{size}x{size}x{channels}.npz")
  if host == 0:  # a damaged part file is drawn again; every host resumes from the prefix process 0 sees
    set_aside_damaged_parts(parts_dir, size, channels)
  start = finished_prefix(parts_dir)
  if hosts > 1:  # every host resumes from the same sample: the prefix that all of them see
    start = int(np.min(multihost_utils.process_allgather(np.int32(start))))
  first = start
  if start:
    logging.info("Resuming: %d of %d samples already in %s.", min(start, num_samples), num_samples, parts_dir)
  t0 = time.monotonic()
  kept = lambda done: (f"{min(done, num_samples)} of {num_samples} samples kept in {parts_dir}; run the same "
                       "command again to resume")
  with interrupts.watch():  # Ctrl-C / SIGTERM: stop after the batch in progress, its part written
    interrupts.note(kept(start))
    while start < num_samples:
      host_start = start + host * per_host
      images, labels = draw_samples(p_sample, params, host_start, n_local, per_device_batch)
      end = min(host_start + per_host, num_samples)
      if end > host_start:  # the last batch may run past num_samples: keep only what is asked for
        keep = end - host_start
        fileio.save_npz(fileio.join(parts_dir, f"{host_start:08d}-{end:08d}.npz"), images=images[:keep],
                        labels=labels[:keep])
      start += global_batch
      rate = (min(start, num_samples) - first) / (time.monotonic() - t0)
      logging.info("%d/%d samples, %.2f samples/s, ETA %.0f s", min(start, num_samples), num_samples, rate,
                   max(num_samples - start, 0) / rate)
      if start < num_samples:  # (after the last batch the final file is written: a few seconds)
        interrupts.check(kept(start))
    interrupts.note(f"all {num_samples} samples kept in {parts_dir}; run the same command again to write "
                    f"{final}")

  if hosts > 1:
    multihost_utils.sync_global_devices("ddpm_ip_jax.generation: all parts written")
  if host == 0:
    _merge_parts(parts_dir, final, num_samples, num_classes > 0, size, channels)
    samples = fileio.load_npz_checked(final, "the samples file", {"arr_0": ("u", (num_samples, size, size, channels))})
    grid = images_lib.make_grid(samples["arr_0"][:64])
    images_lib.save_png(fileio.join(out_dir, "samples_grid.png"), grid, upscale=max(1, 64 // size))
    logging.info("Wrote %s", final)
  return final


def generate_into(loaded, settings, out_dir, *, what, num_samples, per_device_batch, seed, labels=None, owned=None):
  """`generate` with a `workdir.LoadedModel` and its chain `settings` (`sample_settings.chain_settings`) into
  `out_dir` (`what` names it in messages), holding the directory's lock (`ownership`; process 0) while it samples,
  or, given an ExitStack `owned`, until that closes (evaluate keeps it while it scores)."""
  with contextlib.ExitStack() as here:
    (here if owned is None else owned).enter_context(ownership.hold(out_dir, what, chief=jax.process_index() == 0))
    return generate(loaded.config, loaded.params, out_dir, num_samples=num_samples, per_device_batch=per_device_batch,
                    seed=seed, description=loaded.description, labels=labels, **settings)


def _merge_parts(parts_dir, final, num_samples, with_labels, size, channels):
  """Writes the samples file `final` from the part files (each read checked, `load_part`)."""
  images, labels, done = [], [], 0
  for name in [n for n in fileio.listdir(parts_dir) if PART_RE.match(n)]:
    start, end = map(int, PART_RE.match(name).groups())
    if end <= done:
      continue  # a batch covered twice (e.g. rerun with another batch size): keep the first copy
    part = load_part(fileio.join(parts_dir, name), size, channels)
    images.append(part["images"][done - start:])
    labels.append(part["labels"][done - start:])
    done = end
  if done < num_samples:
    raise RuntimeError(f"only {done} of {num_samples} samples in {parts_dir}")
  arrays = {"arr_0": np.concatenate(images)[:num_samples]}
  if with_labels:
    arrays["arr_1"] = np.concatenate(labels)[:num_samples]
  fileio.save_npz(final, **arrays)
