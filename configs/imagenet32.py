"""ImageNet 32x32 (the official downsampled set) (REFERENCE.md section 2): 57,094,662 parameters, gamma 0.1, global batch 512."""
from configs import paper_common


def get_config():
  return paper_common.get_config(32, gamma=0.1, batch_size=512, dataset="imagenet32")
