"""Official SOLQ checkpoints (megvii-research/SOLQ ``main.py``) -> solq_d2 ``SOLQ`` weights.

The official file is ``{"model": state_dict, "optimizer", "lr_scheduler", "epoch", "args":
argparse.Namespace}``. Conversion:

* torchvision ResNet names -> Detectron2 ``ResNet`` names (``backbone.0.body.layer1.0.bn1.weight``
  -> ``backbone.res2.0.conv1.norm.weight``, as Detectron2's ``convert-torchvision-to-d2.py``);
* aliases dropped after checking they equal their original: ``transformer.decoder.bbox_embed.*``
  (= ``bbox_embed.*``), ``transformer.decoder.class_embed.*`` (two-stage, = ``class_embed.*``),
  ``vector_embed.{1..5}.*`` (= ``vector_embed.0.*``, renamed ``vector_embed.*``), and without box
  refinement ``class_embed.{1..}``/``bbox_embed.{1..}`` (= index 0);
* every other name is unchanged (``transformer.*``, ``input_proj.*``, ``query_embed.weight``,
  ``class_embed.*``, ``bbox_embed.*``).

With a model, the checkpoint's configuration (read from the tensor shapes and ``args``) is
compared with the model's and any difference raises ``ValueError`` before anything is loaded.
A 91-way official classifier is kept for a 91-class model (``MODEL.SOLQ.NUM_CLASSES 91``) and
reduced to the 80 COCO categories (rows of the COCO ids, in Detectron2's order) for an 80-class
model. Imports only torch.
"""

import re
from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = ["matches", "convert", "checkpoint_config", "model_config", "COCO_CATEGORY_IDS"]

# The 80 COCO category ids in Detectron2's contiguous order (COCO 2017 instances json).
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
)  # fmt: skip


def _state_dict(checkpoint: Dict) -> Dict[str, Any]:
    sd = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    return sd if isinstance(sd, dict) else {}


def matches(checkpoint: dict) -> bool:
    """True if ``checkpoint`` (what ``torch.load`` returned) is an official SOLQ checkpoint."""
    sd = _state_dict(checkpoint)
    return (
        "transformer.level_embed" in sd
        and "vector_embed.0.layers.0.weight" in sd
        and any(k.startswith("backbone.0.") for k in sd)
    )


def _rename_backbone(key: str) -> Optional[str]:
    m = re.match(r"^backbone\.0\.body\.(.*)$", key)
    if m is None:
        return None
    rest = m.group(1)
    if rest == "conv1.weight":
        return "backbone.stem.conv1.weight"
    m = re.match(r"^bn1\.(\w+)$", rest)
    if m:
        return f"backbone.stem.conv1.norm.{m.group(1)}"
    m = re.match(r"^layer(\d)\.(\d+)\.(.*)$", rest)
    if m is None:
        raise ValueError(f"unexpected official backbone key {key!r}")
    stage, block, tail = int(m.group(1)) + 1, m.group(2), m.group(3)
    prefix = f"backbone.res{stage}.{block}."
    for pattern, repl in (
        (r"^conv(\d)\.weight$", r"conv\1.weight"),
        (r"^bn(\d)\.(\w+)$", r"conv\1.norm.\2"),
        (r"^downsample\.0\.weight$", "shortcut.weight"),
        (r"^downsample\.1\.(\w+)$", r"shortcut.norm.\1"),
    ):
        if re.match(pattern, tail):
            return prefix + re.sub(pattern, repl, tail)
    raise ValueError(f"unexpected official backbone key {key!r}")


def _indices(sd: Dict, prefix: str) -> List[int]:
    found = {
        int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m
    }
    return sorted(found)


def _args_dict(checkpoint: Dict) -> Dict[str, Any]:
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if args is None:
        return {}
    return dict(vars(args)) if hasattr(args, "__dict__") else dict(args)


def checkpoint_config(checkpoint: Dict) -> Dict[str, Any]:
    """Configuration of an official checkpoint, from its tensor shapes (and ``args`` for what the
    shapes do not tell: heads, sampling points)."""
    sd = _state_dict(checkpoint)
    args = _args_dict(checkpoint)
    levels, d = sd["transformer.level_embed"].shape
    cfg = {
        "hidden_dim": int(d),
        "num_feature_levels": int(levels),
        "enc_layers": len(_indices(sd, "transformer.encoder.layers.")),
        "dec_layers": len(_indices(sd, "transformer.decoder.layers.")),
        "dim_feedforward": int(sd["transformer.encoder.layers.0.linear1.weight"].shape[0]),
        "two_stage": "transformer.enc_output.weight" in sd,
        "with_box_refine": any(k.startswith("transformer.decoder.bbox_embed.") for k in sd),
        "num_classes": int(sd["class_embed.0.weight"].shape[0]),
        "n_keep": int(sd["vector_embed.0.layers.2.weight"].shape[0]),
        "vector_hidden_dim": int(sd["vector_embed.0.layers.0.weight"].shape[0]),
        "backbone_res4_blocks": len(_indices(sd, "backbone.0.body.layer3.")),
        "enc_attention_rows": int(
            sd["transformer.encoder.layers.0.self_attn.attention_weights.weight"].shape[0]
        ),
    }
    if not cfg["two_stage"]:
        cfg["num_queries"] = int(sd["query_embed.weight"].shape[0])
    for key in ("nheads", "enc_n_points", "dec_n_points"):
        if key in args:
            cfg[key] = int(args[key])
    if "with_box_refine" in args and bool(args["with_box_refine"]) != cfg["with_box_refine"]:
        raise ValueError(
            f"official SOLQ checkpoint: args.with_box_refine={args['with_box_refine']} but the "
            "state_dict says otherwise (transformer.decoder.bbox_embed aliases)"
        )
    return cfg


def model_config(model) -> Dict[str, Any]:
    """The same quantities for a solq_d2 ``SOLQ`` model."""
    t = model.transformer
    enc0 = t.encoder.layers[0]
    return {
        "hidden_dim": t.d_model,
        "num_feature_levels": t.num_feature_levels,
        "enc_layers": t.encoder.num_layers,
        "dec_layers": t.decoder.num_layers,
        "dim_feedforward": enc0.linear1.out_features,
        "two_stage": t.two_stage,
        "with_box_refine": t.decoder.box_refine,
        "num_classes": model.num_classes,
        "n_keep": model.mask_coder.n_keep,
        "vector_hidden_dim": model.vector_embed.layers[0].out_features,
        "backbone_res4_blocks": len(getattr(model.backbone, "res4", [])),
        "enc_attention_rows": enc0.self_attn.attention_weights.out_features,
        "num_queries": model.num_queries,
        "nheads": t.nhead,
        "enc_n_points": enc0.self_attn.n_points,
        "dec_n_points": t.decoder.layers[0].cross_attn.n_points,
    }


_CONFIG_KEYS = {
    "hidden_dim": "MODEL.DEFORMABLE_TRANSFORMER.HIDDEN_DIM",
    "num_feature_levels": "MODEL.DEFORMABLE_TRANSFORMER.NUM_FEATURE_LEVELS",
    "enc_layers": "MODEL.DEFORMABLE_TRANSFORMER.ENC_LAYERS",
    "dec_layers": "MODEL.DEFORMABLE_TRANSFORMER.DEC_LAYERS",
    "dim_feedforward": "MODEL.DEFORMABLE_TRANSFORMER.DIM_FEEDFORWARD",
    "two_stage": "MODEL.DEFORMABLE_TRANSFORMER.TWO_STAGE",
    "with_box_refine": "MODEL.DEFORMABLE_TRANSFORMER.WITH_BOX_REFINE",
    "num_classes": "MODEL.SOLQ.NUM_CLASSES (91, or 80 to keep only the COCO categories)",
    "n_keep": "MODEL.SOLQ.N_KEEP",
    "vector_hidden_dim": "MODEL.SOLQ.VECTOR_HIDDEN_DIM",
    "backbone_res4_blocks": "MODEL.RESNETS.DEPTH (6 blocks: R50, 23: R101)",
    "enc_attention_rows": "NHEADS x NUM_FEATURE_LEVELS x ENC_N_POINTS",
    "num_queries": "MODEL.SOLQ.NUM_QUERIES",
    "nheads": "MODEL.DEFORMABLE_TRANSFORMER.NHEADS",
    "enc_n_points": "MODEL.DEFORMABLE_TRANSFORMER.ENC_N_POINTS",
    "dec_n_points": "MODEL.DEFORMABLE_TRANSFORMER.DEC_N_POINTS",
}


def check_config(checkpoint: Dict, model) -> None:
    """Raise ``ValueError`` listing every configuration difference between file and model."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    if not all(hasattr(model, a) for a in ("transformer", "vector_embed", "mask_coder")):
        raise ValueError(
            f"this is an official SOLQ checkpoint but the model is a {type(model).__name__}; "
            "set MODEL.META_ARCHITECTURE SOLQ"
        )
    ck, md = checkpoint_config(checkpoint), model_config(model)
    problems = []
    for key, value in ck.items():
        mv = md.get(key)
        if key == "num_classes" and value == 91 and mv == 80:
            continue  # reduced to the COCO categories
        if mv != value:
            problems.append(f"{key}: checkpoint {value} vs model {mv} ({_CONFIG_KEYS[key]})")
    if problems:
        raise ValueError(
            "The official SOLQ checkpoint does not match the model configuration (the released "
            "models use HIDDEN_DIM 384, 300 queries, box refinement, 91 classes; see "
            "configs/SOLQ/solq_R_50_50ep.yaml):\n  " + "\n  ".join(problems)
        )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def convert(checkpoint: dict, model: "torch.nn.Module | None" = None) -> dict:
    """Convert an official SOLQ checkpoint (see the module docstring).

    Args:
        checkpoint: what ``torch.load`` returned (``{"model": ..., "args": ...}`` or a bare
            state_dict).
        model: the target ``SOLQ`` model; its configuration is checked first.

    Returns:
        ``{"model": {name: tensor}, "renames": [(old, new)], "dropped": [names]}``.
    """
    if not matches(checkpoint):
        raise ValueError(
            "not an official SOLQ checkpoint (no transformer.level_embed/vector_embed)"
        )
    sd = {k: v for k, v in _state_dict(checkpoint).items()}
    if model is not None:
        check_config(checkpoint, model)
    ckcfg = checkpoint_config(checkpoint)
    target_classes = model_config(getattr(model, "module", model))["num_classes"] if model else None

    out: Dict[str, torch.Tensor] = {}
    renames: List[Tuple[str, str]] = []
    dropped: List[str] = []

    def alias_of(key: str, original: str) -> None:
        if original not in sd:
            raise ValueError(f"official SOLQ checkpoint: {key} has no original {original}")
        if not _same(sd[key], sd[original]):
            raise ValueError(f"official SOLQ checkpoint: {key} should equal {original} but differs")
        dropped.append(key)

    shared_heads = not ckcfg["with_box_refine"]
    for key, value in sd.items():
        if key.endswith(("total_params", "total_ops")) or key.endswith("num_batches_tracked"):
            dropped.append(key)
            continue
        m = re.match(r"^transformer\.decoder\.(bbox_embed|class_embed)\.(.*)$", key)
        if m:
            alias_of(key, f"{m.group(1)}.{m.group(2)}")
            continue
        m = re.match(r"^vector_embed\.(\d+)\.(.*)$", key)
        if m:
            if m.group(1) != "0":
                alias_of(key, f"vector_embed.0.{m.group(2)}")
                continue
            new = f"vector_embed.{m.group(2)}"
            out[new] = value
            renames.append((key, new))
            continue
        m = re.match(r"^(class_embed|bbox_embed)\.(\d+)\.(.*)$", key)
        if m and shared_heads and m.group(2) != "0":
            alias_of(key, f"{m.group(1)}.0.{m.group(3)}")
            continue
        new = _rename_backbone(key)
        if new is not None:
            out[new] = value
            renames.append((key, new))
            continue
        out[key] = value

    if target_classes == 80 and ckcfg["num_classes"] == 91:
        rows = torch.tensor(COCO_CATEGORY_IDS)
        for key in [k for k in out if k.startswith("class_embed.")]:
            out[key] = out[key][rows]
            renames.append((key, f"{key}[91 COCO ids -> 80 contiguous classes]"))
    return {"model": out, "renames": renames, "dropped": dropped}
