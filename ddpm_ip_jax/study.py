"""The small-scale reproduction study, ADM (gamma 0) against ADM-IP: `python -m ddpm_ip_jax.study`.

  python -m ddpm_ip_jax.study --config=configs/digits.py --workdir=runs/study --docs=docs/study_digits \
      --gammas=0,0.1,0.2 --seeds=0,1,2 --config.training.num_train_steps=1500

What it runs and writes: `ddpm_ip_jax/study_lib.py`.
"""
import os
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from ddpm_ip_jax import cli
from ddpm_ip_jax import host_memory
from ddpm_ip_jax import study_lib
from ddpm_ip_jax.evaluation import scoring

FLAGS = flags.FLAGS


def _numbers(flag, kind):
  """The values of list flag `flag` as `kind` (int or float); a UsageError naming the flag for one that is not."""
  try:
    return [kind(v) for v in getattr(FLAGS, flag)]
  except ValueError:
    raise app.UsageError(f"--{flag}={','.join(getattr(FLAGS, flag))}: not a list of "
                         f"{'integers' if kind is int else 'numbers'}") from None


def main(argv):
  del argv
  if FLAGS.report_only:  # e.g. after editing notes.md
    meta, all_results, gammas, seeds = study_lib.load_results(os.path.join(FLAGS.docs, "results.json"))
    study_lib.write_report(all_results, FLAGS.docs, meta, gammas, seeds)
    return
  host_memory.warn_if_slow(jax.default_backend())
  study_lib.run_study(
      FLAGS.config, workdir=FLAGS.workdir, docs=FLAGS.docs, gammas=_numbers("gammas", float),
      seeds=_numbers("seeds", int), extractor=scoring.make_extractor(FLAGS.extractor, FLAGS.weights),
      ancestral_steps=_numbers("ancestral_steps", int), ddim_steps=_numbers("ddim_steps", int),
      num_samples=FLAGS.num_samples, per_device_batch=FLAGS.sample_batch,
      exposure_start_steps=_numbers("exposure_start_steps", int),
      exposure_respacing=FLAGS.exposure_respacing, exposure_images=FLAGS.exposure_images,
      command="python -m ddpm_ip_jax.study " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", "configs/digits.py", "Base config (configs/*.py).", lock_config=False)
  flags.DEFINE_string("workdir", "runs/study", "Where the runs go (one subfolder per gamma and seed).")
  flags.DEFINE_string("docs", "docs/study_digits", "Where the report goes.")
  flags.DEFINE_list("gammas", ["0", "0.1", "0.2"], "Input perturbation values (0 = ADM).")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds per gamma.")
  flags.DEFINE_list("ancestral_steps", ["10", "20", "50", "100", "1000"], "Ancestral respacings.")
  flags.DEFINE_list("ddim_steps", ["10", "50"], "DDIM step counts (eta 0).")
  flags.DEFINE_bool("report_only", False, "Only rewrite <docs>/README.md and the plots from <docs>/results.json.")
  flags.DEFINE_string("exposure_respacing", "100", "Respacing of the exposure-bias chains.")
  flags.DEFINE_list("exposure_start_steps", ["49", "19"],
                    "Intermediate start steps (of --exposure_respacing) for extra nu/delta chains.")
  flags.DEFINE_integer("exposure_images", 256, "Real training images the exposure-bias chains start from.")
  flags.DEFINE_integer("num_samples", 1000, "Samples per sampler setting.")
  flags.DEFINE_integer("sample_batch", 250, "Samples per device per call.")
  flags.DEFINE_string("extractor", "digits", "Feature extractor (digits | inception).")
  flags.DEFINE_string("weights", "runs/digits_classifier.npz", "Weights of the extractor.")
  cli.run(main, flags_parser=cli.parse_flags)
