"""Official SOIT checkpoints (hikvision-research/opera, mmdet format) -> solq_d2 ``SOIT`` names.

An opera checkpoint is ``{"state_dict": {...}, "meta": {...}}`` (mmcv ``save_checkpoint``; the
optimizer state, when present, is ignored). Its names are mmdet's: ``backbone.*`` (mmdet
ResNet), ``neck.*`` (ChannelMapper), ``bbox_head.transformer.*`` (mmcv transformer layers with
``attentions``/``norms``/``ffns`` lists) and ``bbox_head.{cls,reg,seg}_branches.*``. The renaming
below is a fixed, ordered list of rules; ``seg_branches.{1..5}`` are aliases of
``seg_branches.0`` (one MLP shared by the decoder layers) and are dropped after checking that
they are identical, and ``num_batches_tracked`` buffers are dropped (Detectron2's FrozenBN has
none). Only torch is imported, so this works without Detectron2.
"""

import re
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

__all__ = ["matches", "convert", "RENAME_RULES"]

# keys only a SOIT (opera SOITHead + SOITTransformer) checkpoint has
_SIGNATURE = (
    "bbox_head.seg_branches.0.4.weight",
    "bbox_head.transformer.seg_encoder.layers.0.attentions.0.sampling_offsets.weight",
    "bbox_head.transformer.mask_trans.weight",
)

# encoder-style mmcv layer (attn, norm, ffn, norm) -> Deformable DETR names
_ENC_LAYER = [
    (r"attentions\.0\.", "self_attn."),
    (r"norms\.0\.", "norm1."),
    (r"ffns\.0\.layers\.0\.0\.", "linear1."),
    (r"ffns\.0\.layers\.1\.", "linear2."),
    (r"norms\.1\.", "norm2."),
]
# decoder layer (self_attn, norm, cross_attn, norm, ffn, norm) -> Deformable DETR names
_DEC_LAYER = [
    (r"attentions\.0\.attn\.", "self_attn."),
    (r"attentions\.1\.", "cross_attn."),
    (r"norms\.0\.", "norm2."),
    (r"norms\.1\.", "norm1."),
    (r"norms\.2\.", "norm3."),
    (r"ffns\.0\.layers\.0\.0\.", "linear1."),
    (r"ffns\.0\.layers\.1\.", "linear2."),
]


def _layer_rules(prefix_old: str, prefix_new: str, sub: List[Tuple[str, str]]):
    return [(rf"^{prefix_old}\.(\d+)\.{old}", prefix_new + r".\1." + new) for old, new in sub]


def _res(stage_part: str):
    """mmdet ``layer{X}.{i}.<part>`` -> Detectron2 ``res{X+1}.{i}.<part>``."""
    return (
        lambda m: f"backbone.res{int(m.group(1)) + 1}.{m.group(2)}.{stage_part.format(*m.groups()[2:])}"
    )


def _mlp(prefix: str):
    """``Sequential(Linear, ReLU, Linear, ReLU, Linear)`` index 0/2/4 -> ``MLP.layers.{0,1,2}``."""
    return lambda m: f"{prefix.format(*m.groups()[:-1])}.layers.{int(m.group(m.lastindex)) // 2}."


# (regex, replacement string or function of the match), applied in order; the first rule that
# matches renames the key (the matched prefix is replaced, the rest of the key is kept).
RENAME_RULES: List[Tuple[str, Union[str, Callable]]] = [
    # mmdet ResNet (pytorch style) -> Detectron2 ResNet (STRIDE_IN_1X1=False, FrozenBN)
    (r"^backbone\.conv1\.", "backbone.stem.conv1."),
    (r"^backbone\.bn1\.", "backbone.stem.conv1.norm."),
    (r"^backbone\.layer(\d)\.(\d+)\.conv(\d)\.", _res("conv{0}.")),
    (r"^backbone\.layer(\d)\.(\d+)\.bn(\d)\.", _res("conv{0}.norm.")),
    (r"^backbone\.layer(\d)\.(\d+)\.downsample\.0\.", _res("shortcut.")),
    (r"^backbone\.layer(\d)\.(\d+)\.downsample\.1\.", _res("shortcut.norm.")),
    # ChannelMapper -> InputProjection: levels 0..2 from C3..C5, then the extra convs
    (r"^neck\.convs\.(\d+)\.conv\.", r"input_proj.\1.0."),
    (r"^neck\.convs\.(\d+)\.gn\.", r"input_proj.\1.1."),
    (r"^neck\.extra_convs\.(\d+)\.conv\.", lambda m: f"input_proj.{_NUM_IN + int(m.group(1))}.0."),
    (r"^neck\.extra_convs\.(\d+)\.gn\.", lambda m: f"input_proj.{_NUM_IN + int(m.group(1))}.1."),
    # transformer
    (r"^bbox_head\.transformer\.level_embeds$", "transformer.level_embed"),
    *_layer_rules(
        r"bbox_head\.transformer\.encoder\.layers", "transformer.encoder.layers", _ENC_LAYER
    ),
    *_layer_rules(
        r"bbox_head\.transformer\.decoder\.layers", "transformer.decoder.layers", _DEC_LAYER
    ),
    (
        r"^bbox_head\.transformer\.(enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.",
        r"transformer.\1.",
    ),
    # mask encoder
    *_layer_rules(
        r"bbox_head\.transformer\.seg_encoder\.layers", "mask_encoder.layers", _ENC_LAYER
    ),
    (r"^bbox_head\.transformer\.mask_trans\.", "mask_encoder.output_proj."),
    (r"^bbox_head\.transformer\.mask_trans_norm\.", "mask_encoder.output_norm."),
    # heads
    (r"^bbox_head\.cls_branches\.(\d+)\.", r"head.class_embed.\1."),
    (r"^bbox_head\.reg_branches\.(\d+)\.(\d)\.", _mlp("head.bbox_embed.{0}")),
    (r"^bbox_head\.seg_branches\.0\.(\d)\.", _mlp("head.param_embed")),
]
# number of backbone levels of the ChannelMapper (C3, C4, C5): the extra convs come after them
_NUM_IN = 3


def _state_dict(checkpoint: dict) -> dict:
    sd = checkpoint.get("state_dict", checkpoint)
    if not isinstance(sd, dict):
        raise ValueError("an opera SOIT checkpoint must hold a 'state_dict' dict")
    if all(k.startswith("module.") for k in sd):  # saved from a (Distributed)DataParallel
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def matches(checkpoint: dict) -> bool:
    """True if the object loaded from a file is an official (opera) SOIT checkpoint."""
    if not isinstance(checkpoint, dict):
        return False
    sd = checkpoint.get("state_dict", checkpoint)
    if not isinstance(sd, dict):
        return False
    keys = {k[len("module.") :] if k.startswith("module.") else k for k in sd}
    return all(k in keys for k in _SIGNATURE)


def _rename(key: str) -> Optional[str]:
    for pattern, repl in RENAME_RULES:
        m = re.match(pattern, key)
        if m is not None:
            new = repl(m) if callable(repl) else m.expand(repl)
            return new + key[m.end() :]
    return None


def _describe(sd: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """Architecture facts readable from a converted (solq_d2-named) state dict."""
    facts = {}

    def shape(k, i=None):
        if k not in sd:
            return None
        return tuple(sd[k].shape) if i is None else int(sd[k].shape[i])

    facts["hidden dim d (MODEL.DEFORMABLE_TRANSFORMER.HIDDEN_DIM)"] = shape(
        "transformer.level_embed", 1
    )
    facts["feature levels (NUM_FEATURE_LEVELS)"] = shape("transformer.level_embed", 0)
    facts["classes (MODEL.SOIT.NUM_CLASSES)"] = shape("head.class_embed.0.weight", 0)
    facts["mask parameters D (MASK_CHANNELS, DYN_HEADS, DYN_POINTS)"] = shape(
        "head.param_embed.layers.2.weight", 0
    )
    facts["mask channels (MODEL.SOIT.MASK_CHANNELS)"] = shape("mask_encoder.output_proj.weight", 0)
    for name, pat in (
        ("encoder layers (ENC_LAYERS)", r"^transformer\.encoder\.layers\.(\d+)\."),
        ("decoder layers (DEC_LAYERS)", r"^transformer\.decoder\.layers\.(\d+)\."),
        (
            "mask encoder layers (MODEL.SOIT.MASK_ENCODER.NUM_LAYERS)",
            r"^mask_encoder\.layers\.(\d+)\.",
        ),
        ("class branches (DEC_LAYERS + two-stage)", r"^head\.class_embed\.(\d+)\."),
    ):
        ids = {int(m.group(1)) for k in sd for m in [re.match(pat, k)] if m}
        facts[name] = len(ids)
    for stage in (2, 3, 4, 5):
        ids = {
            int(m.group(1))
            for k in sd
            for m in [re.match(rf"^backbone\.res{stage}\.(\d+)\.", k)]
            if m
        }
        facts[f"ResNet res{stage} blocks (MODEL.RESNETS.DEPTH)"] = len(ids)
    return facts


def convert(checkpoint: dict, model: Optional[torch.nn.Module] = None) -> dict:
    """Rename an opera SOIT checkpoint to solq_d2's ``SOIT`` parameter names.

    Args:
        checkpoint: the object loaded from the file (``{"state_dict": ..., "meta": ...}`` or a
            bare state dict).
        model: if given, the configuration read from the checkpoint (hidden dim, classes, levels,
            layers, mask parameters, backbone depth) is compared with the model's and a mismatch
            raises ``ValueError`` naming the config keys to change.

    Returns:
        ``{"model": {name: tensor}, "renames": [(old, new)], "dropped": [old names]}``.

    Raises:
        ValueError: not a SOIT checkpoint, unknown keys, aliases that differ, or (with ``model``)
            an architecture mismatch.
    """
    if not matches(checkpoint):
        raise ValueError(
            "not an official SOIT (opera) checkpoint: expected mmdet keys such as "
            f"{_SIGNATURE[0]!r}"
        )
    sd = _state_dict(checkpoint)
    n_in = len({m.group(1) for k in sd for m in [re.match(r"^neck\.convs\.(\d+)\.", k)] if m})
    if n_in != _NUM_IN:
        raise ValueError(
            f"the SOIT checkpoint's neck maps {n_in} backbone levels; solq_d2 expects {_NUM_IN} "
            "(C3, C4, C5)"
        )
    out, renames, dropped, unknown = {}, [], [], []
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            dropped.append(key)
            continue
        alias = re.match(r"^bbox_head\.seg_branches\.(\d+)\.(.+)$", key)
        if alias and alias.group(1) != "0":
            canonical = f"bbox_head.seg_branches.0.{alias.group(2)}"
            if canonical not in sd or not torch.equal(sd[canonical], value):
                raise ValueError(
                    f"{key} differs from {canonical}: opera shares one mask-parameter MLP across "
                    "decoder layers, solq_d2's SOIT too; this checkpoint has separate ones"
                )
            dropped.append(key)
            continue
        new = _rename(key)
        if new is None:
            unknown.append(key)
            continue
        out[new] = value
        renames.append((key, new))
    if unknown:
        raise ValueError(
            f"{len(unknown)} keys of the SOIT checkpoint have no solq_d2 name (is it an opera "
            f"SOIT R50/R101 checkpoint?): {unknown[:10]}"
        )
    if model is not None:
        _check_against_model(out, model)
    return {"model": out, "renames": renames, "dropped": dropped}


def _check_against_model(converted: Dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    expected = {k: v for k, v in model.state_dict().items()}
    ours, theirs = _describe(expected), _describe(converted)
    bad = [
        f"{name}: checkpoint {theirs[name]}, model {ours[name]}"
        for name in ours
        if ours[name] is not None and theirs[name] is not None and ours[name] != theirs[name]
    ]
    if bad:
        raise ValueError(
            "the SOIT checkpoint does not fit the model configuration:\n  " + "\n  ".join(bad)
        )
