"""DDPM-IP's training objective on one device: the random numbers of a step and the weighted loss.

docs/method.md section 1. A step draws, per device, the timesteps t and their importance weights (the timestep
sampler), the regression target eps, DDPM-IP's perturbation noise xi (independent of eps) and the per-example
gamma of the perturbation variant; `training_losses` then builds y_t = sqrt(abar) x0 + sqrt(1 - abar)(eps + gamma
xi) and regresses onto eps. The training loop only derives the key (`step_key`) and averages the gradients.
"""
import dataclasses

import flax
import jax
import jax.numpy as jnp

from ddpm_ip_jax import diffusion as diffusion_lib
from ddpm_ip_jax import timestep_sampler


@dataclasses.dataclass(frozen=True)
class InputPerturbation:
  """How gamma is chosen per example (`diffusion.perturbation_gamma`): the paper's constant, or a variant."""
  gamma: float = 0.0
  kind: str = "constant"       # constant | uniform | linear (diffusion.GAMMA_KINDS)
  gamma_start: float = 0.0     # the linear variant's gamma at t = 0

  @classmethod
  def from_config(cls, diffusion_config):
    d = diffusion_config
    return cls(gamma=float(d.input_perturbation), kind=str(d.input_perturbation_kind),
               gamma_start=float(d.input_perturbation_start))


@flax.struct.dataclass
class StepNoise:
  """The random numbers of one training step on one device (b = per-device batch)."""
  t: jax.Array             # int32 [b], steps in [0, T)
  weights: jax.Array       # float32 [b], importance weights of the timestep sampler
  eps: jax.Array           # float32 [b, H, W, C], the regression target
  xi: jax.Array            # float32 [b, H, W, C], DDPM-IP's input perturbation noise
  gamma: jax.Array         # float32 [b], the perturbation strength of each example
  dropout_rng: jax.Array


def step_key(train_rng, step, device_index):
  """The key of `step` on device `device_index`: fold_in(fold_in(train_rng, step), device_index), as VDM."""
  return jax.random.fold_in(jax.random.fold_in(train_rng, step), device_index)


def draw_step_noise(key, sampler_state, image_shape, perturbation, num_timesteps):
  """Timesteps from the sampler, eps and xi (independent standard normals), gamma per example and a dropout key.

  image_shape: the per-device batch shape [b, H, W, C]."""
  k_t, k_eps, k_xi, k_dropout, k_gamma = jax.random.split(key, 5)
  t, weights = timestep_sampler.sample_timesteps(sampler_state, k_t, image_shape[0])
  gamma = diffusion_lib.perturbation_gamma(perturbation.kind, perturbation.gamma, t, num_timesteps, key=k_gamma,
                                           gamma_start=perturbation.gamma_start)
  return StepNoise(t=t, weights=weights,
                   eps=jax.random.normal(k_eps, image_shape, jnp.float32),
                   xi=jax.random.normal(k_xi, image_shape, jnp.float32),
                   gamma=gamma, dropout_rng=k_dropout)


def weighted_loss(diff, model_fn, x0, noise):
  """(mean of weights * loss, the per-example losses {loss, mse, vb} [b]) of x0 [b, H, W, C] under `noise`.

  model_fn(y_t, t_original) -> network output."""
  losses = diffusion_lib.training_losses(diff, model_fn, x0, noise.t, noise.eps, noise.xi, noise.gamma)
  return jnp.mean(noise.weights * losses["loss"]), losses


def loss_sums(losses, noise, num_timesteps):
  """Sums for logging, as the reference logs them: each term weighted like the loss, overall and per quarter
  of [0, T) (`<name>_q0` .. `_q3`), with the example counts `count` and `count_q0` .. `count_q3`."""
  quarter = noise.t * 4 // num_timesteps
  sums = {"count": jnp.float32(noise.t.shape[0])}
  for name, value in losses.items():
    weighted = noise.weights * value
    sums[name] = jnp.sum(weighted)
    for q in range(4):
      sums[f"{name}_q{q}"] = jnp.sum(jnp.where(quarter == q, weighted, 0.0))
  for q in range(4):
    sums[f"count_q{q}"] = jnp.sum(quarter == q).astype(jnp.float32)
  return sums
