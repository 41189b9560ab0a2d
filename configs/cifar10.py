"""CIFAR-10 32x32 (REFERENCE.md section 2): 57,094,662 parameters, gamma 0.15."""
from configs import paper_common


def get_config():
  config = paper_common.get_config()
  config.model.image_size = 32
  config.model.model_channels = 128
  config.model.channel_mult = (1, 2, 2, 2)
  config.model.attention_resolutions = (16, 8)
  config.model.num_head_channels = 32
  config.model.dropout = 0.3
  config.diffusion.input_perturbation = 0.15
  config.training.batch_size = 128
  config.data.dataset = "cifar10"
  return config
