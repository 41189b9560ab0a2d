"""The embedded default: scikit-learn's 8x8 handwritten digits upscaled to 16x16 (1 channel), no download.

A small ADM UNet with the paper's diffusion settings (cosine schedule, learned variance with the hybrid
loss, gamma 0.1; docs/method.md section 2) that trains on a 2-core CPU in about 10 minutes (1500 steps at ~2.5 steps/s):
  python -m ddpm_ip_jax.main --config=configs/digits.py --workdir=runs/digits
"""
from ddpm_ip_jax import config_base


def get_config():
  config = config_base.get_config()
  config.model.image_size = 16
  config.model.in_channels = 1
  config.model.model_channels = 32
  config.model.channel_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attention_resolutions = ()
  config.model.learn_sigma = True
  config.model.use_scale_shift_norm = True
  config.model.resblock_updown = True
  config.model.use_new_attention_order = True

  config.diffusion.steps = 1000
  config.diffusion.noise_schedule = "cosine"
  config.diffusion.loss_type = "rescaled_mse"
  config.diffusion.input_perturbation = 0.1

  config.data.dataset = "digits"
  config.data.random_flip = False      # a mirrored digit is not a digit

  config.training.batch_size = 64
  config.training.num_train_steps = 1500
  config.training.learning_rate = 1e-3     # 10x the paper's 1e-4: a 776k-parameter net must learn in 1500 steps
  config.training.schedule_sampler = "loss-second-moment"
  # The paper's 0.9999 averages over ~10k steps, longer than this whole run: the EMA would still be
  # mostly the random initialisation. 0.995 averages over the last ~200 steps.
  config.training.ema_rates = (0.995,)
  # 1: on XLA:CPU a lax.scan over training steps runs the UNet ~25x slower; raise it on accelerators.
  config.training.steps_per_call = 1
  config.training.log_every_steps = 100
  config.training.checkpoint_every_steps = 500
  config.training.keep_checkpoints = 2
  config.training.keep_every_steps = 0
  config.training.sample_every_steps = 500
  config.training.num_grid_samples = 64
  config.training.grid_sampling_steps = "100"
  return config
