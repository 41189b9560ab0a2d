"""What every DDPM-IP paper run shares (REFERENCE.md section 2): ADM, cosine schedule, learned range
variance with the hybrid loss, scale-shift norm, res-block up/down, new attention order,
loss-second-moment sampling, AdamW 1e-4, one EMA at 0.9999."""
from configs import default


def get_config():
  config = default.get_config()
  config.model.num_res_blocks = 3
  config.model.learn_sigma = True
  config.model.use_scale_shift_norm = True
  config.model.resblock_updown = True
  config.model.use_new_attention_order = True
  # The reference trains in fp16; bfloat16 is the TPU/GPU equivalent (params and EMA stay float32).
  config.model.dtype = "bfloat16"
  config.diffusion.steps = 1000
  config.diffusion.noise_schedule = "cosine"
  config.diffusion.loss_type = "rescaled_mse"
  config.diffusion.input_perturbation = 0.1
  config.training.schedule_sampler = "loss-second-moment"
  config.training.learning_rate = 1e-4
  config.training.ema_rates = (0.9999,)
  return config
