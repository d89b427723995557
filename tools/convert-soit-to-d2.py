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

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone

from solq_d2.checkpoint.convert_cli import main as _main  # noqa: E402


def main(argv=None) -> int:
    return _main("SOIT", argv, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
