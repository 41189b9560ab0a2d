"""Trains the digits classifier (the CPU stand-in for Inception, `ddpm_ip_jax/evaluation/digits.py`; the training:
`digits_training.py`).

  python -m ddpm_ip_jax.evaluation.digits_classifier --output=runs/digits_classifier.npz
"""
from absl import flags

from ddpm_ip_jax import cli
from ddpm_ip_jax import fileio
from ddpm_ip_jax import input_pipeline
from ddpm_ip_jax.evaluation import digits
from ddpm_ip_jax.evaluation import digits_training

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("output", "runs/digits_classifier.npz", "Where to save the weights.")
  flags.DEFINE_integer("seed", 0, "Seed of the split, init and batches.")
  flags.DEFINE_integer("epochs", 30, "Training epochs.", lower_bound=1)


def main(argv):
  del argv
  cli.check_writable(fileio.parent(fileio.absolute(FLAGS.output)), "--output")  # before the training
  images, labels = input_pipeline.load_digits(digits.IMAGE_SIZE)
  params, accuracy = digits_training.train_classifier(images, labels, seed=FLAGS.seed, epochs=FLAGS.epochs)
  digits_training.save_params(params, FLAGS.output, accuracy=accuracy, seed=FLAGS.seed, epochs=FLAGS.epochs)
  print(f"held-out accuracy {accuracy:.4f}; wrote {FLAGS.output}")


if __name__ == "__main__":
  define_flags()
  cli.run(main, flags_parser=cli.parse_flags)
