"""Exposure-bias measurements of a trained model: `python -m ddpm_ip_jax.exposure_bias`.

  python -m ddpm_ip_jax.exposure_bias --workdir=runs/digits --steps=100 --num_images=256

The authors' measures first: the one-step nu_t at t = 0, 10, ..., 990 and the deterministic reconstruction L1
from t = 599 (for T = 1000), on the full diffusion; then, along the chain of --steps/--sampler, nu_t against the
same model on training inputs, delta_t and the chain reconstruction L1; all on real images of the run's dataset
(what they are: `ddpm_ip_jax/exposure.py`). Writes <output>.json and a PNG plot. The chain's settings default to
the run's `config.sampling`. Measurements with NaN/Inf are refused in one FATAL line, nothing written; Ctrl-C or
SIGTERM stops after the measurement in progress, writing nothing (`interrupts`: one line, exit 130 or 143).
"""
import json

from absl import app
from absl import flags
from absl import logging
import jax

from ddpm_ip_jax import cli
from ddpm_ip_jax import diffusion as diffusion_lib
from ddpm_ip_jax import exposure
from ddpm_ip_jax import exposure_bias_lib
from ddpm_ip_jax import fileio
from ddpm_ip_jax import images as images_lib
from ddpm_ip_jax import input_pipeline
from ddpm_ip_jax import interrupts
from ddpm_ip_jax import sample_settings
from ddpm_ip_jax import sampling

FLAGS = flags.FLAGS


def define_flags():
  cli.define_model_flags()
  cli.define_sampler_flags()
  flags.DEFINE_string("output", None, "Output prefix; writes <output>.json and <output>.png "
                      "(default <workdir>/exposure_bias_<sampler><steps>).")
  flags.DEFINE_integer("num_images", 256, "Real images from the config's dataset.", lower_bound=1)
  flags.DEFINE_integer("start_step", None, "Respaced step the nu/delta chain starts from (default: the last).")
  cli.define_distributed_flags()


def main(argv):
  del argv
  cli.initialize_distributed()
  args = sample_settings.SampleArgs.from_flags(FLAGS)
  loaded = sample_settings.load_model(args)
  config = loaded.config
  if config.model.num_classes > 0:
    raise app.UsageError("exposure-bias measurements of class-conditional models are not supported yet.")
  settings = sample_settings.chain_settings(config, args)
  diff = diffusion_lib.create_diffusion(config.diffusion, learn_sigma=config.model.learn_sigma,
                                        timestep_respacing=settings["respacing"])
  try:
    sampling.chain_start(diff, FLAGS.start_step)
  except ValueError as e:
    raise app.UsageError(f"--start_step: {e} (the respaced steps of --steps={settings['respacing']!r})") from None
  output = FLAGS.output or fileio.join(FLAGS.workdir or FLAGS.checkpoint,
                                       f"exposure_bias_{settings['sampler']}{settings['respacing'] or 'all'}")
  if jax.process_index() == 0:
    cli.check_writable(fileio.parent(output), "--output")
  input_pipeline.check_dataset(config.data, config.model.image_size)
  x0 = images_lib.to_model_range(
      input_pipeline.load_images(config.data, config.model.image_size, max_images=FLAGS.num_images))
  key_authors, key_chain = jax.random.split(jax.random.key(FLAGS.seed))
  nothing = (f"nothing was kept ({output}.json is written once all the measurements are done); run the same "
             "command again to measure")
  with interrupts.watch():  # Ctrl-C / SIGTERM: stop after the measurement in progress, writing nothing
    interrupts.note(nothing)
    logging.info("Measuring on %d images (Ctrl-C or SIGTERM: stop after the current measurement).", x0.shape[0])
    measured = exposure_bias_lib.measure_model(
        config, loaded.params, x0, respacing=settings["respacing"], key_authors=key_authors, key_chain=key_chain,
        sampler=settings["sampler"], eta=settings["eta"], clip_denoised=settings["clip_denoised"],
        eps_scale=settings["eps_scale"], start_step=FLAGS.start_step, check=lambda: interrupts.check(nothing))
  results = {**measured["authors"], **measured["chain"]}
  results["settings"] = dict(model=loaded.description, num_images=int(x0.shape[0]), sampler=settings["sampler"],
                             steps=settings["respacing"], eta=settings["eta"], eps_scale=settings["eps_scale"],
                             seed=FLAGS.seed, start_step=FLAGS.start_step)
  if jax.process_index() > 0:  # every process measured the same numbers; process 0 writes them
    return
  write_results(results, output, loaded.description)


def write_results(results, output, description):
  """<output>.json and the plot <output>.png of `results`; a NonFiniteResultsError (one FATAL line) and nothing
  written if any measured value came out NaN/Inf."""
  exposure.check_finite(results, "the exposure-bias measurements", f"{output}.json")
  fileio.write_text(output + ".json", json.dumps(results, indent=1))
  exposure_bias_lib.plot(results, output + ".png", title=description)
  logging.info("one-step nu_t mean %.4g, reconstruction L1 from t = %d %.4g; chain: delta sum %.4g, "
               "reconstruction L1 %.4g; wrote %s.json/.png", results["nu_one_step_mean"],
               results["reconstruction_start"], results["reconstruction_l1"], results["delta_sum"],
               results["chain_reconstruction_l1"], output)


if __name__ == "__main__":
  define_flags()
  cli.run(main, flags_parser=cli.parse_flags)
