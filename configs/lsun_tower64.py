"""LSUN tower 64x64 (docs/method.md section 2): 295,136,454 parameters, gamma 0.1, global batch 256."""
from ddpm_ip_jax import config_base


def get_config():
  return config_base.paper_config(64, gamma=0.1, batch_size=256, dataset="lsun/tower")
