"""Speed benchmark of the training step and the sampler: `python -m ddpm_ip_jax.benchmark`.

  python -m ddpm_ip_jax.benchmark --config=configs/cifar10.py --config.training.batch_size=128 \
      --config.model.dtype=bfloat16 --config.training.steps_per_call=10 --train_steps=20 \
      --sample_steps=100,1000 --sample_batch=256

Prints one JSON line per measurement (what each figure means: `ddpm_ip_jax/benchmark_lib.py`; measured figures:
docs/performance.md).
"""
import json

from absl import flags
import jax
from ml_collections import config_flags

from ddpm_ip_jax import benchmark_lib
from ddpm_ip_jax import cli
from ddpm_ip_jax import config_validation
from ddpm_ip_jax import host_memory
from ddpm_ip_jax import models

FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = FLAGS.config
  host_memory.warn_if_slow(jax.default_backend())
  config_validation.validate_config(config)
  for respacing in FLAGS.sample_steps or ():  # before the training is timed, not after
    config_validation.check_respacing(respacing, "--sample_steps", config.diffusion.steps)
  if FLAGS.train_steps > 0:
    print(json.dumps(benchmark_lib.benchmark_training(config, FLAGS.train_steps)), flush=True)
  if FLAGS.sample_steps:
    params = models.init_params(models.create_model(config), jax.random.key(config.seed))
    for respacing in FLAGS.sample_steps:
      print(json.dumps(benchmark_lib.benchmark_sampling(config, params, respacing, FLAGS.sample_batch, FLAGS.sampler)),
            flush=True)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
  flags.mark_flag_as_required("config")
  flags.DEFINE_integer("train_steps", 10, "Timed training calls after the compiling one (0: skip training).",
                       lower_bound=0)
  flags.DEFINE_list("sample_steps", ["100"], "Respacings to time the sampler at (e.g. 100,1000; empty: skip).")
  flags.DEFINE_integer("sample_batch", 16, "Samples per device for the sampler benchmark.", lower_bound=1)
  flags.DEFINE_enum("sampler", "ancestral", ("ancestral", "ddim"), "Sampler to time.")
  cli.run(main, flags_parser=cli.parse_flags)
