"""``add_solq_d2_config(cfg)``: every config key of solq_d2, on top of Detectron2's defaults.

Keys are grouped by the part of the project that reads them; each group lives next to its code
and has one comment per key:

* data (``INPUT.*``, ``DATASETS.*``): ``solq_d2/data/config.py``
* training (``SOLVER.*``, ``TEST.*``): ``solq_d2/engine/config.py``
* deformable transformer and ops (``MODEL.DEFORMABLE_TRANSFORMER.*``, ``MODEL.MSDA.*``):
  ``solq_d2/modeling/transformer/config.py``
* ``MODEL.SOLQ.*``, ``MODEL.SOIT.*``, ``MODEL.QUERYINST.*``: ``solq_d2/modeling/<method>/config.py``
"""

__all__ = ["add_solq_d2_config"]


def add_solq_d2_config(cfg):
    """Add all solq_d2 keys to a Detectron2 ``CfgNode`` (idempotent)."""
    from .data.config import add_data_config
    from .engine.config import add_engine_config
    from .modeling.queryinst.config import add_queryinst_config
    from .modeling.soit.config import add_soit_config
    from .modeling.solq.config import add_solq_config
    from .modeling.transformer.config import add_deformable_transformer_config

    if getattr(cfg, "_SOLQ_D2_CONFIG_ADDED", False):
        return cfg
    add_data_config(cfg)
    add_engine_config(cfg)
    add_deformable_transformer_config(cfg)
    add_solq_config(cfg)
    add_soit_config(cfg)
    add_queryinst_config(cfg)
    cfg.__dict__["_SOLQ_D2_CONFIG_ADDED"] = True
    return cfg
