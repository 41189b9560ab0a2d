"""Reverse-diffusion samplers: ancestral (DDPM) and DDIM, the whole chain in one compiled loop (`run_chain`).

docs/method.md section 4. The chain runs over the respaced indices T'-1 .. 0 of `diff`; the network is fed the
original steps. Randomness: x_T ~ N(0, I) from one half of the key, and the noise of loop iteration i (i = 0 is
the first step, at t = T'-1) from `fold_in(other half, i)`, so a sample depends only on the key. With one key
per example (a key array [B]) each sample depends only on its own key, whatever the batch it runs in: this
is what makes multi-device sampling give the same images for any device count. Given `step_noise`
[T', B, H, W, C] (in drawing order) and `x_T`, the chain is fully determined by them instead: this is how the
parity tests replay the reference's random numbers.
"""
import jax
import jax.numpy as jnp

from ddpm_ip_jax import diffusion as diffusion_lib

# Why samples or measurements come out NaN/Inf: the end of the one line that refuses them (generation's samples,
# exposure's measurements).
NON_FINITE_CAUSES = ("The parameters may hold NaN/Inf (a diverged run or a broken conversion), or the sampler "
                     "settings are outside what the chain allows.")

SAMPLERS = ("ancestral", "ddim")


def _nonzero(t, ndim):
  """[t != 0] shaped [B, 1, ..., 1]: the last step adds no noise."""
  return (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (ndim - 1))


def ancestral_step(diff, out, x, t, noise):
  """x_{t-1} = mean + [t != 0] sigma_t z, from `out` = p_mean_variance(...) at (x, t)."""
  return out["mean"] + _nonzero(t, x.ndim) * jnp.exp(0.5 * out["log_variance"]) * noise


def ddim_step(diff, out, x, t, noise, eta=0.0):
  """DDIM: eps re-derived from the (clipped) pred_x0; eta = 0 is deterministic."""
  eps = diffusion_lib.predict_eps_from_xstart(diff, x, t, out["pred_xstart"])
  abar = diffusion_lib.extract(diff.tables["alphas_cumprod"], t, x.ndim)
  abar_prev = diffusion_lib.extract(diff.tables["alphas_cumprod_prev"], t, x.ndim)
  sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar)) * jnp.sqrt(1 - abar / abar_prev)
  mean = out["pred_xstart"] * jnp.sqrt(abar_prev) + jnp.sqrt(1 - abar_prev - sigma ** 2) * eps
  return mean + _nonzero(t, x.ndim) * sigma * noise


def reverse_step(diff, model_output, x, t, noise, *, sampler="ancestral", eta=0.0, clip_denoised=True,
                 eps_scale=None):
  """One step x_t -> x_{t-1} of either sampler; returns (x_{t-1}, p_mean_variance's dict at (x_t, t))."""
  model_output = scale_eps(diff, model_output, t, x.shape[-1], eps_scale)
  out = diffusion_lib.p_mean_variance(diff, model_output, x, t, clip_denoised=clip_denoised)
  if sampler == "ancestral":
    return ancestral_step(diff, out, x, t, noise), out
  return ddim_step(diff, out, x, t, noise, eta=eta), out


def check_sampler_args(diff, sampler, eps_scale):
  """Clear errors at trace time for a bad sampler name or an impossible epsilon scaling."""
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
  if eps_scale is not None and diff.mean_type != "epsilon":
    raise ValueError("epsilon scaling needs a network that predicts eps (predict_xstart=False)")


def scale_eps(diff, model_output, t, channels, eps_scale):
  """Epsilon scaling (docs/method.md section 5, the follow-up paper's training-free fix): the predicted eps is
  divided by lambda_t = k t + b at sampling time only, with t the respaced index of the step (0 = last step).

  eps_scale: (k, b) or None (off). The variance channels of a learned-sigma output are left alone.
  """
  if eps_scale is None:
    return model_output
  k, b = eps_scale
  lam = (k * t.astype(jnp.float32) + b).reshape((-1,) + (1,) * (model_output.ndim - 1))
  return jnp.concatenate([model_output[..., :channels] / lam, model_output[..., channels:]], axis=-1)


def _per_example(key):
  """Whether `key` (a typed key, `jax.random.key`) is a key array [B], one per example, rather than one key for
  the whole batch."""
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    raise TypeError(f"the samplers take typed keys (jax.random.key), got a {key.dtype} array of shape "
                    f"{key.shape} (jax.random.PRNGKey's raw form)")
  return key.ndim == 1


def _noise_source(key, shape):
  """(normal(k) -> noise of `shape`, fold(k, i)) for one key or a key array [B] of per-example keys."""
  if _per_example(key):
    if key.shape[0] != shape[0]:
      raise ValueError(f"got {key.shape[0]} per-example keys for a batch of {shape[0]}")
    return (jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32)),
            jax.vmap(jax.random.fold_in, in_axes=(0, None)))
  return (lambda k: jax.random.normal(k, shape, jnp.float32)), jax.random.fold_in


def split_key(key):
  """(init key, step key) of a chain key (or of a key array [B], per example)."""
  if _per_example(key):
    return jax.vmap(jax.random.split, out_axes=1)(key)
  return jax.random.split(key)


def chain_start(diff, start_step=None):
  """The respaced step a chain starts from: `start_step`, checked to lie in [0, T'), or T'-1 (the last)."""
  start = diff.num_timesteps - 1 if start_step is None else int(start_step)
  if not 0 <= start < diff.num_timesteps:
    raise ValueError(f"start_step {start} outside [0, {diff.num_timesteps})")
  return start


def run_chain(diff, model_fn, x, step_key, *, start_step=None, sampler="ancestral", eta=0.0, clip_denoised=True,
              eps_scale=None, step_noise=None, noise_scale=1.0, observe=None):
  """The reverse chain from x at the respaced step `start_step` (default T'-1, the last) down to step 0, as one
  `lax.scan`; every sampler and measurement of the project runs this loop. Traceable: jit around it.

  x: float32 [B,H,W,C]. Loop iteration i (i = 0 at t = start_step) takes its noise from fold_in(step_key, i)
  (per example when step_key is a key array [B]) or, given `step_noise` [start_step + 1, B, H, W, C], from
  step_noise[i]; the noise is multiplied by `noise_scale` (0: the deterministic posterior-mean chain).
  `observe(t, x_t, out)` (t the respaced step, out p_mean_variance's dict at (x_t, t)) is called at every step;
  its values are stacked in chain order. Returns (x_0, stacked observations or None).
  """
  check_sampler_args(diff, sampler, eps_scale)
  shape = tuple(x.shape)
  start = chain_start(diff, start_step)
  if step_noise is not None and tuple(step_noise.shape) != (start + 1,) + shape:
    raise ValueError(f"step_noise must have shape {(start + 1,) + shape}, got {tuple(step_noise.shape)}")
  normal, fold = _noise_source(step_key, shape)

  def body(x, i):
    t = jnp.full((shape[0],), start - i, jnp.int32)
    noise = normal(fold(step_key, i)) if step_noise is None else step_noise[i]
    x_prev, out = reverse_step(diff, model_fn(x, diff.model_timesteps[t]), x, t, noise_scale * noise,
                               sampler=sampler, eta=eta, clip_denoised=clip_denoised, eps_scale=eps_scale)
    return x_prev, (None if observe is None else observe(t, x, out))

  return jax.lax.scan(body, x, jnp.arange(start + 1))


def sample_loop(diff, model_fn, key, shape, *, sampler="ancestral", eta=0.0, clip_denoised=True,
                step_noise=None, x_T=None, eps_scale=None):
  """Samples from pure noise; returns x_0 float32 [B,H,W,C] (NHWC `shape`). Traceable: jit around it.

  model_fn(x_t, t_original) -> network output. `key`: one PRNG key (new-style, `jax.random.key`, or a raw
  uint32 key) or a key array [B] of new-style keys, one per example. `step_noise` [T', *shape] and
  `x_T` [*shape] replace the noise drawn from `key` (either may be given alone). `eps_scale`: (k, b) for
  epsilon scaling (see `scale_eps`), None for the plain sampler.
  """
  shape = tuple(shape)
  init_key, step_key = split_key(key)
  normal, _ = _noise_source(init_key, shape)
  x = normal(init_key) if x_T is None else jnp.asarray(x_T, jnp.float32)
  x0, _ = run_chain(diff, model_fn, x, step_key, sampler=sampler, eta=eta, clip_denoised=clip_denoised,
                    eps_scale=eps_scale, step_noise=step_noise)
  return x0


def make_sample_fn(model, diff, shape, *, sampler="ancestral", eta=0.0, clip_denoised=True, eps_scale=None):
  """A jitted `sample(params, key, y=None) -> x_0 [B,H,W,C]` for a Flax UNet `model` (whole chain compiled)."""

  @jax.jit
  def sample(params, key, y=None):
    model_fn = lambda x, t: model.apply({"params": params}, x, t, y=y, train=False)
    return sample_loop(diff, model_fn, key, shape, sampler=sampler, eta=eta, clip_denoised=clip_denoised,
                       eps_scale=eps_scale)

  return sample
