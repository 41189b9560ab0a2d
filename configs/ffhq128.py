"""FFHQ 128x128 (docs/method.md section 2): 542,811,398 parameters, gamma 0.1, global batch 128.

The official 128x128 thumbnails, as an image folder:
  --config.data.data_dir=/path/to/thumbnails128x128
"""
from ddpm_ip_jax import config_base


def get_config():
  return config_base.paper_config(128, gamma=0.1, batch_size=128, dataset="folder")
