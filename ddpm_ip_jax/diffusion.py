"""Gaussian diffusion of ADM with DDPM-IP's input perturbation, as pure functions over a schedule pytree.

Everything here follows docs/method.md section 4 (the ADM `gaussian_diffusion.py`) and section 1 (DDPM-IP).
Images are NHWC; `t` is always a *respaced* index in [0, diff.num_timesteps); the network is fed the ORIGINAL
integer step `diff.timestep_map[t]`. Schedule tables are built in float64 with numpy (as the reference does) and
gathered as float32, which is exactly what the reference's `_extract_into_tensor(...).float()` gives.

The module knows nothing about Flax or training: the network is a `model_fn(x_t, t_original) -> output`.
"""
import math
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

MEAN_TYPES = ("epsilon", "start_x")
VAR_TYPES = ("learned_range", "fixed_large", "fixed_small")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")
SCHEDULES = ("linear", "cosine")

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


# ----------------------------------------------------------------------------------------------------------------
# Schedules and respacing (numpy, float64)
# ----------------------------------------------------------------------------------------------------------------

def beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
  """Betas [T] float64 of the named schedule (docs/method.md section 4)."""
  if num_timesteps < 1:
    raise ValueError(f"diffusion steps must be >= 1, got {num_timesteps}")
  if name == "linear":
    scale = 1000 / num_timesteps  # keeps the schedule's shape for any T
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
  if name == "cosine":
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), 0.999)
                     for i in range(num_timesteps)], dtype=np.float64)
  raise ValueError(f"unknown noise schedule {name!r}; expected one of {SCHEDULES}")


def space_timesteps(num_timesteps: int, spec: str) -> list[int]:
  """The original steps kept by a respacing string, sorted (docs/method.md section 4).

  "" keeps all steps; "N" or "a,b,c" splits 0..T-1 into equal sections with evenly strided steps in each;
  "ddimN" is range(0, T, stride) for the stride that gives exactly N steps.
  """
  spec = str(spec).strip()
  if not spec:
    return list(range(num_timesteps))
  if spec.startswith("ddim"):
    try:
      desired = int(spec[len("ddim"):])
    except ValueError:
      raise ValueError(f"bad respacing {spec!r}: expected 'ddimN' with an integer N") from None
    for stride in range(1, num_timesteps):
      if len(range(0, num_timesteps, stride)) == desired:
        return list(range(0, num_timesteps, stride))
    raise ValueError(f"cannot get exactly {desired} steps from {num_timesteps} with an integer stride ({spec!r})")
  try:
    counts = [int(c) for c in spec.split(",")]
  except ValueError:
    raise ValueError(f"bad respacing {spec!r}: expected 'N', 'a,b,c' or 'ddimN'") from None
  size_per, extra = divmod(num_timesteps, len(counts))
  start, steps = 0, []
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if count < 1 or count > size:
      raise ValueError(f"respacing {spec!r}: cannot take {count} steps from a section of {size} steps")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      steps.append(start + round(cur))  # float accumulation and round-half-even, as the reference
      cur += stride
    start += size
  return sorted(set(steps))


def respace_betas(betas: np.ndarray, kept_steps) -> np.ndarray:
  """Betas of the respaced process: 1 - abar_k / abar_{k_prev} over the kept steps."""
  abar = np.cumprod(1.0 - betas)
  kept = np.asarray(kept_steps)
  prev = np.concatenate([[1.0], abar[kept[:-1]]])
  return 1.0 - abar[kept] / prev


def schedule_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
  """All derived tables [T] in float64, named as in the reference (docs/method.md section 4)."""
  betas = np.asarray(betas, dtype=np.float64)
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.append(1.0, abar[:-1])
  abar_next = np.append(abar[1:], 0.0)
  posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
  # Entry 0 of the posterior variance is 0; the reference "clips" its log by repeating entry 1.
  posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
  # Fixed-large variance: beta_t, with entry 0 replaced by the posterior variance's entry 1.
  fixed_large_variance = np.append(posterior_variance[1], betas[1:])
  return {
      "betas": betas,
      "log_betas": np.log(betas),
      "alphas_cumprod": abar,
      "alphas_cumprod_prev": abar_prev,
      "alphas_cumprod_next": abar_next,
      "sqrt_alphas_cumprod": np.sqrt(abar),
      "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
      "log_one_minus_alphas_cumprod": np.log(1.0 - abar),
      "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
      "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1),
      "posterior_variance": posterior_variance,
      "posterior_log_variance_clipped": posterior_log_variance_clipped,
      "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
      "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
      "fixed_large_variance": fixed_large_variance,
      "fixed_large_log_variance": np.log(fixed_large_variance),
  }


# ----------------------------------------------------------------------------------------------------------------
# The schedule pytree
# ----------------------------------------------------------------------------------------------------------------

@flax.struct.dataclass
class Diffusion:
  """A (possibly respaced) diffusion: float32 tables [T'] plus the map to original steps [T'] int32, and what the
  network is fed for each respaced step: the original step (int32), or with rescale_timesteps the original step
  times 1000 / T (float32; improved-diffusion's `_scale_timesteps` and respace.py's `_WrappedModel`)."""
  tables: dict
  timestep_map: jnp.ndarray
  model_timesteps: jnp.ndarray
  num_timesteps: int = flax.struct.field(pytree_node=False)
  mean_type: str = flax.struct.field(pytree_node=False)
  var_type: str = flax.struct.field(pytree_node=False)
  loss_type: str = flax.struct.field(pytree_node=False)
  original_num_timesteps: int = flax.struct.field(pytree_node=False)

  @property
  def learned_sigma(self) -> bool:
    return self.var_type == "learned_range"


def make_diffusion(*, steps: int = 1000, noise_schedule: str = "linear", timestep_respacing: str = "",
                   mean_type: str = "epsilon", var_type: str = "fixed_large", loss_type: str = "mse",
                   rescale_timesteps: bool = False) -> Diffusion:
  """Builds the diffusion from plain values; `timestep_respacing` "" keeps all steps."""
  for value, allowed, what in ((mean_type, MEAN_TYPES, "mean type"), (var_type, VAR_TYPES, "variance type"),
                               (loss_type, LOSS_TYPES, "loss type")):
    if value not in allowed:
      raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")
  base = beta_schedule(noise_schedule, steps)
  kept = space_timesteps(steps, timestep_respacing)
  betas = respace_betas(base, kept)
  tables = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in schedule_tables(betas).items()}
  kept = np.asarray(kept)
  # The reference computes t.float() * (1000.0 / T) in float32.
  fed = (kept.astype(np.float32) * np.float32(1000.0 / steps)) if rescale_timesteps else kept.astype(np.int32)
  return Diffusion(tables=tables, timestep_map=jnp.asarray(kept, dtype=jnp.int32), model_timesteps=jnp.asarray(fed),
                   num_timesteps=len(kept),
                   mean_type=mean_type, var_type=var_type, loss_type=loss_type, original_num_timesteps=steps)


def create_diffusion(diffusion_config, learn_sigma: bool, timestep_respacing: str = "") -> Diffusion:
  """The diffusion of a project config (`config.diffusion`; `learn_sigma` from `config.model`)."""
  if learn_sigma:
    var_type = "learned_range"
  else:
    var_type = "fixed_small" if diffusion_config.sigma_small else "fixed_large"
  return make_diffusion(
      steps=diffusion_config.steps, noise_schedule=diffusion_config.noise_schedule,
      timestep_respacing=timestep_respacing,
      mean_type="start_x" if diffusion_config.predict_xstart else "epsilon",
      var_type=var_type, loss_type=diffusion_config.loss_type,
      rescale_timesteps=bool(diffusion_config.get("rescale_timesteps", False)))


def extract(table: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
  """table[t] shaped [B, 1, ..., 1] to broadcast against an NHWC array."""
  return table[t].reshape(t.shape + (1,) * (ndim - 1))


def _mean_flat(x: jnp.ndarray) -> jnp.ndarray:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------------------------------------------
# Forward process, input perturbation, posterior
# ----------------------------------------------------------------------------------------------------------------

def q_sample(diff: Diffusion, x_start, t, noise):
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
  d = diff.tables
  return (extract(d["sqrt_alphas_cumprod"], t, x_start.ndim) * x_start
          + extract(d["sqrt_one_minus_alphas_cumprod"], t, x_start.ndim) * noise)


GAMMA_KINDS = ("constant", "uniform", "linear")


def perturbation_gamma(kind: str, gamma: float, t, num_timesteps: int, key=None, gamma_start: float = 0.0):
  """gamma per example [B] for the input perturbation variants (t: [B] respaced steps).

  constant: gamma for every t (the paper); uniform: drawn from U(0, gamma) per example (needs `key`);
  linear: from `gamma_start` at t = 0 to `gamma` at t = T-1.
  """
  if kind == "constant":
    return jnp.full(t.shape, gamma, jnp.float32)
  if kind == "uniform":
    return jax.random.uniform(key, t.shape, jnp.float32, 0.0, gamma)
  if kind == "linear":
    frac = t.astype(jnp.float32) / max(num_timesteps - 1, 1)
    return gamma_start + (gamma - gamma_start) * frac
  raise ValueError(f"unknown input perturbation kind {kind!r}; expected one of {GAMMA_KINDS}")


def perturbed_input(diff: Diffusion, x_start, t, noise, xi, gamma):
  """DDPM-IP's network input (docs/method.md section 1, the paper's training algorithm):

    y_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) (eps + gamma xi),   xi ~ N(0, I) independent of eps.

  gamma = 0 gives plain ADM's x_t. Only the input changes: the regression target stays eps. gamma is a scalar
  or one value per example [B] (the variants of `perturbation_gamma`).
  """
  gamma = jnp.asarray(gamma, jnp.float32)
  if gamma.ndim == 1:
    gamma = gamma.reshape((-1,) + (1,) * (x_start.ndim - 1))
  return q_sample(diff, x_start, t, noise + gamma * xi)


def q_posterior_mean_variance(diff: Diffusion, x_start, x_t, t):
  """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0)."""
  d, n = diff.tables, x_t.ndim
  mean = extract(d["posterior_mean_coef1"], t, n) * x_start + extract(d["posterior_mean_coef2"], t, n) * x_t
  return mean, extract(d["posterior_variance"], t, n), extract(d["posterior_log_variance_clipped"], t, n)


def predict_xstart_from_eps(diff: Diffusion, x_t, t, eps):
  d, n = diff.tables, x_t.ndim
  return extract(d["sqrt_recip_alphas_cumprod"], t, n) * x_t - extract(d["sqrt_recipm1_alphas_cumprod"], t, n) * eps


def predict_eps_from_xstart(diff: Diffusion, x_t, t, pred_xstart):
  d, n = diff.tables, x_t.ndim
  return ((extract(d["sqrt_recip_alphas_cumprod"], t, n) * x_t - pred_xstart)
          / extract(d["sqrt_recipm1_alphas_cumprod"], t, n))


# ----------------------------------------------------------------------------------------------------------------
# The reverse process p(x_{t-1} | x_t)
# ----------------------------------------------------------------------------------------------------------------

def split_model_output(diff: Diffusion, model_output, channels: int):
  """(mean part, variance part or None) of the network output [B,H,W,C or 2C]."""
  expected = 2 * channels if diff.learned_sigma else channels
  if model_output.shape[-1] != expected:
    raise ValueError(f"model output has {model_output.shape[-1]} channels; the diffusion ({diff.var_type}) "
                     f"expects {expected} for {channels}-channel images")
  if diff.learned_sigma:
    return model_output[..., :channels], model_output[..., channels:]
  return model_output, None


def p_mean_variance(diff: Diffusion, model_output, x_t, t, clip_denoised: bool = True):
  """Mean, variance, log variance and predicted x0 of p(x_{t-1} | x_t) from the network output.

  Learned range: log sigma^2 = frac log(beta_t) + (1 - frac) log(posterior variance, clipped), frac = (v + 1)/2.
  pred_x0 is clipped to [-1, 1] when `clip_denoised` (sampling), not in the losses.
  """
  d, n = diff.tables, x_t.ndim
  out, var_values = split_model_output(diff, model_output, x_t.shape[-1])
  if diff.var_type == "learned_range":
    min_log = extract(d["posterior_log_variance_clipped"], t, n)
    max_log = extract(d["log_betas"], t, n)
    frac = (var_values + 1) / 2
    log_variance = frac * max_log + (1 - frac) * min_log
    variance = jnp.exp(log_variance)
  else:
    var_key, log_key = {"fixed_large": ("fixed_large_variance", "fixed_large_log_variance"),
                        "fixed_small": ("posterior_variance", "posterior_log_variance_clipped")}[diff.var_type]
    variance = jnp.broadcast_to(extract(d[var_key], t, n), x_t.shape)
    log_variance = jnp.broadcast_to(extract(d[log_key], t, n), x_t.shape)

  if diff.mean_type == "start_x":
    pred_xstart = out
  else:
    pred_xstart = predict_xstart_from_eps(diff, x_t, t, out)
  if clip_denoised:
    pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
  mean, _, _ = q_posterior_mean_variance(diff, pred_xstart, x_t, t)
  return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _tanh(z):
  """float32 tanh, (almost always) correctly rounded where |tanh| is near 1.

  The decoder NLL takes the difference of two CDF values near 0 or 1, so its float32 result depends on the last
  bit of tanh there. XLA's fast tanh differs from the correctly rounded value in most ulps (the loss at t = 0 then
  moves by ~1%); PyTorch's tanh is correctly rounded almost everywhere. Writing tanh = 1 - 2e/(1+e) with
  e = exp(-2|z|) makes the one rounding that matters the final subtraction from 1, which reproduces the reference.
  """
  a = jnp.abs(z)
  e = jnp.exp(-2.0 * a)
  return jnp.where(a < 0.5, jnp.tanh(z), jnp.sign(z) * (1.0 - 2.0 * e / (1.0 + e)))


def approx_standard_normal_cdf(x):
  """The tanh approximation of the standard normal CDF used by the reference."""
  return 0.5 * (1.0 + _tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log p(x) of 8-bit data in [-1, 1] under a Gaussian discretised to bins of width 2/255.

  The edge bins are open-ended (x < -0.999 takes the whole left tail, x > 0.999 the right one).
  """
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(diff: Diffusion, model_output, x_start, x_t, t, clip_denoised: bool = False):
  """The variational bound term per example [B], in bits per dimension.

  KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0, the decoder NLL -log p(x0|x_1) at t = 0.
  """
  true_mean, _, true_log_var = q_posterior_mean_variance(diff, x_start, x_t, t)
  out = p_mean_variance(diff, model_output, x_t, t, clip_denoised=clip_denoised)
  kl = _mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
  nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
  nll = _mean_flat(nll) / math.log(2.0)
  return jnp.where(t == 0, nll, kl)


def training_losses(diff: Diffusion, model_fn: ModelFn, x_start, t, noise, xi, gamma):
  """Per-example DDPM-IP training losses: dict of loss, mse, vb, each [B] float32.

  x_start, noise (eps) and xi: [B,H,W,C]; t: [B] respaced indices; gamma: the input perturbation.
  The network sees y_t = sqrt(abar) x0 + sqrt(1-abar)(eps + gamma xi); the target is eps (or x0), NOT
  eps + gamma xi; the vb term also uses y_t as "x_t" with the clean x0 (docs/method.md section 1).
  For mse losses with a fixed variance vb is 0; for kl losses mse is 0 and loss = vb (times T if rescaled).
  """
  x_t = perturbed_input(diff, x_start, t, noise, xi, gamma)
  model_output = model_fn(x_t, diff.model_timesteps[t])
  zeros = jnp.zeros(x_start.shape[:1], jnp.float32)

  if diff.loss_type in ("kl", "rescaled_kl"):
    vb = vb_terms_bpd(diff, model_output, x_start, x_t, t, clip_denoised=False)
    if diff.loss_type == "rescaled_kl":
      vb = vb * diff.num_timesteps
    return {"loss": vb, "mse": zeros, "vb": vb}

  out, var_values = split_model_output(diff, model_output, x_start.shape[-1])
  vb = zeros
  if var_values is not None:
    # The vb term trains only the variance: the mean prediction enters through a stop-gradient.
    frozen = jnp.concatenate([jax.lax.stop_gradient(out), var_values], axis=-1)
    vb = vb_terms_bpd(diff, frozen, x_start, x_t, t, clip_denoised=False)
    if diff.loss_type == "rescaled_mse":
      vb = vb * (diff.num_timesteps / 1000.0)  # the hybrid loss's weighting
  target = x_start if diff.mean_type == "start_x" else noise  # eps, not eps + gamma * xi
  mse = _mean_flat((target - out) ** 2)
  return {"loss": mse + vb, "mse": mse, "vb": vb}
