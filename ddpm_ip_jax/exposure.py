"""Exposure-bias measurements of a trained model (docs/method.md section 5); the command is
`python -m ddpm_ip_jax.exposure_bias`.

The authors' two (side branches of the reference repository), on the full (not respaced) diffusion, are the
primary ones:

- one-step nu_t (`gaussian_error`): real x0 diffused with q_sample to t = 0, s, 2s, ... (s = T / 100: t = 0, 10,
  ..., 990 for T = 1000), the network called once, pred_x0 clipped to [-1, 1]; nu_t = the per-pixel standard
  deviation (ddof 0) of pred_x0 - x0 over the batch, averaged over pixels.
- the deterministic reconstruction (`exposure_bias_deterministic`): x0 diffused to t = 0.6 T - 1 (599 for
  T = 1000), the ancestral chain run back to 0 with its noise dropped (each step is the posterior mean), mean
  |x0_hat - x0| in [-1, 1] units.

The chain-based ones, from real images x0 [B,H,W,C] and the chain of a (respaced) diffusion:

- nu_t, the prediction error of x0: RMS of pred_x0 - x0 at every step t, (a) along the sampling chain started
  from x0 diffused to the start step, and (b) on training inputs x_t = q_sample(x0, t) (what the network was
  trained on). Exposure bias shows as (a) growing above (b) as the chain goes on.
- delta_t (the follow-up paper's measure): along the same sampling chain, the RMS spread of
  x_t - sqrt(abar_t) x0 against sqrt(1 - abar_t), the spread training assumed: delta_t = (spread - sqrt(1-abar_t))^2.
- The chain reconstruction: x0 diffused to the chain's last step, the chain run with its noise set to zero, mean
  L1 between the result and x0 (pixels in [-1, 1]); `chain_reconstruction_l1`.

"RMS" is the root of the mean square over examples and pixels. The chains are the sampler's own loop
(`sampling.run_chain`) with a per-step hook, and the step noise is drawn from the key as the sampler draws it.
`make_measure_fns` compiles them with the network parameters as arguments: the weights are never compiled in
as constants, and one compiled chain serves every model of the same architecture.
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_ip_jax import diffusion as diffusion_lib
from ddpm_ip_jax import sampling


def _rms(x):
  return jnp.sqrt(jnp.mean(jnp.square(x)))


def sampling_chain_statistics(diff, model_fn, x0, key, *, sampler="ancestral", eta=0.0, clip_denoised=True,
                              start_step=None, zero_noise=False, eps_scale=None):
  """Diffuses x0 to the respaced `start_step` (default the last) and runs the chain back to 0. Traceable.

  `zero_noise` (a bool, or a traced scalar) drops the step noise: the deterministic chain. Returns a dict of
  per-step arrays [n] in chain order (t = start .. 0): `t` (respaced), `t_original`, `nu` (RMS of pred_x0 - x0),
  `spread` (RMS of x_t - sqrt(abar_t) x0), `expected_spread` (sqrt(1 - abar_t)), `delta`; plus `final`
  [B,H,W,C] (the chain's x_0) and `l1` (mean |final - x0|).
  """
  start = sampling.chain_start(diff, start_step)
  init_key, step_key = jax.random.split(key)
  x_start = diffusion_lib.q_sample(diff, x0, jnp.full((x0.shape[0],), start, jnp.int32),
                                   jax.random.normal(init_key, x0.shape, jnp.float32))
  sqrt_abar = diff.tables["sqrt_alphas_cumprod"]

  def observe(t, x, out):
    return {"nu": _rms(out["pred_xstart"] - x0), "spread": _rms(x - sqrt_abar[t[0]] * x0)}

  final, stats = sampling.run_chain(diff, model_fn, x_start, step_key, start_step=start, sampler=sampler, eta=eta,
                                    clip_denoised=clip_denoised, eps_scale=eps_scale,
                                    noise_scale=1.0 - jnp.asarray(zero_noise, jnp.float32), observe=observe)
  t = jnp.arange(start, -1, -1)
  expected = diff.tables["sqrt_one_minus_alphas_cumprod"][t]
  return {"t": t, "t_original": diff.timestep_map[t], "nu": stats["nu"], "spread": stats["spread"],
          "expected_spread": expected, "delta": (stats["spread"] - expected) ** 2, "final": final,
          "l1": jnp.mean(jnp.abs(final - x0))}


def _prediction_errors(diff, model_fn, x0, key, steps, reduce, clip_denoised):
  """reduce(pred_x0 - x0) [len(steps)] with x_t = q_sample(x0, t, eps drawn from fold_in(key, t)) for each step
  t of `steps`: one network call per step, on the inputs training sees."""
  b = x0.shape[0]

  def one(t):
    tb = jnp.full((b,), t, jnp.int32)
    x_t = diffusion_lib.q_sample(diff, x0, tb, jax.random.normal(jax.random.fold_in(key, t), x0.shape))
    out = diffusion_lib.p_mean_variance(diff, model_fn(x_t, diff.model_timesteps[tb]), x_t, tb,
                                        clip_denoised=clip_denoised)
    return reduce(out["pred_xstart"] - x0)

  return jax.lax.map(one, steps)


def training_prediction_error(diff, model_fn, x0, key, *, clip_denoised=True):
  """nu_t on training inputs: RMS of pred_x0 - x0 with x_t = q_sample(x0, t, fresh eps), for t = T'-1 .. 0."""
  return _prediction_errors(diff, model_fn, x0, key, jnp.arange(diff.num_timesteps - 1, -1, -1), _rms,
                            clip_denoised)


def one_step_error(diff, model_fn, x0, key, *, stride=None, clip_denoised=True):
  """The authors' one-step nu_t: (t [n], nu [n]) for t = 0, stride, 2 stride, ... < T (stride default T // 100,
  at least 1) on `diff` (the full diffusion): per-pixel std over the batch (ddof 0) of pred_x0 - x0, averaged."""
  stride = stride or max(1, diff.num_timesteps // 100)
  steps = jnp.arange(0, diff.num_timesteps, stride, dtype=jnp.int32)
  nu = _prediction_errors(diff, model_fn, x0, key, steps, lambda err: jnp.mean(jnp.std(err, axis=0)), clip_denoised)
  return diff.timestep_map[steps], nu


def reconstruction_start(diff):
  """The authors' start of the deterministic reconstruction: 0.6 T - 1 (599 for T = 1000)."""
  return max(0, int(0.6 * diff.num_timesteps) - 1)


@dataclasses.dataclass(frozen=True)
class DataStartFns:
  """The measurements that start from the data (x0 noised by the forward process: the DDPM-IP authors' own),
  compiled for the full diffusion and a network; params are traced arguments.

  one_step(params, x0, key) -> `one_step_error`; reconstruction(params, x0, key) -> the deterministic chain's
  statistics from `reconstruction_start` (`sampling_chain_statistics`, ancestral, noise dropped)."""
  one_step: Callable
  reconstruction: Callable
  start: int


def make_data_start_fns(full_diff, apply_fn, *, clip_denoised=True):
  """`DataStartFns` for apply_fn(params, x_t, t) -> network output; `full_diff` must not be respaced."""
  if full_diff.num_timesteps != full_diff.original_num_timesteps:
    raise ValueError("the authors' measurements run on the full diffusion, not a respaced one")
  start = reconstruction_start(full_diff)

  def one_step(params, x0, key):
    return one_step_error(full_diff, lambda x, t: apply_fn(params, x, t), x0, key, clip_denoised=clip_denoised)

  def reconstruction(params, x0, key):
    return sampling_chain_statistics(full_diff, lambda x, t: apply_fn(params, x, t), x0, key,
                                     clip_denoised=clip_denoised, start_step=start, zero_noise=True)

  return DataStartFns(one_step=jax.jit(one_step), reconstruction=jax.jit(reconstruction), start=start)


def data_start_measures(fns, params, x0, key):
  """The one-step nu_t and the deterministic reconstruction L1, both started from noised data (the authors'
  measures; numpy results, ready for JSON)."""
  k_one, k_rec = jax.random.split(key)
  t, nu = fns.one_step(params, x0, k_one)
  rec = fns.reconstruction(params, x0, k_rec)
  return {"nu_one_step_t": np.asarray(t).tolist(), "nu_one_step": np.asarray(nu).tolist(),
          "nu_one_step_mean": float(np.mean(nu)), "reconstruction_start": int(fns.start),
          "reconstruction_l1": float(rec["l1"])}


@dataclasses.dataclass(frozen=True)
class MeasureFns:
  """The measurements compiled for one diffusion, network and sampler; params are traced arguments.

  chain(params, x0, key, zero_noise, start_step=None) -> `sampling_chain_statistics` (compiled once per
  start step: the noisy and the deterministic chain share it); training_error(params, x0, key) ->
  `training_prediction_error`."""
  chain: Callable
  training_error: Callable


def make_measure_fns(diff, apply_fn, *, sampler="ancestral", eta=0.0, clip_denoised=True, eps_scale=None):
  """`MeasureFns` for apply_fn(params, x_t, t_original) -> network output (e.g. a Flax model's apply)."""
  sampling.check_sampler_args(diff, sampler, eps_scale)

  def chain(params, x0, key, zero_noise, start_step=None):
    return sampling_chain_statistics(diff, lambda x, t: apply_fn(params, x, t), x0, key, sampler=sampler,
                                     eta=eta, clip_denoised=clip_denoised, start_step=start_step,
                                     zero_noise=zero_noise, eps_scale=eps_scale)

  def training_error(params, x0, key):
    return training_prediction_error(diff, lambda x, t: apply_fn(params, x, t), x0, key,
                                     clip_denoised=clip_denoised)

  return MeasureFns(chain=jax.jit(chain, static_argnames="start_step"), training_error=jax.jit(training_error))


def chain_measures(fns, params, x0, key, *, start_step=None):
  """nu_t and delta_t along the sampling chain from the respaced `start_step` (lists, ready for JSON)."""
  chain = fns.chain(params, x0, key, False, start_step=start_step)
  to_list = lambda a: np.asarray(a).tolist()
  return {
      "t_original": to_list(chain["t_original"]),
      "nu_sampling": to_list(chain["nu"]),
      "spread": to_list(chain["spread"]),
      "expected_spread": to_list(chain["expected_spread"]),
      "delta": to_list(chain["delta"]),
      "delta_sum": float(np.sum(chain["delta"])),
  }


def measure(fns, params, x0, key, *, start_step=None):
  """The chain-based measurements on the real images x0 (numpy results, ready for JSON).

  The nu and delta chain starts at the respaced `start_step` (default: the last step); the chain
  reconstruction always starts at the last step.
  """
  k_chain, k_train, k_det = jax.random.split(key, 3)
  results = chain_measures(fns, params, x0, k_chain, start_step=start_step)
  det = fns.chain(params, x0, k_det, True, start_step=None)  # the same call signature: one compiled chain
  nu_train = fns.training_error(params, x0, k_train)
  # Chain order, T'-1 .. 0: keep the chain's steps only.
  results["nu_training"] = np.asarray(nu_train)[-len(results["t_original"]):].tolist()
  results["chain_reconstruction_l1"] = float(det["l1"])
  return results


class NonFiniteResultsError(ValueError):
  """Measurements came out NaN/Inf: nothing is written for them (as the sampled images are)."""


def _numbers(value):
  """The numbers in `value` (a number, or nested lists/tuples/arrays of them) as floats; strings, None and bools
  are no numbers."""
  if isinstance(value, (list, tuple)):
    for v in value:
      yield from _numbers(v)
  elif isinstance(value, np.ndarray) and value.dtype.kind in "iuf":
    yield from value.astype(np.float64).ravel()
  elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
    yield float(value)


def non_finite(results, prefix=""):
  """[(key, NaN/Inf count, count)] for each entry of the nested dicts `results` whose numbers are not all finite;
  keys are dotted paths ("samples.ancestral/10.fid")."""
  found = []
  for key, value in results.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      found += non_finite(value, name + ".")
      continue
    numbers = np.fromiter(_numbers(value), np.float64)
    bad = int(np.sum(~np.isfinite(numbers)))
    if bad:
      found.append((name, bad, numbers.size))
  return found


def check_finite(results, what, unwritten):
  """`NonFiniteResultsError` naming the entries of `results` (nested dicts of numbers and lists, ready for JSON)
  that hold NaN/Inf, and saying that `unwritten` (the output) was not written; a no-op when all are finite."""
  found = non_finite(results)
  if not found:
    return
  listed = ", ".join(f"{key} ({bad} of {n})" if n > 1 else key for key, bad, n in found[:6])
  more = f" and {len(found) - 6} more" if len(found) > 6 else ""
  raise NonFiniteResultsError(
      f"{what}: {sum(bad for _, bad, _ in found)} values came out NaN/Inf: {listed}{more}; {unwritten} was not "
      f"written. {sampling.NON_FINITE_CAUSES}")

