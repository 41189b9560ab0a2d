"""Trains DDPM-IP from the command line.

  python -m ddpm_ip_jax.main --config=configs/digits.py --workdir=runs/digits
  python -m ddpm_ip_jax.main --config=configs/cifar10.py --workdir=runs/c10 \
      --config.training.batch_size=64 --config.diffusion.input_perturbation=0.1

Any config field can be overridden with --config.<path>=<value>; the run resumes from the latest
checkpoint in --workdir.

Several hosts (TPU pod slice, SLURM, several GPU machines): every host runs the same command with
--distributed=true, which calls jax.distributed.initialize() before anything else touches JAX; on TPU pods
and under SLURM it finds the other hosts by itself, elsewhere give --coordinator_address, --num_processes
and --process_id (launch/README.md).
"""
import importlib.util
import os
import sys

from absl import app
from absl import flags
from absl import logging
from clu import platform
import jax
from ml_collections import config_flags

from ddpm_ip_jax import config_validation
from ddpm_ip_jax import host_memory
from ddpm_ip_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and config.json.")
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() first (multi-host; auto-detects TPU pods and SLURM).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0's coordinator, for --distributed where it is not auto-detected.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for --distributed.")
flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes), for --distributed.")
flags.mark_flags_as_required(["config", "workdir"])


def _load_config_file(path):
  """Runs `get_config()` of a config file, as config_flags does."""
  spec = importlib.util.spec_from_file_location("_config_for_override_check", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _unknown_override(argv):
  """The first --config.<path> of argv that names no field of the config file, as a message."""
  config_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_path is None:
    return None
  config = _load_config_file(config_path.split(":", 1)[0])
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    node, walked = config, "config"
    for name in path.split("."):
      fields = node.keys() if hasattr(node, "keys") else []
      if name not in fields:
        return (f"Unknown config override {arg.split('=', 1)[0]}: {walked} has no field {name!r}. "
                f"Its fields: {', '.join(sorted(fields))}.")
      node, walked = node[name], f"{walked}.{name}"
  return None


def parse_flags(argv):
  """absl flag parsing that turns an override of a missing config field into a one-line error."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    message = _unknown_override(argv) or f"Bad --config override: {e}"
    sys.exit(f"FATAL {message}")


def initialize_distributed():
  """jax.distributed.initialize() with the coordinates given by flags (None: auto-detected). Must run
  before any other JAX call."""
  given = {name: FLAGS[name].value for name in ("coordinator_address", "num_processes", "process_id")
           if FLAGS[name].value is not None}
  if given and not FLAGS.distributed:
    raise app.UsageError(f"--{', --'.join(given)} only apply with --distributed=true.")
  if FLAGS.distributed:
    jax.distributed.initialize(**given)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  initialize_distributed()
  # tf.data runs on the CPU only: keep TensorFlow away from the accelerators that JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")

  logging.info("JAX process %d / %d, local devices: %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  host_memory.warn_if_slow(jax.default_backend())
  platform.work_unit().set_task_status(f"process_index: {jax.process_index()}, "
                                       f"process_count: {jax.process_count()}")
  platform.work_unit().create_artifact(platform.ArtifactType.DIRECTORY, FLAGS.workdir, "workdir")
  try:
    train.train_and_evaluate(FLAGS.config, os.path.expanduser(FLAGS.workdir))
  except config_validation.ConfigError as e:
    sys.exit(f"FATAL config error: {e}")
  except train.NonFiniteLossError as e:
    sys.exit(f"FATAL {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
