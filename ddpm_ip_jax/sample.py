"""Generate many samples on all devices, resumably: `python -m ddpm_ip_jax.sample`.

  python -m ddpm_ip_jax.sample --workdir=runs/cifar10 --num_samples=50000 --steps=100
  python -m ddpm_ip_jax.sample --checkpoint=converted/cifar10_ip --workdir=runs/eval --sampler=ddim --steps=ddim50

The model comes from a training workdir (its config.json and latest checkpoint; EMA params by default) or from
`--checkpoint`, a directory written by `python -m ddpm_ip_jax.convert` (e.g. from a released `.pt`). The chain's
settings default to the run's `config.sampling`; the flags override them. What is written and how a rerun
resumes: `ddpm_ip_jax/generation.py`; the settings and the output directory's name: `sample_settings.py`. On
several hosts (`--distributed=true`, as training) every process draws its share of the sample indices on its local
devices and writes its part files to the shared output directory; process 0 writes the samples file.
"""
from absl import flags

from ddpm_ip_jax import cli
from ddpm_ip_jax import sample_settings

FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.initialize_distributed()
  args = sample_settings.SampleArgs.from_flags(FLAGS)
  sample_settings.generate(sample_settings.load_model(args), args)


if __name__ == "__main__":
  cli.define_sample_flags()
  cli.define_distributed_flags()
  cli.run(main, flags_parser=cli.parse_flags)
