"""The command line shared by ``tools/convert-{solq,soit,queryinst}-to-d2.py``.

Each tool reads an official checkpoint with ``weights_only=True``, converts it with
``solq_d2.checkpoint.convert_<method>``, prints every rename and every dropped key, optionally
checks the result against a model built from a solq_d2 config (the converter's configuration
checks, then every key and shape, as ``SolqD2Checkpointer`` does when it loads the file) and
writes ``{"model": ..., "__author__": ..., "matching_heuristics": False}`` atomically. Exit status
1, with the reason on stderr, when the file is not an official checkpoint of that method or does
not fit the config; nothing is written then.
"""

import argparse
import hashlib
import importlib
import os
import sys
from typing import List, Optional

import torch

__all__ = ["METHODS", "main"]

# method name -> (converter module, what the official file is)
METHODS = {
    "SOLQ": ("solq_d2.checkpoint.convert_solq", "official SOLQ checkpoint (.pth)"),
    "SOIT": ("solq_d2.checkpoint.convert_soit", "official SOIT checkpoint (opera, mmdet format)"),
    "QueryInst": ("solq_d2.checkpoint.convert_queryinst", "official QueryInst checkpoint (mmdet format)"),
}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build_model(config_file: str, opts: List[str]) -> torch.nn.Module:
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from solq_d2 import add_solq_d2_config

    cfg = get_cfg()
    add_solq_d2_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts) + ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    return build_model(cfg)


def main(method: str, argv: Optional[List[str]] = None, description: str = "") -> int:
    """Run the converter command line for ``method`` (a key of :data:`METHODS`)."""
    from .checkpointer import (
        CheckpointMismatchError,
        _atomic_write,
        check_converted_state,
        safe_torch_load,
    )

    module_name, what = METHODS[method]
    parser = argparse.ArgumentParser(
        description=description or f"Convert an {what} to solq_d2 weights."
    )
    parser.add_argument("--source", required=True, help=what)
    parser.add_argument("--output", required=True, help="converted checkpoint to write (.pth)")
    parser.add_argument("--config-file", default="", help="check against this solq_d2 config")
    parser.add_argument("--quiet", action="store_true", help="do not print every rename")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)

    converter = importlib.import_module(module_name)
    checkpoint = safe_torch_load(args.source)
    if not isinstance(checkpoint, dict) or not converter.matches(checkpoint):
        print(f"error: {args.source} is not an {what}", file=sys.stderr)
        return 1
    model = _build_model(args.config_file, args.opts) if args.config_file else None
    try:
        result = converter.convert(checkpoint, model=model)
        if model is not None:
            check_converted_state(model, result["model"], method)
    except (ValueError, CheckpointMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        for old, new in result["renames"]:
            print(f"{old} -> {new}")
        for old in result["dropped"]:
            print(f"{old} -> (dropped)")
    out = {
        # clone: aliased official tensors must not drag their shared storage into the file
        "model": {k: v.contiguous().clone() for k, v in result["model"].items()},
        "__author__": f"solq_d2 convert-{method.lower()}-to-d2 from sha256:{_sha256(args.source)}",
        "matching_heuristics": False,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    _atomic_write(args.output, lambda f: torch.save(out, f))
    print(
        f"wrote {args.output}: {len(out['model'])} tensors ({len(result['renames'])} renamed, "
        f"{len(result['dropped'])} dropped: aliases of shared heads, BatchNorm counters)"
    )
    return 0
