#!/usr/bin/env python
"""Convert an official SOIT checkpoint (hikvision-research/opera, mmdet format) to solq_d2.

The authors release their models with opera (https://github.com/hikvision-research/opera,
"SOIT" model zoo: R50 42.2 mask AP / 48.9 box AP, R101). Such a file can be used directly
(``MODEL.WEIGHTS soit_r50.pth``: ``SolqD2Checkpointer`` recognises and converts it on the fly);
this tool writes the converted weights once and prints every rename:

    python tools/convert-soit-to-d2.py --source soit_r50_16x2_50e_coco.pth \\
        --output soit_R_50_50ep_converted.pth --config-file configs/SOIT/soit_R_50_50ep.yaml

then ``python train_net.py --config-file configs/SOIT/soit_R_50_50ep.yaml --eval-only
MODEL.WEIGHTS soit_R_50_50ep_converted.pth``. With ``--config-file`` the converted weights are
checked against a model built from that config (architecture and every key/shape) and the tool
exits with an error on any mismatch. The output holds only tensors and loads with
``torch.load(..., weights_only=True)``.
"""

import argparse
import hashlib
import sys

import torch


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_model(config_file: str, opts):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model as d2_build_model

    from solq_d2 import add_solq_d2_config

    cfg = get_cfg()
    add_solq_d2_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = "cpu"
    return d2_build_model(cfg)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="opera SOIT checkpoint (.pth)")
    parser.add_argument("--output", required=True, help="converted checkpoint to write")
    parser.add_argument("--config-file", default="", help="check against this solq_d2 config")
    parser.add_argument("--quiet", action="store_true", help="do not print every rename")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    args = parser.parse_args(argv)

    from solq_d2.checkpoint import convert_soit
    from solq_d2.checkpoint.checkpointer import safe_torch_load

    checkpoint = safe_torch_load(args.source)
    if not convert_soit.matches(checkpoint):
        print(f"error: {args.source} is not an official SOIT (opera) checkpoint", file=sys.stderr)
        return 1
    model = build_model(args.config_file, args.opts) if args.config_file else None
    try:
        result = convert_soit.convert(checkpoint, model=model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        for old, new in result["renames"]:
            print(f"{old} -> {new}")
        for old in result["dropped"]:
            print(f"{old} -> (dropped)")
    if model is not None:
        expected = model.state_dict()
        ignorable = {"pixel_mean", "pixel_std"}
        missing = sorted(set(expected) - set(result["model"]) - ignorable)
        unexpected = sorted(set(result["model"]) - set(expected))
        shapes = [
            f"{k}: {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            for k, v in result["model"].items()
            if k in expected and tuple(v.shape) != tuple(expected[k].shape)
        ]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            for item in items:
                print(f"error: {title}: {item}", file=sys.stderr)
        if missing or unexpected or shapes:
            return 1
    out = {
        "model": {k: v.contiguous() for k, v in result["model"].items()},
        "__author__": f"solq_d2 convert-soit-to-d2 from {sha256(args.source)}",
        "matching_heuristics": False,
    }
    torch.save(out, args.output)
    print(
        f"wrote {args.output}: {len(result['model'])} tensors, {len(result['renames'])} renamed, "
        f"{len(result['dropped'])} dropped (aliases of the shared mask MLP, BN counters)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
