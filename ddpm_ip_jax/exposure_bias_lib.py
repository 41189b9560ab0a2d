"""The exposure-bias measurements of one trained model, wired once for `python -m ddpm_ip_jax.exposure_bias` and
the study (`study_lib.run_one`): the network of a config, the authors' measures on its full diffusion, the
chain's measures on a respaced one and chains from intermediate start steps (what each measures: `exposure`); and
the plot of them.
"""
import numpy as np

from ddpm_ip_jax import diffusion as diffusion_lib
from ddpm_ip_jax import exposure
from ddpm_ip_jax import fileio
from ddpm_ip_jax import models


def measure_model(config, params, x0, *, respacing, key_authors, key_chain, sampler="ancestral", eta=0.0,
                  clip_denoised=True, eps_scale=None, start_step=None, from_steps=(), key_from=None, check=None):
  """The exposure-bias measurements of the model of `config` with `params` on the real images x0 (model range).

  Returns {"authors": `exposure.data_start_measures` (key_authors), "chain": `exposure.measure` on the chain of
  `respacing`/`sampler` from the respaced `start_step` (key_chain), "from": {str(s): `exposure.chain_measures`
  from each respaced step s of `from_steps` (key_from)}}. `check()` is called after the authors' and after the
  chain's measurements (e.g. `interrupts.check`: a signal stops between them).
  """
  check = check or (lambda: None)
  model = models.create_model(config)
  apply_fn = lambda p, x, t: model.apply({"params": p}, x, t, train=False)  # noqa: E731
  full = diffusion_lib.create_diffusion(config.diffusion, learn_sigma=config.model.learn_sigma)
  diff = diffusion_lib.create_diffusion(config.diffusion, learn_sigma=config.model.learn_sigma,
                                        timestep_respacing=respacing)
  fns = exposure.make_measure_fns(diff, apply_fn, sampler=sampler, eta=eta, clip_denoised=clip_denoised,
                                  eps_scale=eps_scale)
  authors = exposure.data_start_measures(exposure.make_data_start_fns(full, apply_fn), params, x0, key_authors)
  check()
  chain = exposure.measure(fns, params, x0, key_chain, start_step=start_step)
  check()
  # From an intermediate step the chain still knows its x0, so nu and delta show the model's own drift rather
  # than the spread of the data (which dominates a chain started from pure noise).
  starts = {str(s): exposure.chain_measures(fns, params, x0, key_from, start_step=s) for s in from_steps}
  return {"authors": authors, "chain": chain, "from": starts}


def plot(results, path, title=""):
  """Three panels: the authors' one-step nu_t, the chain's nu_t (sampling vs training inputs) and the spread of
  x_t against sqrt(1 - abar_t); a PNG at `path`."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  t = np.asarray(results["t_original"])
  authors = "nu_one_step" in results  # (chain-only results: two panels)
  fig, axes = plt.subplots(1, 3 if authors else 2, figsize=(15 if authors else 10, 4))
  if authors:
    axes[0].plot(results["nu_one_step_t"], results["nu_one_step"])
    axes[0].set(xlabel="t", ylabel="std over the batch of pred x0 - x0",
                title=f"one-step nu_t; reconstruction L1 from t = {results['reconstruction_start']}: "
                      f"{results['reconstruction_l1']:.3g}")
  else:
    axes = np.concatenate([[None], axes])
  axes[1].plot(t, results["nu_sampling"], label="sampling chain")
  axes[1].plot(t, results["nu_training"], "--", label="training inputs")
  axes[1].set(xlabel="t", ylabel="RMS(pred x0 - x0)", title="nu_t along the chain")
  axes[2].plot(t, results["spread"], label="sampling: RMS(x_t - sqrt(abar) x0)")
  axes[2].plot(t, results["expected_spread"], "--", label="training: sqrt(1 - abar)")
  axes[2].set(xlabel="t", title=f"delta: sum {results['delta_sum']:.3g}; chain reconstruction L1 "
                                f"{results['chain_reconstruction_l1']:.3g}")
  for ax in axes[0 if authors else 1:]:
    ax.invert_xaxis()
  for ax in axes[1:]:
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fileio.save_figure(fig, path, dpi=100)
  plt.close(fig)
