"""Exposure-bias measurements of a trained model (REFERENCE.md section 5): `python -m ddpm_ip_jax.exposure_bias`.

All three come from real images x0 [B,H,W,C] and the chain of a (respaced) diffusion:

- nu_t, the prediction error of x0: RMS of pred_x0 - x0 at every step t, (a) along the sampling chain started
  from x0 diffused to the start step, and (b) on training inputs x_t = q_sample(x0, t) (what the network was
  trained on). Exposure bias shows as (a) growing above (b) as the chain goes on.
- delta_t (the follow-up paper's measure): along the same sampling chain, the RMS spread of
  x_t - sqrt(abar_t) x0 against sqrt(1 - abar_t), the spread training assumed: delta_t = (spread - sqrt(1-abar_t))^2.
- The deterministic reconstruction test: x0 diffused to the start step, the chain run with its noise set to zero,
  mean L1 between the result and x0 (pixels in [-1, 1]).

"RMS" is the root of the mean square over examples and pixels. The chain's step noise is drawn from the key
(as in `sampling.sample_loop`); the functions are traceable and run the whole chain in one `lax.scan`.
"""
import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_ip_jax import diffusion as diffusion_lib
from ddpm_ip_jax import sampling


def _rms(x):
  return jnp.sqrt(jnp.mean(jnp.square(x)))


def sampling_chain_statistics(diff, model_fn, x0, key, *, sampler="ancestral", eta=0.0, clip_denoised=True,
                              start_step=None, zero_noise=False, eps_scale=None):
  """Diffuses x0 to the respaced `start_step` (default the last) and runs the chain back to 0.

  Returns a dict of per-step arrays [n] in chain order (t = start .. 0): `t` (respaced), `t_original`,
  `nu` (RMS of pred_x0 - x0), `spread` (RMS of x_t - sqrt(abar_t) x0), `expected_spread` (sqrt(1 - abar_t)),
  `delta`; plus `final` [B,H,W,C] (the chain's x_0) and `l1` (mean |final - x0|).
  """
  sampling.check_sampler_args(diff, sampler, eps_scale)
  start = diff.num_timesteps - 1 if start_step is None else int(start_step)
  if not 0 <= start < diff.num_timesteps:
    raise ValueError(f"start_step {start} outside [0, {diff.num_timesteps})")
  b = x0.shape[0]
  init_key, step_key = jax.random.split(key)
  x_start = diffusion_lib.q_sample(diff, x0, jnp.full((b,), start, jnp.int32),
                                   jax.random.normal(init_key, x0.shape, jnp.float32))
  sqrt_abar = diff.tables["sqrt_alphas_cumprod"]

  def body(x, i):
    t = start - i
    tb = jnp.full((b,), t, jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(step_key, i), x0.shape, jnp.float32)
    noise = jnp.zeros_like(noise) if zero_noise else noise
    x_prev, out = sampling.reverse_step(diff, model_fn(x, diff.timestep_map[tb]), x, tb, noise, sampler=sampler,
                                        eta=eta, clip_denoised=clip_denoised, eps_scale=eps_scale)
    stats = {"nu": _rms(out["pred_xstart"] - x0), "spread": _rms(x - sqrt_abar[t] * x0)}
    return x_prev, stats

  final, stats = jax.lax.scan(body, x_start, jnp.arange(start + 1))
  t = jnp.arange(start, -1, -1)
  expected = diff.tables["sqrt_one_minus_alphas_cumprod"][t]
  return {"t": t, "t_original": diff.timestep_map[t], "nu": stats["nu"], "spread": stats["spread"],
          "expected_spread": expected, "delta": (stats["spread"] - expected) ** 2, "final": final,
          "l1": jnp.mean(jnp.abs(final - x0))}


def training_prediction_error(diff, model_fn, x0, key, *, clip_denoised=True):
  """nu_t on training inputs: RMS of pred_x0 - x0 with x_t = q_sample(x0, t, fresh eps), for t = T'-1 .. 0."""
  b = x0.shape[0]

  def one(t):
    tb = jnp.full((b,), t, jnp.int32)
    x_t = diffusion_lib.q_sample(diff, x0, tb, jax.random.normal(jax.random.fold_in(key, t), x0.shape))
    out = diffusion_lib.p_mean_variance(diff, model_fn(x_t, diff.timestep_map[tb]), x_t, tb,
                                        clip_denoised=clip_denoised)
    return _rms(out["pred_xstart"] - x0)

  return jax.lax.map(one, jnp.arange(diff.num_timesteps - 1, -1, -1))


def chain_measures(diff, model_fn, x0, key, *, start_step=None, **kwargs):
  """nu_t and delta_t along the sampling chain from the respaced `start_step` (lists, ready for JSON)."""
  chain = jax.jit(lambda x, k: sampling_chain_statistics(diff, model_fn, x, k, start_step=start_step,
                                                         **kwargs))(x0, key)
  to_list = lambda a: np.asarray(a).tolist()
  return {
      "t_original": to_list(chain["t_original"]),
      "nu_sampling": to_list(chain["nu"]),
      "spread": to_list(chain["spread"]),
      "expected_spread": to_list(chain["expected_spread"]),
      "delta": to_list(chain["delta"]),
      "delta_sum": float(np.sum(chain["delta"])),
  }


def measure(diff, model_fn, x0, key, *, sampler="ancestral", eta=0.0, clip_denoised=True, eps_scale=None,
            start_step=None):
  """All three measurements on the real images x0 (numpy results, ready for JSON).

  The nu and delta chain starts at the respaced `start_step` (default: the last step); the deterministic
  reconstruction always starts at the last step.
  """
  k_chain, k_train, k_det = jax.random.split(key, 3)
  kwargs = dict(sampler=sampler, eta=eta, clip_denoised=clip_denoised, eps_scale=eps_scale)
  results = chain_measures(diff, model_fn, x0, k_chain, start_step=start_step, **kwargs)
  det = jax.jit(lambda x, k: sampling_chain_statistics(diff, model_fn, x, k, zero_noise=True, **kwargs))(x0, k_det)
  nu_train = jax.jit(lambda x, k: training_prediction_error(diff, model_fn, x, k,
                                                            clip_denoised=clip_denoised))(x0, k_train)
  # Chain order, T'-1 .. 0: keep the chain's steps only.
  results["nu_training"] = np.asarray(nu_train)[-len(results["t_original"]):].tolist()
  results["reconstruction_l1"] = float(det["l1"])
  return results


def plot(results, path, title=""):
  """Two panels: nu_t (sampling vs training) and the spread of x_t against sqrt(1 - abar_t); PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  t = np.asarray(results["t_original"])
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  axes[0].plot(t, results["nu_sampling"], label="sampling chain")
  axes[0].plot(t, results["nu_training"], "--", label="training inputs")
  axes[0].set(xlabel="t", ylabel="RMS(pred x0 - x0)", title="prediction error nu_t")
  axes[1].plot(t, results["spread"], label="sampling: RMS(x_t - sqrt(abar) x0)")
  axes[1].plot(t, results["expected_spread"], "--", label="training: sqrt(1 - abar)")
  axes[1].set(xlabel="t", title=f"delta: sum {results['delta_sum']:.3g}; reconstruction L1 "
                                f"{results['reconstruction_l1']:.3g}")
  for ax in axes:
    ax.invert_xaxis()
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


FLAGS = flags.FLAGS


def define_flags():
  from ddpm_ip_jax import sample as sample_lib  # pylint: disable=import-outside-toplevel
  sample_lib.define_model_flags()
  sample_lib.define_sampler_flags(default_steps="100")
  flags.DEFINE_string("output", None, "Output prefix; writes <output>.json and <output>.png "
                      "(default <workdir>/exposure_bias_<sampler><steps>).")
  flags.DEFINE_integer("num_images", 256, "Real images from the config's dataset.")
  flags.DEFINE_integer("start_step", None, "Respaced step the nu/delta chain starts from (default: the last).")


def main(argv):
  del argv
  from ddpm_ip_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  from ddpm_ip_jax import models  # pylint: disable=import-outside-toplevel
  from ddpm_ip_jax import sample as sample_lib  # pylint: disable=import-outside-toplevel
  loaded = sample_lib.load_from_flags()
  config, params, description = loaded.config, loaded.params, loaded.description
  if config.model.num_classes > 0:
    raise app.UsageError("exposure-bias measurements of class-conditional models are not supported yet.")
  eps_scale = sample_lib.eps_scale_from_flags()
  diff = diffusion_lib.create_diffusion(config.diffusion, learn_sigma=config.model.learn_sigma,
                                        timestep_respacing=FLAGS.steps)
  input_pipeline.check_dataset(config.data, config.model.image_size)
  images = input_pipeline.load_images(config.data, config.model.image_size, max_images=FLAGS.num_images)
  x0 = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  model = models.create_model(config)
  model_fn = lambda x, t: model.apply({"params": params}, x, t, train=False)
  results = measure(diff, model_fn, x0, jax.random.key(FLAGS.seed), sampler=FLAGS.sampler, eta=FLAGS.eta,
                    clip_denoised=FLAGS.clip_denoised, eps_scale=eps_scale, start_step=FLAGS.start_step)
  results["settings"] = dict(model=description, num_images=int(x0.shape[0]), sampler=FLAGS.sampler,
                             steps=FLAGS.steps, eta=FLAGS.eta, eps_scale=eps_scale, seed=FLAGS.seed,
                             start_step=FLAGS.start_step)
  output = FLAGS.output or os.path.join(FLAGS.workdir or FLAGS.checkpoint,
                                        f"exposure_bias_{FLAGS.sampler}{FLAGS.steps or 'all'}")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output + ".json", "w") as f:
    json.dump(results, f, indent=1)
  plot(results, output + ".png", title=description)
  logging.info("delta sum %.4g, reconstruction L1 %.4g; wrote %s.json/.png", results["delta_sum"],
               results["reconstruction_l1"], output)


if __name__ == "__main__":
  define_flags()
  app.run(main)
