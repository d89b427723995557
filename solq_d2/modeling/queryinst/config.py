"""``MODEL.QUERYINST.*``: keys of the QueryInst meta-architecture (see solq_d2/config.py).

Defaults reproduce the official QueryInst R50-FPN (hustvl/QueryInst @ 5c245e6, an mmdetection
2.12 fork; config ``queryinst_r50_fpn_100_proposals_mstrain_480-800_3x_coco.py``). Where mmdet and
Detectron2 (Sparse R-CNN) conventions differ, the default is the official QueryInst behaviour and
the comment names the alternative. Detectron2's own keys are reused with their usual meaning:
``MODEL.MASK_ON`` (False gives Sparse R-CNN: no mask heads), ``MODEL.BACKBONE``,
``MODEL.RESNETS``, ``MODEL.FPN``, ``MODEL.PIXEL_MEAN/STD``.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_queryinst_config"]


def add_queryinst_config(cfg):
    """Add the ``MODEL.QUERYINST`` keys to ``cfg`` (one comment per key)."""
    cfg.MODEL.QUERYINST = CN()
    # Number of object classes K. Drives the box classifier of every stage AND the class channels
    # of every dynamic mask head (the official code needs it in 12 places, hustvl/QueryInst#20).
    # Checked against the training datasets' thing_classes at trainer start. COCO: 80.
    cfg.MODEL.QUERYINST.NUM_CLASSES = 80
    # Number of learned proposals / queries N (official `num_proposals`: 100, or 300 for the
    # "crop" configs).
    cfg.MODEL.QUERYINST.NUM_QUERIES = 100
    # Number of dynamic stages S (official `num_stages`); each stage has its own weights.
    cfg.MODEL.QUERYINST.NUM_STAGES = 6
    # Query / RoI feature width C (official `proposal_feature_channel`, DIIHead `in_channels`).
    # Must equal MODEL.FPN.OUT_CHANNELS.
    cfg.MODEL.QUERYINST.HIDDEN_DIM = 256
    # Heads of the multi-head self-attention between the queries of an image (DIIHead num_heads).
    cfg.MODEL.QUERYINST.NUM_HEADS = 8
    # Hidden width of the per-stage FFN (DIIHead feedforward_channels).
    cfg.MODEL.QUERYINST.DIM_FEEDFORWARD = 2048
    # Dropout probability in MSA, dynamic-conv residual and FFN. Official 0.0 (Sparse R-CNN #96:
    # 0.0 gives +0.5 AP).
    cfg.MODEL.QUERYINST.DROPOUT = 0.0
    # Width of the dynamic convolution's first 1x1 (DynamicConv feat_channels, 64): the query
    # generates a C x 64 and a 64 x C matrix.
    cfg.MODEL.QUERYINST.DYNAMIC_DIM = 64
    # Number of [Linear(no bias) -> LN -> ReLU] blocks in the classification tower (num_cls_fcs).
    cfg.MODEL.QUERYINST.NUM_CLS_FCS = 1
    # Number of [Linear(no bias) -> LN -> ReLU] blocks in the regression tower (num_reg_fcs).
    cfg.MODEL.QUERYINST.NUM_REG_FCS = 3
    # Prior probability of the class-logit bias init, b = -log((1 - p) / p) (bias_init_with_prob).
    cfg.MODEL.QUERYINST.PRIOR_PROB = 0.01
    # FPN levels the RoIs are pooled from (strides 4..32; the official FPN has no P6).
    cfg.MODEL.QUERYINST.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    # RoIAlign output size of the box branch (7 x 7, official bbox_roi_extractor).
    cfg.MODEL.QUERYINST.BOX_POOLER_RESOLUTION = 7
    # RoIAlign output size of the mask branch (14 x 14, official mask_roi_extractor); the mask head
    # upsamples it x2, so masks and their training targets are 28 x 28 (official mask_size).
    cfg.MODEL.QUERYINST.MASK_POOLER_RESOLUTION = 14
    # RoIAlign sampling points per bin side (2 in both official extractors).
    cfg.MODEL.QUERYINST.POOLER_SAMPLING_RATIO = 2
    # Detectron2 pooler type; "ROIAlignV2" = RoIAlign with aligned=True (mmcv RoIAlign default).
    cfg.MODEL.QUERYINST.POOLER_TYPE = "ROIAlignV2"
    # FPN level assignment of a RoI: floor(log2(sqrt(wh) / FINEST_SCALE + 1e-6)) clamped to the
    # levels, as mmdet's SingleRoIExtractor (finest_scale=56, pixels). Detectron2's
    # canonical-level rule maps the same sizes up to its 1e-8 epsilon.
    cfg.MODEL.QUERYINST.FINEST_SCALE = 56.0
    # Box-delta weights (wx, wy, ww, wh): dx = delta_x / wx ... (mmdet DeltaXYWHBBoxCoder
    # target_stds = (0.5, 0.5, 1, 1) = 1 / weights).
    cfg.MODEL.QUERYINST.BBOX_REG_WEIGHTS = (2.0, 2.0, 1.0, 1.0)
    # Clamp of the log-size deltas dw, dh before exp(): "mmdet" = |dw|, |dh| <= |log(16/1000)|
    # (4.135, both sides; official QueryInst), "d2" = dw, dh <= log(100000/16) = 8.740, upper bound
    # only (Detectron2 Sparse R-CNN).
    cfg.MODEL.QUERYINST.SCALE_CLAMP = "mmdet"
    # Convs of the dynamic mask head's FCN (4 x [3x3 conv + norm + ReLU], FCNMaskHead num_convs).
    cfg.MODEL.QUERYINST.MASK_NUM_CONVS = 4
    # Channels of those convs and of the x2 deconvolution (conv_out_channels).
    cfg.MODEL.QUERYINST.MASK_CONV_DIM = 256
    # Norm of the mask FCN convs: "BN" (official: plain BatchNorm2d, batch statistics over the
    # positive RoIs of the batch on each GPU; the conv keeps its bias), or any Detectron2 norm name
    # ("SyncBN", "GN", "" for none). Detectron2's Mask R-CNN head has no norm.
    cfg.MODEL.QUERYINST.MASK_NORM = "BN"
    # Hungarian matching cost weight of the focal class cost (official HungarianAssigner
    # FocalLossCost weight 2.0; alpha/gamma below, eps 1e-12).
    cfg.MODEL.QUERYINST.COST_CLASS = 2.0
    # Matching cost weight of the L1 distance between xyxy boxes divided by the unpadded image
    # size (official BBoxL1Cost, box_format "xyxy", weight 5.0).
    cfg.MODEL.QUERYINST.COST_BBOX = 5.0
    # Matching cost weight of -GIoU (official IoUCost iou_mode "giou", weight 2.0).
    cfg.MODEL.QUERYINST.COST_GIOU = 2.0
    # Weight of the sigmoid focal classification loss, summed over all N x K entries and divided
    # by the number of matched queries (official DIIHead loss_cls weight 2.0).
    cfg.MODEL.QUERYINST.CLASS_WEIGHT = 2.0
    # Weight of the L1 loss on image-normalised xyxy boxes of matched queries (loss_bbox 5.0).
    cfg.MODEL.QUERYINST.L1_WEIGHT = 5.0
    # Weight of the GIoU loss (pixels) of matched queries (loss_iou 2.0).
    cfg.MODEL.QUERYINST.GIOU_WEIGHT = 2.0
    # Weight of the dice loss (squared denominators, eps 1e-5) on the 28 x 28 masks of matched
    # queries (DynamicMaskHead loss_mask / loss_dice 8.0).
    cfg.MODEL.QUERYINST.MASK_WEIGHT = 8.0
    # Focal alpha (weight of positives) of the focal loss and focal matching cost (0.25).
    cfg.MODEL.QUERYINST.FOCAL_ALPHA = 0.25
    # Focal gamma (focusing exponent) of the focal loss and focal matching cost (2.0).
    cfg.MODEL.QUERYINST.FOCAL_GAMMA = 2.0
    # Weight of each stage's losses (official stage_loss_weights: all 1). Length NUM_STAGES.
    cfg.MODEL.QUERYINST.STAGE_LOSS_WEIGHTS = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    # Detections per image at test time: top-k over the N x K sigmoid scores of the last stage,
    # without score threshold or NMS (official max_per_img = num_proposals: 100 or 300).
    cfg.MODEL.QUERYINST.TEST_TOPK = 100
    # Threshold on the pasted mask probabilities (official mask_thr_binary, ">=").
    cfg.MODEL.QUERYINST.MASK_THRESHOLD = 0.5
    # Clip output boxes to the output image and paste masks with the clipped boxes (Detectron2's
    # detector_postprocess). False = official: boxes are not clipped and masks are pasted with the
    # unclipped boxes.
    cfg.MODEL.QUERYINST.CLIP_BOXES = False
    return cfg
