"""A narrow ResNet-18/34 for training from scratch on CPU (e.g. ``configs/SOIT/soit_shapes.yaml``)."""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet

__all__ = ["build_narrow_resnet_backbone"]


@BACKBONE_REGISTRY.register()
def build_narrow_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """Detectron2's ResNet-18/34 (``BasicBlock``) with configurable widths.

    Detectron2's ``build_resnet_backbone`` fixes the widths of R18/R34 to 64-64-128-256-512. Here
    the stem has ``MODEL.RESNETS.STEM_OUT_CHANNELS`` channels and res2
    ``MODEL.RESNETS.RES2_OUT_CHANNELS``, doubling at every later stage (32 and 32 give a
    half-width ResNet-18 with about a quarter of its FLOPs). ``DEPTH`` (18 or 34), ``NORM``,
    ``OUT_FEATURES`` and ``MODEL.BACKBONE.FREEZE_AT`` keep Detectron2's meaning; the modules are
    Detectron2's own.
    """
    r = cfg.MODEL.RESNETS
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}
    if r.DEPTH not in blocks:
        raise ValueError(f"build_narrow_resnet_backbone supports DEPTH 18 or 34, got {r.DEPTH}")
    stem = BasicStem(
        in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=r.NORM
    )
    stages = []
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    for idx, n in enumerate(blocks[r.DEPTH]):
        stages.append(
            ResNet.make_stage(
                block_class=BasicBlock,
                num_blocks=n,
                stride_per_block=[1 if idx == 0 else 2] + [1] * (n - 1),
                in_channels=in_channels,
                out_channels=out_channels,
                norm=r.NORM,
            )
        )
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
