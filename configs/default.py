"""Every knob of ddpm-ip-jax at the reference's defaults (the schema lives in ddpm_ip_jax/config_base.py).

  python -m ddpm_ip_jax.main --config=configs/default.py --workdir=runs/default --config.data.dataset=...
"""
from ddpm_ip_jax import config_base


def get_config():
  return config_base.get_config()
