"""Official QueryInst checkpoints (hustvl/QueryInst, mmdetection 2.12) -> solq_d2 ``QueryInst``.

The official files are ``{"state_dict": {mmdet name: tensor}, "meta": {...}}`` with mmdet's
ResNet / FPN / ``EmbeddingRPNHead`` / ``QueryRoIHead`` names (QUERYINST.md §9 and Appendix A).
This module only renames; it imports nothing from Detectron2.
"""

import re
from typing import Dict, Optional

import torch

__all__ = ["matches", "convert", "mmdet_to_d2_key"]

# (pattern, replacement) tried in order with re.fullmatch; a replacement is a re template or a
# function of the match (for shifted indices).
_STAGE = r"roi_head\.bbox_head\.(\d+)\."
_MASK = r"roi_head\.mask_head\.(\d+)\."
_RES = "backbone.bottom_up.res"
# parameter / buffer names of Linear, Conv, LayerNorm and BatchNorm modules
_P = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_RULES = [
    # ResNet (mmdet "pytorch" style; layer{L} = res{L+1}) -> Detectron2 ResNet
    (r"backbone\.conv1\.weight", "backbone.bottom_up.stem.conv1.weight"),
    (r"backbone\.bn1\." + _P, r"backbone.bottom_up.stem.conv1.norm.\1"),
    (
        r"backbone\.layer(\d)\.(\d+)\.conv(\d)\.weight",
        lambda m: f"{_RES}{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight",
    ),
    (
        r"backbone\.layer(\d)\.(\d+)\.bn(\d)\." + _P,
        lambda m: f"{_RES}{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}",
    ),
    (
        r"backbone\.layer(\d)\.(\d+)\.downsample\.0\.weight",
        lambda m: f"{_RES}{int(m[1]) + 1}.{m[2]}.shortcut.weight",
    ),
    (
        r"backbone\.layer(\d)\.(\d+)\.downsample\.1\." + _P,
        lambda m: f"{_RES}{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}",
    ),
    # FPN (level i = P{i+2})
    (
        r"neck\.lateral_convs\.(\d)\.conv\.(weight|bias)",
        lambda m: f"backbone.fpn_lateral{int(m[1]) + 2}.{m[2]}",
    ),
    (
        r"neck\.fpn_convs\.(\d)\.conv\.(weight|bias)",
        lambda m: f"backbone.fpn_output{int(m[1]) + 2}.{m[2]}",
    ),
    # learned proposals (EmbeddingRPNHead)
    (r"rpn_head\.init_proposal_bboxes\.weight", "init_proposal_boxes.weight"),
    (r"rpn_head\.init_proposal_features\.weight", "init_proposal_features.weight"),
    # DIIHead -> QueryInstStage
    (
        _STAGE + r"attention\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
        r"head.head_series.\1.self_attn.\2",
    ),
    (_STAGE + r"attention_norm\." + _P, r"head.head_series.\1.norm1.\2"),
    (
        _STAGE + r"instance_interactive_conv\.(dynamic_layer\.(?:weight|bias))",
        r"head.head_series.\1.inst_interact.\2",
    ),
    (
        _STAGE + r"instance_interactive_conv\.norm_in\." + _P,
        r"head.head_series.\1.inst_interact.norm1.\2",
    ),
    (
        _STAGE + r"instance_interactive_conv\.norm_out\." + _P,
        r"head.head_series.\1.inst_interact.norm2.\2",
    ),
    (
        _STAGE + r"instance_interactive_conv\.fc_layer\." + _P,
        r"head.head_series.\1.inst_interact.out_layer.\2",
    ),
    (
        _STAGE + r"instance_interactive_conv\.fc_norm\." + _P,
        r"head.head_series.\1.inst_interact.norm3.\2",
    ),
    (_STAGE + r"instance_interactive_conv_norm\." + _P, r"head.head_series.\1.norm2.\2"),
    (_STAGE + r"ffn\.layers\.0\.0\." + _P, r"head.head_series.\1.linear1.\2"),
    (_STAGE + r"ffn\.layers\.1\." + _P, r"head.head_series.\1.linear2.\2"),
    (_STAGE + r"ffn_norm\." + _P, r"head.head_series.\1.norm3.\2"),
    (_STAGE + r"cls_fcs\.(\d+)\." + _P, r"head.head_series.\1.cls_module.\2.\3"),
    (_STAGE + r"reg_fcs\.(\d+)\." + _P, r"head.head_series.\1.reg_module.\2.\3"),
    (_STAGE + r"fc_cls\." + _P, r"head.head_series.\1.class_logits.\2"),
    (_STAGE + r"fc_reg\." + _P, r"head.head_series.\1.bboxes_delta.\2"),
    # DynamicMaskHead (convs.{i} = mask_fcn{i+1})
    (
        _MASK + r"instance_interactive_conv\.(dynamic_layer\.(?:weight|bias))",
        r"head.mask_heads.\1.dynamic_conv.\2",
    ),
    (
        _MASK + r"instance_interactive_conv\.norm_in\." + _P,
        r"head.mask_heads.\1.dynamic_conv.norm1.\2",
    ),
    (
        _MASK + r"instance_interactive_conv\.norm_out\." + _P,
        r"head.mask_heads.\1.dynamic_conv.norm2.\2",
    ),
    (
        _MASK + r"convs\.(\d+)\.conv\." + _P,
        lambda m: f"head.mask_heads.{m[1]}.mask_fcn{int(m[2]) + 1}.{m[3]}",
    ),
    (
        _MASK + r"convs\.(\d+)\.bn\." + _P,
        lambda m: f"head.mask_heads.{m[1]}.mask_fcn{int(m[2]) + 1}.norm.{m[3]}",
    ),
    (_MASK + r"upsample\." + _P, r"head.mask_heads.\1.deconv.\2"),
    (_MASK + r"conv_logits\." + _P, r"head.mask_heads.\1.predictor.\2"),
]
_COMPILED = [(re.compile(p), r) for p, r in _RULES]


def mmdet_to_d2_key(key: str) -> Optional[str]:
    """The solq_d2 name of an official mmdet QueryInst key, or None if no rule applies."""
    for pattern, repl in _COMPILED:
        m = pattern.fullmatch(key)
        if m is not None:
            return repl(m) if callable(repl) else m.expand(repl)
    return None


def _state_dict(checkpoint) -> Optional[Dict[str, torch.Tensor]]:
    if not isinstance(checkpoint, dict):
        return None
    sd = checkpoint.get("state_dict", checkpoint)
    return sd if isinstance(sd, dict) else None


def matches(checkpoint: dict) -> bool:
    """True if the object loaded from a file is an official (mmdet) QueryInst / Sparse R-CNN
    checkpoint: learned proposals under ``rpn_head.init_proposal_bboxes`` and ``QueryRoIHead``
    stages under ``roi_head.bbox_head.{s}``."""
    sd = _state_dict(checkpoint)
    if not sd:
        return False
    return "rpn_head.init_proposal_bboxes.weight" in sd and any(
        isinstance(k, str) and k.startswith("roi_head.bbox_head.0.") for k in sd
    )


def _describe(sd: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """Architecture numbers read from an mmdet state dict."""
    stages = {int(k.split(".")[2]) for k in sd if k.startswith("roi_head.bbox_head.")}
    masks = {int(k.split(".")[2]) for k in sd if k.startswith("roi_head.mask_head.")}
    q = sd["rpn_head.init_proposal_features.weight"]
    info = {
        "num_queries": q.shape[0],
        "hidden_dim": q.shape[1],
        "num_stages": len(stages),
        "num_mask_heads": len(masks),
    }
    if "roi_head.bbox_head.0.fc_cls.weight" in sd:
        info["num_classes"] = sd["roi_head.bbox_head.0.fc_cls.weight"].shape[0]
    return info


def _check_against_model(sd: Dict[str, torch.Tensor], model) -> None:
    """Raise ValueError if the checkpoint's architecture differs from ``model``'s."""
    info = _describe(sd)
    head = model.head
    expected = {
        "num_queries": model.init_proposal_features.weight.shape[0],
        "hidden_dim": model.init_proposal_features.weight.shape[1],
        "num_stages": len(head.head_series),
        "num_mask_heads": len(head.mask_heads) if head.mask_on else 0,
        "num_classes": head.head_series[0].class_logits.out_features,
    }
    keys = {
        "num_queries": "MODEL.QUERYINST.NUM_QUERIES",
        "hidden_dim": "MODEL.QUERYINST.HIDDEN_DIM",
        "num_stages": "MODEL.QUERYINST.NUM_STAGES",
        "num_mask_heads": "MODEL.MASK_ON / MODEL.QUERYINST.NUM_STAGES",
        "num_classes": "MODEL.QUERYINST.NUM_CLASSES",
    }
    diffs = [
        f"{keys[k]}: checkpoint has {info[k]}, model has {expected[k]}"
        for k in expected
        if k in info and info[k] != expected[k]
    ]
    if diffs:
        raise ValueError(
            "The official QueryInst checkpoint does not fit the model configuration:\n  "
            + "\n  ".join(diffs)
        )


def convert(checkpoint: dict, model: "torch.nn.Module | None" = None) -> dict:
    """Rename an official QueryInst state dict to solq_d2 names.

    Args:
        checkpoint: the object loaded from the official file (``{"state_dict", "meta"}``) or a bare
            mmdet state dict.
        model: optional solq_d2 ``QueryInst``; the checkpoint's queries, width, stages, mask heads
            and classes are checked against it, and ``num_batches_tracked`` buffers the model does
            not have (FrozenBN backbone) are dropped.

    Returns:
        ``{"model": {name: tensor}, "renames": [(old, new)], "dropped": [old names]}``.

    Raises:
        ValueError: not a QueryInst checkpoint, a key without a rule, or a configuration mismatch
            with ``model`` (raised before anything is loaded).
    """
    if not matches(checkpoint):
        raise ValueError(
            "not an official QueryInst checkpoint (expected an mmdet state_dict with "
            "'rpn_head.init_proposal_bboxes.weight' and 'roi_head.bbox_head.0.*')"
        )
    sd = _state_dict(checkpoint)
    if model is not None:
        _check_against_model(sd, model)
        model_keys = set(model.state_dict().keys())
    out, renames, dropped, unknown = {}, [], [], []
    for key, value in sd.items():
        new = mmdet_to_d2_key(key)
        if new is None:
            unknown.append(key)
            continue
        if new.endswith("num_batches_tracked") and (
            (model is None and new.startswith("backbone."))
            or (model is not None and new not in model_keys)
        ):
            dropped.append(key)  # FrozenBN has no such buffer
            continue
        out[new] = value
        renames.append((key, new))
    if unknown:
        raise ValueError(
            f"{len(unknown)} keys of the QueryInst checkpoint have no solq_d2 equivalent "
            f"(unsupported backbone or head?): {unknown[:20]}"
            + (" ..." if len(unknown) > 20 else "")
        )
    return {"model": out, "renames": renames, "dropped": dropped}
