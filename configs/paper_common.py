"""What every DDPM-IP paper run shares (REFERENCE.md section 2): ADM, cosine schedule, learned range
variance with the hybrid loss, scale-shift norm, res-block up/down, new attention order,
loss-second-moment sampling, AdamW 1e-4, one EMA at 0.9999; and the network of each resolution."""
from configs import default

# The paper's networks by image size (REFERENCE.md section 2), 3 res blocks per level for all.
NETWORKS = {
    32: dict(model_channels=128, channel_mult=(1, 2, 2, 2), attention_resolutions=(16, 8),
             num_head_channels=32, dropout=0.3),    # 57,094,662 parameters
    64: dict(model_channels=192, channel_mult=(1, 2, 3, 4), attention_resolutions=(32, 16, 8),
             num_head_channels=64, dropout=0.1),    # 295,136,454 parameters
    128: dict(model_channels=256, channel_mult=(1, 1, 2, 3, 4), attention_resolutions=(32, 16, 8),
              num_head_channels=64, dropout=0.1),   # 542,811,398 parameters
}


def get_config(image_size, *, gamma, batch_size, dataset):
  config = default.get_config()
  config.model.image_size = image_size
  config.model.update(NETWORKS[image_size])
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
  config.diffusion.input_perturbation = gamma
  config.training.batch_size = batch_size  # global, over all devices and hosts
  config.training.schedule_sampler = "loss-second-moment"
  config.training.learning_rate = 1e-4
  config.training.ema_rates = (0.9999,)
  config.data.dataset = dataset
  return config
