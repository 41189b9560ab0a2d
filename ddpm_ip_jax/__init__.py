"""DDPM-IP in JAX/Flax: ADM UNet, Gaussian diffusion with input perturbation, training and sampling."""

__version__ = "0.1.0"

# A command (`python -m ddpm_ip_jax.<command>`) on the CPU re-executes itself once with glibc's huge-page tunable
# before anything heavy is imported (ddpm_ip_jax/runtime.py); importing the package from code does nothing here.
import sys as _sys

if _sys.orig_argv[1:2] == ["-m"] and _sys.orig_argv[2:3] and _sys.orig_argv[2].startswith("ddpm_ip_jax."):
  from ddpm_ip_jax import runtime as _runtime
  _runtime.reexec_with_cpu_defaults()
