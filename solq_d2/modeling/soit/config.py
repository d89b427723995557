"""``MODEL.SOIT.*``: keys of the SOIT meta-architecture (see solq_d2/config.py).

The deformable transformer itself (layers, heads, points, two-stage, box refinement) is configured
by ``MODEL.DEFORMABLE_TRANSFORMER.*`` (solq_d2/modeling/transformer/config.py); the keys below are
what SOIT adds on top of it. Defaults reproduce the authors' R50 model
(hikvision-research/opera ``configs/soit/soit_r50_16x2_50e_coco.py``, "opera" below).
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_soit_config"]


def add_soit_config(cfg):
    """Add the ``MODEL.SOIT`` keys to ``cfg`` (one comment per key)."""
    cfg.MODEL.SOIT = CN()
    # Number of object classes, background excluded (sigmoid/focal classifier). COCO: 80
    # (opera bbox_head.num_classes). Checked against the training datasets at trainer start.
    cfg.MODEL.SOIT.NUM_CLASSES = 80
    # Number of object queries N: the top-N encoder proposals of the two-stage decoder
    # (opera num_query=300).
    cfg.MODEL.SOIT.NUM_QUERIES = 300
    # Channels C_mask of the mask features F_mask at stride 8 (opera mask_channels=8).
    cfg.MODEL.SOIT.MASK_CHANNELS = 8
    # Heads M_d of the instance-aware (dynamic) deformable attention (opera
    # dynamic_encoder_heads=4). MASK_CHANNELS must be divisible by it.
    cfg.MODEL.SOIT.DYN_HEADS = 4
    # Sampling points K per dynamic head (opera: 4, fixed in its code). The length of each
    # query's generated parameter vector is derived: D = (C_mask+1)(3·M_d·K+1) = 441 by default
    # (paper §3.2: 441; 873 with M_d = 8).
    cfg.MODEL.SOIT.DYN_POINTS = 4
    # Positional encoding of the dynamic layer's queries: "rel" (sine PE of the pixel position
    # relative to the query's own predicted box centre; paper Table 4 "Rel", opera default),
    # "abs" (the same PE with centre (0, 0), Table 4 "Abs"), or "none".
    cfg.MODEL.SOIT.DYN_POS_EMBED = "rel"
    # Upsampling factor of the stride-8 mask logits (CondInst "aligned bilinear"); the losses
    # and the predicted masks live at stride 8 / factor (opera: 4, i.e. stride 2).
    cfg.MODEL.SOIT.MASK_UPSAMPLE = 4
    # Hidden layers of the shared mask-parameter MLP (256 -> 256 -> 256 -> D; opera
    # num_seg_fcs=2). One MLP is shared by all decoder layers, as in opera.
    cfg.MODEL.SOIT.PARAM_MLP_HIDDEN_LAYERS = 2

    # Mask encoder: deformable encoder layers applied to the stride-8 level of the encoder
    # memory before the projection to MASK_CHANNELS (paper Table 3b; opera seg_encoder).
    cfg.MODEL.SOIT.MASK_ENCODER = CN()
    # Number of layers (opera num_layers=1; the paper's ablation: 0 / 1 / 2 layers).
    cfg.MODEL.SOIT.MASK_ENCODER.NUM_LAYERS = 1
    # Attention heads of its single-level deformable attention (opera num_heads=1).
    cfg.MODEL.SOIT.MASK_ENCODER.NHEADS = 1
    # Sampling points per head (opera: mmcv default 4).
    cfg.MODEL.SOIT.MASK_ENCODER.N_POINTS = 4
    # Hidden units of its FFN (opera feedforward_channels=1024).
    cfg.MODEL.SOIT.MASK_ENCODER.DIM_FEEDFORWARD = 1024

    # Loss weights (opera loss_cls/loss_bbox/loss_iou and dice/bce_mask_loss_weight). Class, L1
    # and GIoU apply to every decoder layer and to the two-stage encoder proposals; dice and BCE
    # to the decoder layers listed by MASK_LOSS_LAYERS.
    cfg.MODEL.SOIT.CLASS_WEIGHT = 2.0
    cfg.MODEL.SOIT.BBOX_WEIGHT = 5.0
    cfg.MODEL.SOIT.GIOU_WEIGHT = 2.0
    cfg.MODEL.SOIT.DICE_WEIGHT = 8.0
    cfg.MODEL.SOIT.BCE_WEIGHT = 2.0
    # Focal loss alpha and gamma of the classifier and of the matching cost (opera: 0.25, 2).
    cfg.MODEL.SOIT.FOCAL_ALPHA = 0.25
    cfg.MODEL.SOIT.FOCAL_GAMMA = 2.0
    # How many of the last decoder layers get the mask losses: 6 = all layers (paper Table 5,
    # opera), 1 = last layer only (the paper's Tables 2-4 ablations).
    cfg.MODEL.SOIT.MASK_LOSS_LAYERS = 6

    # Hungarian matching costs (opera HungarianAssigner: FocalLossCost 2, BBoxL1Cost 5,
    # IoUCost giou 2). The mask losses reuse the box/class assignment.
    cfg.MODEL.SOIT.COST_CLASS = 2.0
    cfg.MODEL.SOIT.COST_BBOX = 5.0
    cfg.MODEL.SOIT.COST_GIOU = 2.0
    # Optional mask-aware matching (not in the paper or opera; SOIT.md §9 option B): weights of
    # a dice and a sigmoid-BCE cost between every query's mask and every GT mask, evaluated at
    # MATCHER_NUM_POINTS random points of the stride-2 grid. 0 = off (official behaviour). When
    # on, the dynamic head runs on all queries of every decoder layer during matching.
    cfg.MODEL.SOIT.COST_DICE = 0.0
    cfg.MODEL.SOIT.COST_MASK = 0.0
    cfg.MODEL.SOIT.MATCHER_NUM_POINTS = 12544

    # Padding handling. Defaults reproduce opera, whose mask losses and mask resizing see the
    # padded canvas (SOIT.md §7, §14 #18; fixture README points 2 and 4):
    # - False (opera): dice over all stride-2 pixels, padding included; BCE summed over all
    #   pixels and divided by the number of non-padded ones. True: both losses on the valid
    #   (non-padded) stride-2 region only.
    cfg.MODEL.SOIT.MASK_LOSS_VALID_ONLY = False
    # - False (opera): at inference the whole padded stride-2 map is resized to the image size
    #   (correct only for unpadded images). True (SOIT.md §7 recommendation): crop the valid
    #   ceil(H/2) x ceil(W/2) region first.
    cfg.MODEL.SOIT.MASK_CROP_PADDING = False
    # Images are zero-padded to a multiple of this (pixels). opera pads to the batch maximum
    # only (Pad size_divisor=1); its inference is exact only for unpadded images, so 1 is the
    # faithful default. Use 32 together with MASK_CROP_PADDING=True.
    cfg.MODEL.SOIT.SIZE_DIVISIBILITY = 1

    # Inference: detections kept per image are TEST.DETECTIONS_PER_IMAGE (opera
    # max_per_img=100: top-k over queries x classes, a query may appear with several labels).
    # Probability threshold of the binary masks (opera mask_thresh 0.5, strict ">").
    cfg.MODEL.SOIT.MASK_THRESHOLD = 0.5
    return cfg
