"""``MODEL.SOLQ.*``: keys of the SOLQ meta-architecture (see solq_d2/config.py).

The transformer is configured by ``MODEL.DEFORMABLE_TRANSFORMER.*``
(solq_d2/modeling/transformer/config.py). Defaults below are the official code's
(megvii-research/SOLQ ``main.py`` + ``configs/r50_solq_train.sh``, "official" below), except
``NUM_CLASSES`` (80 contiguous Detectron2 classes instead of the 91 raw COCO ids).
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_solq_config"]


def add_solq_config(cfg):
    """Add the ``MODEL.SOLQ`` keys to ``cfg`` (one comment per key)."""
    cfg.MODEL.SOLQ = CN()
    s = cfg.MODEL.SOLQ
    # Number of classifier outputs K (sigmoid/focal, no background logit). 80 for COCO with
    # Detectron2's contiguous ids; the official COCO models use 91 (index = COCO category id),
    # see COCO_ID_LABELS. Checked against the training datasets at trainer start.
    s.NUM_CLASSES = 80
    # The classifier index is the raw COCO category id (official 91-way head, NUM_CLASSES 91):
    # predictions are mapped to Detectron2's contiguous ids 0..79 (indices that are not a COCO
    # category, e.g. 0 or 12, are dropped) and training labels are mapped to COCO ids.
    # False: pred_classes are the classifier indices as they are.
    s.COCO_ID_LABELS = False
    # Number of object queries N (official --num_queries 300).
    s.NUM_QUERIES = 300
    # Supervise every decoder layer, each with its own Hungarian matching (official --aux_loss).
    s.AUX_LOSS = True
    # Hidden size of the 3-layer mask-vector MLP d -> H -> H -> N_KEEP, shared by all decoder
    # layers (official --vector_hidden_dim 1024 in the released scripts).
    s.VECTOR_HIDDEN_DIM = 1024
    # Side N (pixels) of the box-cropped GT mask that is DCT-encoded (official --gt_mask_len 128).
    s.GT_MASK_LEN = 128
    # Number of zig-zag DCT coefficients kept, n_k in the paper (official --n_keep 256).
    s.N_KEEP = 256
    # Binarisation of a decoded mask: "minmax" (official dct.py, the released models: pixel > (max
    # + min) / 2 of its inverse DCT, then pasted with threshold 0.5) or "fixed" (fast_solq.py:
    # the soft inverse DCT is pasted and thresholded at 0.5).
    s.MASK_DECODE_THRESHOLD = "minmax"
    # lambda_vec, multiplies the L1 mask-vector loss inside it (official --vector_loss_coef 3).
    s.VECTOR_LOSS_COEF = 3.0
    # Normalisation of the L1 vector loss: "mean" (official solq.py: mean over matched instances
    # x N_KEEP elements) or "num_boxes" (fast_solq.py: sum / number of GT boxes).
    s.VECTOR_LOSS_NORM = "mean"
    # Loss weights (official --cls_loss_coef 2, --bbox_loss_coef 5, --giou_loss_coef 2; the vector
    # loss has weight 1, its coefficient is VECTOR_LOSS_COEF). Same for every decoder layer.
    s.CLASS_WEIGHT = 2.0
    s.BBOX_WEIGHT = 5.0
    s.GIOU_WEIGHT = 2.0
    s.VECTOR_WEIGHT = 1.0
    # Matching costs: focal class cost, L1 on normalised cxcywh, -GIoU (official
    # --set_cost_class 2, --set_cost_bbox 5, --set_cost_giou 2). Masks are not matched.
    s.COST_CLASS = 2.0
    s.COST_BBOX = 5.0
    s.COST_GIOU = 2.0
    # Focal loss alpha and gamma of the classification loss and matching cost (official
    # --focal_alpha 0.25; gamma 2 is hard-coded there).
    s.FOCAL_ALPHA = 0.25
    s.FOCAL_GAMMA = 2.0
    # Pad batched images to a multiple of this (pixels). 0 = official: pad only to the batch
    # maximum; any other value changes every feature (valid ratios, GroupNorm statistics).
    s.SIZE_DIVISIBILITY = 0
    return cfg
