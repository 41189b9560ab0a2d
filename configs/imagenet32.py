"""ImageNet 32x32 (the official downsampled set)
(docs/method.md section 2): 57,094,662 parameters, gamma 0.1, global batch 512.
"""
from ddpm_ip_jax import config_base


def get_config():
  return config_base.paper_config(32, gamma=0.1, batch_size=512, dataset="imagenet32")
