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

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone

from solq_d2.checkpoint.convert_cli import main as _main  # noqa: E402


def main(argv=None) -> int:
    return _main("SOLQ", argv, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
