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

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone

from solq_d2.checkpoint.convert_cli import main as _main  # noqa: E402


def main(argv=None) -> int:
    return _main("QueryInst", argv, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
