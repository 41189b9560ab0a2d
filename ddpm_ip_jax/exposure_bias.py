"""Exposure-bias measurements of a trained model: `python -m ddpm_ip_jax.exposure_bias`.

  python -m ddpm_ip_jax.exposure_bias --workdir=runs/digits --steps=100 --num_images=256

nu_t along the sampling chain against the same model on training inputs, delta_t, and the deterministic
reconstruction L1, on real images of the run's dataset (what they are: `ddpm_ip_jax/exposure.py`). Writes
<output>.json and a PNG plot. The chain's settings default to the run's `config.sampling`.
"""
import json

from absl import app
from absl import flags
from absl import logging
import jax

from ddpm_ip_jax import cli
from ddpm_ip_jax import diffusion as diffusion_lib
from ddpm_ip_jax import exposure
from ddpm_ip_jax import fileio
from ddpm_ip_jax import images as images_lib
from ddpm_ip_jax import input_pipeline
from ddpm_ip_jax import models
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
  loaded = cli.load_model_from_flags()
  config = loaded.config
  if config.model.num_classes > 0:
    raise app.UsageError("exposure-bias measurements of class-conditional models are not supported yet.")
  settings = cli.chain_settings(config)
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
  model = models.create_model(config)
  fns = exposure.make_measure_fns(diff, lambda p, x, t: model.apply({"params": p}, x, t, train=False),
                                  sampler=settings["sampler"], eta=settings["eta"],
                                  clip_denoised=settings["clip_denoised"], eps_scale=settings["eps_scale"])
  results = exposure.measure(fns, loaded.params, x0, jax.random.key(FLAGS.seed), start_step=FLAGS.start_step)
  results["settings"] = dict(model=loaded.description, num_images=int(x0.shape[0]), sampler=settings["sampler"],
                             steps=settings["respacing"], eta=settings["eta"], eps_scale=settings["eps_scale"],
                             seed=FLAGS.seed, start_step=FLAGS.start_step)
  if jax.process_index() > 0:  # every process measured the same numbers; process 0 writes them
    return
  fileio.write_text(output + ".json", json.dumps(results, indent=1))
  exposure.plot(results, output + ".png", title=loaded.description)
  logging.info("delta sum %.4g, reconstruction L1 %.4g; wrote %s.json/.png", results["delta_sum"],
               results["reconstruction_l1"], output)


if __name__ == "__main__":
  define_flags()
  cli.run(main, flags_parser=cli.parse_flags)
