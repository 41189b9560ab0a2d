"""CIFAR-10 32x32 (REFERENCE.md section 2): 57,094,662 parameters, gamma 0.15, global batch 128."""
from configs import paper_common


def get_config():
  return paper_common.get_config(32, gamma=0.15, batch_size=128, dataset="cifar10")
