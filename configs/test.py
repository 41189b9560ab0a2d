"""The toy config of the tests: the embedded digits at their native 8x8, a one-level UNet, 10 diffusion steps,
6 training steps with a checkpoint every 2 and a 2-image grid of 2 steps at the end. Compiles in seconds:

  python -m ddpm_ip_jax.main --config=configs/test.py --workdir=/tmp/toy
"""
from ddpm_ip_jax import config_base


def get_config():
  config = config_base.get_config()
  m = config.model
  m.image_size, m.in_channels, m.model_channels, m.channel_mult = 8, 1, 32, (1,)
  m.num_res_blocks, m.attention_resolutions, m.learn_sigma = 1, (), True
  m.use_scale_shift_norm, m.resblock_updown, m.use_new_attention_order = True, True, True
  d = config.diffusion
  d.steps, d.noise_schedule, d.loss_type, d.input_perturbation = 10, "cosine", "rescaled_mse", 0.1
  config.data.dataset, config.data.random_flip = "digits", False
  tr = config.training
  tr.batch_size, tr.num_train_steps, tr.learning_rate, tr.ema_rates = 8, 6, 1e-3, (0.995,)
  tr.steps_per_call, tr.log_every_steps, tr.checkpoint_every_steps = 1, 1, 2
  tr.keep_checkpoints, tr.keep_every_steps = 2, 0
  tr.sample_every_steps, tr.num_grid_samples, tr.grid_sampling_steps = 0, 2, "2"
  return config
