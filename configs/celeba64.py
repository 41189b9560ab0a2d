"""CelebA 64x64 (aligned 178x218 resized straight to 64x64) (REFERENCE.md section 2): 295,136,454 parameters, gamma 0.1."""
from configs import paper_common


def get_config():
  config = paper_common.get_config()
  config.model.image_size = 64
  config.model.model_channels = 192
  config.model.channel_mult = (1, 2, 3, 4)
  config.model.attention_resolutions = (32, 16, 8)
  config.model.num_head_channels = 64
  config.model.dropout = 0.1
  config.diffusion.input_perturbation = 0.1
  config.training.batch_size = 256
  config.data.dataset = "celeb_a"
  return config
