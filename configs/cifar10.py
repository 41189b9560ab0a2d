"""CIFAR-10 32x32 (docs/method.md section 2): 57,094,662 parameters, gamma 0.15, global batch 128."""
from ddpm_ip_jax import config_base


def get_config():
  return config_base.paper_config(32, gamma=0.15, batch_size=128, dataset="cifar10")
