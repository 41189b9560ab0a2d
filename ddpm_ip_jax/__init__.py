"""DDPM-IP in JAX/Flax: ADM UNet, Gaussian diffusion with input perturbation, training and sampling."""

__version__ = "0.1.0"
