#!/usr/bin/env python
"""Convert an official QueryInst checkpoint (hustvl/QueryInst, mmdetection 2.12) to solq_d2.

The official models (README of https://github.com/hustvl/QueryInst, e.g.
``queryinst_r50_300_queries-...pth``) are mmdet files ``{"state_dict": ..., "meta": ...}``. They
can be used as they are (``MODEL.WEIGHTS <file>``: ``SolqD2Checkpointer`` recognises and converts
them while loading); this tool converts once and prints every rename, e.g.

    python tools/convert-queryinst-to-d2.py --source queryinst_r50_300q.pth \\
        --output queryinst_R_50_FPN_300q_crop_ms_3x_converted.pth \\
        --config-file configs/QueryInst/queryinst_R_50_FPN_300q_crop_ms_3x.yaml

    python train_net.py --config-file configs/QueryInst/queryinst_R_50_FPN_300q_crop_ms_3x.yaml \\
        --eval-only MODEL.WEIGHTS queryinst_R_50_FPN_300q_crop_ms_3x_converted.pth

With ``--config-file`` (plus ``KEY VALUE`` overrides) the weights are checked against a model built
from that config: queries, width, stages, classes, then every key and shape; any mismatch is an
error (exit status 1). The output holds only tensors and loads with ``weights_only=True``.
"""

import argparse
import hashlib
import os
import sys

import torch


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build_model(config_file: str, opts):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from solq_d2 import add_solq_d2_config

    cfg = get_cfg()
    add_solq_d2_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return build_model(cfg)


def _mismatches(weights, model):
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights) - {"pixel_mean", "pixel_std"})
    unexpected = sorted(set(weights) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(weights[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(weights) & set(expected))
        if weights[k].shape != expected[k].shape
    ]
    lines = [f"missing: {k}" for k in missing] + [f"unexpected: {k}" for k in unexpected]
    return lines + [f"shape: {s}" for s in shapes]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="official QueryInst checkpoint (.pth)")
    parser.add_argument("--output", required=True, help="converted checkpoint to write (.pth)")
    parser.add_argument("--config-file", default="", help="check against this solq_d2 config")
    parser.add_argument("--quiet", action="store_true", help="do not print every rename")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)

    from solq_d2.checkpoint import convert_queryinst
    from solq_d2.checkpoint.checkpointer import safe_torch_load

    checkpoint = safe_torch_load(args.source)
    if not convert_queryinst.matches(checkpoint):
        print(f"error: {args.source} is not an official QueryInst checkpoint", file=sys.stderr)
        return 1
    model = _build_model(args.config_file, args.opts) if args.config_file else None
    try:
        result = convert_queryinst.convert(checkpoint, model=model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        for old, new in result["renames"]:
            print(f"{old} -> {new}")
        for old in result["dropped"]:
            print(f"{old} -> (dropped: FrozenBN has no such buffer)")
    if model is not None:
        problems = _mismatches(result["model"], model)
        if problems:
            print("error: the converted weights do not fit the model:", file=sys.stderr)
            for line in problems:
                print(f"  {line}", file=sys.stderr)
            return 1
    out = {
        "model": result["model"],
        "__author__": f"solq_d2 convert-queryinst-to-d2 from sha256:{_sha256(args.source)}",
        "matching_heuristics": False,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save(out, args.output)
    print(
        f"wrote {args.output}: {len(result['model'])} tensors "
        f"({len(result['renames'])} renamed, {len(result['dropped'])} dropped)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
