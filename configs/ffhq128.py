"""FFHQ 128x128 (the official thumbnails) (REFERENCE.md section 2): 542,811,398 parameters, gamma 0.1."""
from configs import paper_common


def get_config():
  config = paper_common.get_config()
  config.model.image_size = 128
  config.model.model_channels = 256
  config.model.channel_mult = (1, 1, 2, 3, 4)
  config.model.attention_resolutions = (32, 16, 8)
  config.model.num_head_channels = 64
  config.model.dropout = 0.1
  config.diffusion.input_perturbation = 0.1
  config.training.batch_size = 128
  config.data.dataset = "folder"
  return config
