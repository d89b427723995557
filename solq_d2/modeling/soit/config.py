"""Config keys of this part of solq_d2 (see solq_d2/config.py)."""
from detectron2.config import CfgNode as CN  # noqa: F401


def add_soit_config(cfg):
    """Add this part's keys to cfg (one comment per key)."""
