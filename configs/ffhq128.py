"""FFHQ 128x128 (REFERENCE.md section 2): 542,811,398 parameters, gamma 0.1, global batch 128.

The official 128x128 thumbnails, as an image folder:
  --config.data.data_dir=/path/to/thumbnails128x128
"""
from configs import paper_common


def get_config():
  return paper_common.get_config(128, gamma=0.1, batch_size=128, dataset="folder")
