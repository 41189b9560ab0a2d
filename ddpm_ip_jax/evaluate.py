"""Full evaluation in one command: samples (resumed if present) -> FID, sFID, IS, precision/recall -> JSON.

  # Reference statistics of the training data (same preprocessing as training; docs/method.md sections 2, 5):
  python -m ddpm_ip_jax.evaluate --workdir=runs/cifar10 --reference=stats/cifar10_train.npz \
      --extractor=inception --weights=pt_inception-2015-12-05-6726825d.pth --reference_only
  # 50k samples with 100 ancestral steps, then every metric:
  python -m ddpm_ip_jax.evaluate --workdir=runs/cifar10 --reference=stats/cifar10_train.npz \
      --extractor=inception --weights=pt_inception-2015-12-05-6726825d.pth --num_samples=50000 --steps=100

When the `--reference` file does not exist it is computed first: from `--reference_npz` (uint8 NHWC `arr_0`, e.g.
the OpenAI reference batches) or from the config's dataset (`--num_reference` images, all if 0). The Inception
weights are never downloaded (see `evaluation.inception.WEIGHTS_HELP`). `--extractor=digits` scores the embedded
digits dataset with the project's digits classifier instead (`python -m ddpm_ip_jax.evaluation.digits_classifier`).
Results go to `<samples dir>/metrics_<extractor>.json`, to the log, and to the workdir's TensorBoard events. The
sampling flags default to the run's `config.sampling`; the library is `ddpm_ip_jax/evaluation/scoring.py`.
"""
import contextlib
import json

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils

from ddpm_ip_jax import cli
from ddpm_ip_jax import exposure
from ddpm_ip_jax import fileio
from ddpm_ip_jax import interrupts
from ddpm_ip_jax import metric_log
from ddpm_ip_jax import sample_settings
from ddpm_ip_jax.evaluation import extractors
from ddpm_ip_jax.evaluation import metrics
from ddpm_ip_jax.evaluation import scoring

FLAGS = flags.FLAGS


def define_flags():
  cli.define_sample_flags()
  flags.DEFINE_enum("extractor", "inception", extractors.EXTRACTORS, "Feature network for the metrics.")
  flags.DEFINE_string("weights", None, "Weights file of the extractor (Inception .pth/.npz, or the digits "
                      "classifier .npz). Never downloaded.")
  flags.DEFINE_string("reference", None, "Reference statistics .npz; computed and saved there if missing.")
  flags.DEFINE_string("reference_npz", None, "Compute the reference from these uint8 images (arr_0) instead "
                      "of the config's dataset.")
  flags.DEFINE_integer("num_reference", 0, "Reference images from the dataset (0: all).")
  flags.DEFINE_bool("reference_only", False, "Only compute the reference statistics.")
  flags.DEFINE_bool("tensorboard", True, "Also write the metrics as TensorBoard events into --workdir.")
  flags.DEFINE_enum("pr_distances", "float16", metrics.DISTANCE_DTYPES, "Precision/recall distances: float16 as "
                    "the OpenAI evaluator computes them, or exact float64.")
  flags.DEFINE_enum("fid_sqrt", "sqrtm", metrics.FID_SQRT_METHODS, "Matrix square root of FID/sFID: scipy's "
                    "sqrtm as the OpenAI evaluator takes it, or a symmetric eigendecomposition (real-valued even "
                    "with fewer samples than feature dimensions).")
  cli.define_distributed_flags()


def main(argv):
  with contextlib.ExitStack() as owned:  # the output directory's lock (sample_settings.generate), until the end
    _evaluate(argv, owned)


def _evaluate(argv, owned):
  del argv
  for name in ("weights", "reference"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  cli.initialize_distributed()
  # Ctrl-C / SIGTERM: stop after the sampling batch in progress, or once the samples are complete, before scoring.
  owned.enter_context(interrupts.watch())
  extractor = scoring.make_extractor(FLAGS.extractor, FLAGS.weights)  # a missing weights file fails here, first
  args = sample_settings.SampleArgs.from_flags(FLAGS)
  loaded = sample_settings.load_model(args)
  if FLAGS.num_reference < 0:
    raise app.UsageError(f"--num_reference={FLAGS.num_reference} must be >= 0 (0: all the dataset's images).")
  if FLAGS.num_samples < scoring.MIN_SAMPLES and not FLAGS.reference_only:
    raise app.UsageError(f"--num_samples={FLAGS.num_samples}: the metrics need at least {scoring.MIN_SAMPLES} "
                         "samples (precision/recall take each one's 3rd nearest neighbour, FID their covariance; "
                         "the paper's 50,000).")
  chief = jax.process_index() == 0
  events = chief and FLAGS.workdir and FLAGS.tensorboard
  if events:  # before any sampling: a missing TensorFlow fails now; the events file is made only at the end,
    try:      # so that a failed evaluation leaves nothing in the training workdir
      metric_log.check_tensorboard()
    except ImportError as e:
      raise app.UsageError(f"--tensorboard: {e}") from e
  # On every process: the features of the reference images are computed on all of them; process 0 writes them.
  reference = scoring.load_or_compute_reference(FLAGS.reference, loaded.config, extractor,
                                                reference_npz=FLAGS.reference_npz, num_images=FLAGS.num_reference)
  if FLAGS.reference_only:
    logging.info("Reference statistics in %s.", FLAGS.reference)
    return
  # Every process draws its share of the samples; process 0 assembles them, scores them and writes the metrics.
  samples, out_dir = sample_settings.generate(loaded, args, owned)
  interrupts.check(f"all {FLAGS.num_samples} samples kept in {samples}, not scored; run the same command again "
                   "to score them")
  if jax.process_count() > 1:  # process 0 has written the samples file that every process now reads
    multihost_utils.sync_global_devices("ddpm_ip_jax.evaluate: samples file written")
  # Features on all processes, metrics on process 0.
  results = scoring.score_samples(samples, reference, extractor, distance_dtype=FLAGS.pr_distances,
                                  fid_sqrt=FLAGS.fid_sqrt)
  if not chief:
    return
  scalars = dict(results)
  results.update(model=loaded.description, step=loaded.step, samples=samples, pr_distances=FLAGS.pr_distances,
                 fid_sqrt=FLAGS.fid_sqrt, reference=fileio.absolute(FLAGS.reference), extractor=FLAGS.extractor)
  path = fileio.join(out_dir, f"metrics_{FLAGS.extractor}.json")
  exposure.check_finite(scalars, "the metrics", path)  # e.g. a FID of degenerate features: refused, not written
  fileio.write_text(path, json.dumps(results, indent=2))
  logging.info("Wrote %s: %s", path, scalars)
  if events:
    writer = metric_log.make_writer(FLAGS.workdir, tensorboard=True)
    tag = str(out_dir).rstrip("/").rsplit("/", 1)[-1]
    writer.write_scalars(loaded.step, {f"eval/{tag}/{k}": v for k, v in scalars.items()})
    writer.close()
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  define_flags()
  cli.run(main, flags_parser=cli.parse_flags)
