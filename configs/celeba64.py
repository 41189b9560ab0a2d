"""CelebA 64x64 (aligned 178x218 resized straight to 64x64) (REFERENCE.md section 2): 295,136,454 parameters, gamma 0.1, global batch 256."""
from configs import paper_common


def get_config():
  return paper_common.get_config(64, gamma=0.1, batch_size=256, dataset="celeb_a")
