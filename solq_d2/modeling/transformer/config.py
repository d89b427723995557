"""Config keys of the shared deformable transformer (``MODEL.DEFORMABLE_TRANSFORMER.*``) and of
the deformable-attention op (``MODEL.MSDA.*``); see solq_d2/config.py."""

from detectron2.config import CfgNode as CN

__all__ = ["add_deformable_transformer_config"]


def add_deformable_transformer_config(cfg):
    """Add ``MODEL.DEFORMABLE_TRANSFORMER.*`` and ``MODEL.MSDA.*`` (one comment per key).

    Defaults are Deformable DETR's (``main.py`` of fundamentalvision/Deformable-DETR); each
    method's base config overrides what differs (SOLQ's released models: HIDDEN_DIM 384).
    """
    cfg.MODEL.DEFORMABLE_TRANSFORMER = CN()
    t = cfg.MODEL.DEFORMABLE_TRANSFORMER
    # Backbone outputs fed to the input projections, finest first (C3, C4, C5 of a ResNet).
    t.IN_FEATURES = ["res3", "res4", "res5"]
    # Number of feature levels L (paper: L = 4); levels beyond IN_FEATURES are 3x3 stride-2
    # convs, the first on the raw last backbone level. Deformable DETR --num_feature_levels 4.
    t.NUM_FEATURE_LEVELS = 4
    # Channels d of the transformer (queries, memory, input projections). Deformable DETR and
    # SOIT: 256 (--hidden_dim); SOLQ's main.py default and its released models: 384.
    t.HIDDEN_DIM = 256
    # Attention heads M of every (deformable and ordinary) attention. --nheads 8.
    t.NHEADS = 8
    # Encoder layers (--enc_layers 6).
    t.ENC_LAYERS = 6
    # Decoder layers (--dec_layers 6); every layer is supervised when MODEL.<METHOD>.AUX_LOSS.
    t.DEC_LAYERS = 6
    # Hidden size of the feed-forward network of every layer (--dim_feedforward 1024).
    t.DIM_FEEDFORWARD = 1024
    # Dropout probability after attention and in the FFN (--dropout 0.1).
    t.DROPOUT = 0.1
    # FFN activation: "relu" | "gelu" | "glu" (--activation relu).
    t.ACTIVATION = "relu"
    # Sampling points K per head and level of the encoder's deformable attention (--enc_n_points 4).
    t.ENC_N_POINTS = 4
    # Sampling points K per head and level of the decoder's cross-attention (--dec_n_points 4).
    t.DEC_N_POINTS = 4
    # Iterative bounding-box refinement: each decoder layer refines the previous layer's box,
    # used (detached) as its 4-d reference. Deformable DETR --with_box_refine (SOLQ, SOIT: True).
    t.WITH_BOX_REFINE = True
    # Two-stage Deformable DETR: queries are the top-scoring encoder proposals (SOIT: True;
    # SOLQ's released models: False). --two_stage.
    t.TWO_STAGE = False
    # Proposals kept in two-stage mode; equals the number of queries (--num_queries 300).
    t.TWO_STAGE_NUM_PROPOSALS = 300
    # Temperature T of the 2-D sine position encoding (10000 in DETR and Deformable DETR).
    t.PE_TEMPERATURE = 10000.0

    cfg.MODEL.MSDA = CN()
    # Multi-scale deformable attention implementation: "auto" (the compiled solq_d2._C kernel
    # when it is available for the tensors' device, else PyTorch) or "pytorch" (always the
    # grid_sample reference; for export and debugging).
    cfg.MODEL.MSDA.IMPL = "auto"
    return cfg
