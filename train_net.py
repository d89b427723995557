#!/usr/bin/env python
"""Train or evaluate SOLQ / SOIT / QueryInst with Detectron2's command line.

Examples::

    # train (single process; CPU when no GPU is present)
    python train_net.py --config-file configs/SOLQ/solq_shapes.yaml OUTPUT_DIR output/solq_shapes
    # continue a run that was interrupted (killed, pre-empted) from its last checkpoint
    python train_net.py --config-file configs/SOLQ/solq_shapes.yaml --resume OUTPUT_DIR ...
    # evaluate a checkpoint (solq_d2's own, or an official SOLQ/SOIT/QueryInst file)
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth
    # 8 GPUs on one machine; 2 machines with 8 GPUs each
    python train_net.py --num-gpus 8 --config-file ...
    python train_net.py --num-gpus 8 --num-machines 2 --machine-rank 0 --dist-url tcp://host:port ...

See docs/training.md.
"""

import logging

import torch

import detectron2.utils.comm as comm
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils.logger import setup_logger

import solq_d2
from solq_d2.checkpoint import SolqD2Checkpointer
from solq_d2.engine import Trainer, check_model_num_classes

logger = logging.getLogger("solq_d2")


def setup(args):
    """Config from ``--config-file`` and the trailing ``KEY VALUE`` overrides, frozen."""
    cfg = get_cfg()
    solq_d2.add_solq_d2_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts or [])
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
        cpu_note = "CUDA is not available: MODEL.DEVICE set to cpu"
    else:
        cpu_note = ""
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="solq_d2")
    if cpu_note:
        logger.warning(cpu_note)
    return cfg


def main(args):
    cfg = setup(args)
    solq_d2.data.register_datasets_from_cfg(cfg)  # DATASETS.COCO_INSTANCES

    if args.eval_only:
        check_model_num_classes(cfg, cfg.DATASETS.TEST)
        model = Trainer.build_model(cfg)
        SolqD2Checkpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
