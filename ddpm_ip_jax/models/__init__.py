"""Networks of ddpm-ip-jax: the ADM UNet (docs/method.md section 3)."""
from ddpm_ip_jax.models.unet import (DEFAULT_CHANNEL_MULT, UNet, abstract_params, count_params,
                                     create_model, init_params, model_section, resolve_channel_mult,
                                     timestep_embedding)

__all__ = ["DEFAULT_CHANNEL_MULT", "UNet", "abstract_params", "count_params", "create_model",
           "init_params", "model_section", "resolve_channel_mult", "timestep_embedding"]
