#!/usr/bin/env python
"""Convert an official SOLQ checkpoint (megvii-research/SOLQ) to solq_d2's SOLQ weights.

The official files (``solq_r50_final.pth``, ``solq_r101_final.pth``; links in the official
README) hold ``{"model", "optimizer", "lr_scheduler", "epoch", "args"}``. This tool keeps only the
weights, renames the torchvision backbone to Detectron2's ``ResNet`` and drops the aliased heads
(see ``solq_d2/checkpoint/convert_solq.py``), printing every rename::

    python tools/convert-solq-to-d2.py --source solq_r50_final.pth --output solq_r50_d2.pth \
        --config-file configs/SOLQ/solq_R_50_50ep.yaml

With ``--config-file`` the model is built from the config (no weights loaded) and the
checkpoint's configuration (hidden dim, queries, classes, layers, ...) is checked against it and
the converted weights are loaded strictly; any mismatch is an error. Then evaluate with::

    python train_net.py --config-file configs/SOLQ/solq_R_50_50ep.yaml --eval-only \
        MODEL.WEIGHTS solq_r50_d2.pth

(``MODEL.WEIGHTS solq_r50_final.pth`` also works: the checkpointer converts official files on the
fly; converting once just makes loading faster and prints what is renamed.)
"""
import argparse
import hashlib
import sys

import torch


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load(path: str):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _build_model(config_file: str, opts):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import solq_d2  # noqa: F401  (registers SOLQ)
    from solq_d2.config import add_solq_d2_config

    cfg = get_cfg()
    add_solq_d2_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts) + ["MODEL.DEVICE", "cpu"])
    return build_model(cfg)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="official SOLQ .pth file")
    parser.add_argument("--output", required=True, help="converted .pth file to write")
    parser.add_argument("--config-file", default="", help="solq_d2 config to check against")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE)")
    args = parser.parse_args(argv)

    from solq_d2.checkpoint.convert_solq import convert, matches

    checkpoint = _load(args.source)
    if not matches(checkpoint):
        print(f"error: {args.source} is not an official SOLQ checkpoint", file=sys.stderr)
        return 1
    model = _build_model(args.config_file, args.opts) if args.config_file else None
    try:
        result = convert(checkpoint, model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for old, new in result["renames"]:
        print(f"{old} -> {new}")
    for name in result["dropped"]:
        print(f"dropped {name} (alias / not a weight)")
    if model is not None:
        state = {k: v.to(torch.float32) for k, v in result["model"].items()}
        incompatible = model.load_state_dict(state, strict=False)
        if incompatible.missing_keys or incompatible.unexpected_keys:
            print(f"error: does not load strictly: {incompatible}", file=sys.stderr)
            return 1
    out = {
        "model": {k: v.contiguous().clone() for k, v in result["model"].items()},
        "__author__": f"solq_d2 convert-solq-to-d2 from sha256:{_sha256(args.source)}",
        "matching_heuristics": False,
    }
    torch.save(out, args.output)
    print(
        f"wrote {args.output}: {len(out['model'])} tensors, {len(result['renames'])} renamed, "
        f"{len(result['dropped'])} dropped"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
