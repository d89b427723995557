"""Models; importing this registers SOLQ, SOIT and QueryInst in META_ARCH_REGISTRY and the
``build_narrow_resnet_backbone`` backbone (small from-scratch CPU configs) in BACKBONE_REGISTRY."""
from . import backbone, queryinst, soit, solq  # noqa: F401  (registration)
