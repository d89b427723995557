"""Helpers shared by the SOLQ tests (no tests here)."""

from pathlib import Path

import numpy as np
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from solq_d2.config import add_solq_d2_config

ROOT = Path(__file__).resolve().parents[2]


def solq_r50_parity_cfg(num_queries: int = 50):
    """The released R50 model (configs/SOLQ/solq_R_50_50ep.yaml) as the fixtures ran it: raw
    91-way labels, ``num_queries`` queries, CPU, no weights."""
    cfg = get_cfg()
    add_solq_d2_config(cfg)
    cfg.merge_from_file(str(ROOT / "configs" / "SOLQ" / "solq_R_50_50ep.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.SOLQ.COCO_ID_LABELS = False  # the fixtures report the raw classifier index
    cfg.MODEL.SOLQ.NUM_QUERIES = num_queries
    return cfg


def build_solq_r50_parity_model(num_queries: int = 50):
    return build_model(solq_r50_parity_cfg(num_queries))


def load_official_file(model, path: str) -> None:
    """Load an official-format SOLQ file as a user does (``MODEL.WEIGHTS`` / ``.load``)."""
    from solq_d2.checkpoint import SolqD2Checkpointer

    SolqD2Checkpointer(model).load(path)


def unpack_masks(packed) -> np.ndarray:
    """The fixtures' bit-packed 0/1 masks as uint8 of ``packed["shape"]``."""
    shape = tuple(int(s) for s in packed["shape"])
    return np.unpackbits(packed["packbits"].numpy())[: int(np.prod(shape))].reshape(shape)


def solq_tiny_cfg(**solq_overrides):
    """A small SOLQ (frozen ResNet-18, d 32, 2 decoder layers) for fast CPU tests."""
    cfg = solq_r50_parity_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.BACKBONE.FREEZE_AT = 5  # backbone frozen: its backward dominates CPU time
    t = cfg.MODEL.DEFORMABLE_TRANSFORMER
    t.HIDDEN_DIM, t.NHEADS, t.ENC_LAYERS, t.DEC_LAYERS, t.DIM_FEEDFORWARD = 32, 4, 1, 2, 64
    t.TWO_STAGE_NUM_PROPOSALS = 10
    s = cfg.MODEL.SOLQ
    s.NUM_CLASSES, s.NUM_QUERIES, s.VECTOR_HIDDEN_DIM, s.GT_MASK_LEN, s.N_KEEP = 5, 10, 32, 32, 16
    for k, v in solq_overrides.items():
        setattr(s, k, v)
    return cfg


def to_official_names(model) -> dict:
    """Inverse of convert_solq: our state_dict under the official names, with the official
    aliases (same tensors) re-created."""
    import re

    sd = model.state_dict()
    L = model.transformer.num_decoder_layers
    num_pred = L + 1 if model.two_stage else L
    out = {}
    for k, v in sd.items():
        if k == "backbone.stem.conv1.weight":
            out["backbone.0.body.conv1.weight"] = v
            continue
        m = re.match(r"backbone\.stem\.conv1\.norm\.(\w+)$", k)
        if m:
            out[f"backbone.0.body.bn1.{m.group(1)}"] = v
            continue
        m = re.match(r"backbone\.res(\d)\.(\d+)\.(.*)$", k)
        if m:
            tail = m.group(3)
            tail = re.sub(r"^conv(\d)\.norm\.", r"bn\1.", tail)
            tail = re.sub(r"^shortcut\.norm\.", "downsample.1.", tail)
            tail = re.sub(r"^shortcut\.weight$", "downsample.0.weight", tail)
            out[f"backbone.0.body.layer{int(m.group(1)) - 1}.{m.group(2)}.{tail}"] = v
            continue
        m = re.match(r"vector_embed\.(.*)$", k)
        if m:
            for i in range(num_pred):
                out[f"vector_embed.{i}.{m.group(1)}"] = v
            continue
        m = re.match(r"(class_embed|bbox_embed)\.0\.(.*)$", k)
        if m and not model.box_refine:
            for i in range(num_pred):
                out[f"{m.group(1)}.{i}.{m.group(2)}"] = v
            continue
        out[k] = v
    for k, v in list(out.items()):
        if k.startswith("bbox_embed.") and model.box_refine:
            out["transformer.decoder." + k] = v
        if k.startswith("class_embed.") and model.two_stage:
            out["transformer.decoder." + k] = v
    return out
