"""ddpm-ip-jax: DDPM-IP (input perturbation for diffusion models) in JAX/Flax.

The install entry point; the metadata and dependencies are in pyproject.toml ([project]).
"""
from setuptools import setup

setup()
