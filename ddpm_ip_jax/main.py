"""Trains DDPM-IP from the command line.

  python -m ddpm_ip_jax.main --config=configs/digits.py --workdir=runs/digits
  python -m ddpm_ip_jax.main --config=configs/cifar10.py --workdir=runs/c10 \
      --config.training.batch_size=64 --config.diffusion.input_perturbation=0.1

Any config field can be overridden with --config.<path>=<value>; the run resumes from the latest
checkpoint in --workdir. This module holds only the flags and `main`: the training itself is
`ddpm_ip_jax.train.train_and_evaluate(config, workdir)`, callable from code.

Several hosts (TPU pod slice, SLURM, several GPU machines): every host runs the same command with
--distributed=true, which calls jax.distributed.initialize() before anything else touches JAX; on TPU pods
and under SLURM it finds the other hosts by itself, elsewhere give --coordinator_address, --num_processes
and --process_id (launch/README.md).
"""
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from ddpm_ip_jax import cli
from ddpm_ip_jax import config_validation
from ddpm_ip_jax import fileio
from ddpm_ip_jax import host_memory
from ddpm_ip_jax import train
from ddpm_ip_jax import train_step

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and config.json.")
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_list("allow_config_change", [], "Fields (e.g. diffusion.input_perturbation) that may differ from "
                  "the resumed run's config.json; without them a resumed run must have its model, diffusion and "
                  "data.")
cli.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  cli.initialize_distributed()
  logging.info("JAX process %d / %d, local devices: %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  host_memory.warn_if_slow(jax.default_backend())
  try:
    train.train_and_evaluate(FLAGS.config, fileio.absolute(FLAGS.workdir), FLAGS.allow_config_change)
  except config_validation.ConfigError as e:
    sys.exit(f"FATAL config error: {e}")
  except train_step.NonFiniteLossError as e:
    sys.exit(f"FATAL {e}")


if __name__ == "__main__":
  cli.run(main, flags_parser=cli.parse_flags)
