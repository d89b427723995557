#!/usr/bin/env python
"""Train the default solq_d2 model on the synthetic shapes dataset, evaluate it, draw results.

``make demo OUTPUT=<dir>`` runs ``tools/demo.py --output <dir>``:

1. generates the shapes dataset on first use (``$SOLQ_D2_DATASETS``, default
   ``~/.cache/solq_d2/datasets``);
2. trains ``configs/SOLQ/solq_shapes.yaml`` (about 15 minutes on 2 CPU cores; progress with ETA
   every 20 iterations) into ``<dir>/train``;
3. evaluates on ``shapes_val`` with Detectron2's ``COCOEvaluator`` and prints the bbox and segm
   AP tables;
4. writes ``<dir>/losses.png`` (training losses from ``metrics.json``) and
   ``<dir>/predictions/*.png`` (ground truth | predictions, drawn with Detectron2's
   ``Visualizer``) for a few validation images.

Options: ``--config-file`` (another config), ``--max-iter N`` or ``--minutes M`` (train for N
iterations, or as many as fit in about M minutes in all, measured on this machine; the LR steps,
warm-up and checkpoint period are scaled with the schedule), ``--opts KEY VALUE ...`` (config
overrides), ``--num-images``, ``--confidence-threshold``.
"""

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/SOLQ/solq_shapes.yaml"
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

logger = logging.getLogger("solq_d2.demo")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", required=True, help="directory for all results")
    parser.add_argument(
        "--config-file",
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help=f"config to train (default: {DEFAULT_CONFIG})",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--max-iter", type=int, help="training iterations (default: the config's)")
    budget.add_argument(
        "--minutes", type=float, help="time budget of the whole demo; sets the iteration count"
    )
    parser.add_argument("--num-images", type=int, default=6, help="validation images to draw")
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.5, help="score threshold of drawn masks"
    )
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ..."
    )
    return parser


def setup_cfg(args):
    from detectron2.config import get_cfg

    import solq_d2

    config_file = Path(args.config_file)
    if not config_file.is_absolute() and not config_file.exists():
        config_file = REPO_ROOT / config_file
    if not config_file.is_file():
        raise SystemExit(
            f"demo: config file '{args.config_file}' does not exist. The default demo trains "
            f"{DEFAULT_CONFIG}, which comes with the SOLQ model; choose another config with "
            "--config-file."
        )
    cfg = get_cfg()
    solq_d2.add_solq_d2_config(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(args.opts))
    cfg.OUTPUT_DIR = os.path.join(args.output, "train")
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.TEST.EVAL_PERIOD = 0
    if not cfg.DATASETS.TEST:
        raise SystemExit("demo: the config has no DATASETS.TEST to evaluate on")
    return cfg, str(config_file)


def scale_schedule(cfg, max_iter: int):
    """Set ``SOLVER.MAX_ITER`` and scale LR steps, warm-up and checkpoint period with it."""
    max_iter = max(1, int(max_iter))
    old = cfg.SOLVER.MAX_ITER
    ratio = max_iter / old
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.STEPS = tuple(
        s for s in (int(round(s * ratio)) for s in cfg.SOLVER.STEPS) if 0 < s < max_iter
    )
    cfg.SOLVER.WARMUP_ITERS = min(int(round(cfg.SOLVER.WARMUP_ITERS * ratio)), max_iter // 2)
    cfg.SOLVER.CHECKPOINT_PERIOD = max(1, int(round(cfg.SOLVER.CHECKPOINT_PERIOD * ratio)))
    return cfg


def measure_speed(cfg, warmup: int = 2, timed: int = 4):
    """Seconds per training iteration and per evaluated image, measured on a throw-away model."""
    import itertools

    from detectron2.data import DatasetCatalog
    from detectron2.engine import SimpleTrainer
    from detectron2.utils.events import EventStorage

    from solq_d2.engine import Trainer, build_mapper

    model = Trainer.build_model(cfg)
    loader = Trainer.build_train_loader(cfg)
    trainer = SimpleTrainer(model, loader, Trainer.build_optimizer(cfg, model))
    with EventStorage(0):
        for _ in range(warmup):
            trainer.run_step()
        start = time.perf_counter()
        for _ in range(timed):
            trainer.run_step()
        per_iter = (time.perf_counter() - start) / timed
    model.eval()
    mapper = build_mapper(cfg, False)
    dicts = DatasetCatalog.get(cfg.DATASETS.TEST[0])
    with torch.no_grad():
        batch = [mapper(copy.deepcopy(d)) for d in dicts[:2]]
        model(batch[:1])
        start = time.perf_counter()
        model(batch[1:2])
        per_image = time.perf_counter() - start
    del trainer, loader, model
    return per_iter, per_image, sum(len(DatasetCatalog.get(n)) for n in cfg.DATASETS.TEST)


def print_ap_tables(results) -> None:
    from detectron2.utils.logger import create_small_table

    for task in ("bbox", "segm"):
        if task in results:
            table = {k: results[task].get(k, float("nan")) for k in AP_KEYS}
            print(f"\n{task} AP on {', '.join(results.get('_datasets', []))}:")
            print(create_small_table(table))
    sys.stdout.flush()


def plot_losses(metrics_file: str, out_file: str) -> None:
    """Plot total and per-term losses (final decoder layer) from Detectron2's metrics.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    with open(metrics_file) as f:
        for line in f:
            line = line.strip()
            if line:
                row = json.loads(line)
                if "total_loss" in row:
                    rows.append(row)
    if not rows:
        raise RuntimeError(f"no training losses in {metrics_file}")
    iters = np.array([r["iteration"] for r in rows])
    terms = sorted(
        k
        for k in rows[-1]
        if k.startswith("loss_") and not k.rsplit("_", 1)[-1].isdigit() and not k.endswith("_enc")
    )
    style = {"marker": "o" if len(rows) < 20 else None}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].plot(iters, [r["total_loss"] for r in rows], color="black", **style)
    axes[0].set_title("total loss (all terms, all decoder layers)")
    for k in terms:
        axes[1].plot(iters, [r.get(k, np.nan) for r in rows], label=k, **style)
    axes[1].set_title("loss terms of the last layer")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)


def draw_predictions(cfg, model, out_dir: str, num_images: int, threshold: float):
    """Ground truth | predictions for the first ``num_images`` images of ``DATASETS.TEST[0]``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data import detection_utils as utils
    from detectron2.utils.visualizer import Visualizer

    from solq_d2.engine import build_mapper

    name = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(name)
    mapper = build_mapper(cfg, False)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    from PIL import Image

    model.eval()
    for d in DatasetCatalog.get(name)[:num_images]:
        image = utils.read_image(d["file_name"], format="RGB")
        scale = max(1.0, 384 / max(image.shape[:2]))
        with torch.no_grad():
            instances = model([mapper(copy.deepcopy(d))])[0]["instances"].to("cpu")
        instances = instances[instances.scores >= threshold]
        gt = Visualizer(image, metadata, scale=scale).draw_dataset_dict(d).get_image()
        pred = Visualizer(image, metadata, scale=scale).draw_instance_predictions(instances)
        path = os.path.join(out_dir, f"{Path(d['file_name']).stem}.png")
        Image.fromarray(np.concatenate([gt, pred.get_image()], axis=1)).save(path)
        written.append(path)
    return written


def main(argv=None):
    args = get_parser().parse_args(argv)
    start = time.monotonic()
    from detectron2.engine import default_setup
    from detectron2.utils.logger import setup_logger

    import solq_d2
    from solq_d2.engine import Trainer

    cfg, config_file = setup_cfg(args)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    # the same calls as default_setup (below, once the schedule is final), which reuses them
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=0, name="fvcore")
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=0)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=0, name="solq_d2")
    logger.info("Preparing the datasets (generated on first use) ...")
    solq_d2.data.register_datasets_from_cfg(cfg)

    if args.max_iter is not None:
        scale_schedule(cfg, args.max_iter)
    elif args.minutes is not None:
        logger.info("Measuring training and inference speed on this machine ...")
        per_iter, per_image, num_test = measure_speed(cfg)
        left = args.minutes * 60 - (time.monotonic() - start) - per_image * num_test * 1.2 - 20
        scale_schedule(cfg, left / per_iter)
        logger.info(
            f"{per_iter:.2f} s/iteration, {per_image:.2f} s/image at test: "
            f"{cfg.SOLVER.MAX_ITER} iterations fit in {args.minutes:g} minutes"
        )
    cfg.freeze()
    default_setup(cfg, argparse.Namespace(config_file=config_file, eval_only=False, demo=args))
    logger.info(f"Training {cfg.MODEL.META_ARCHITECTURE} for {cfg.SOLVER.MAX_ITER} iterations")

    train_cfg = cfg.clone()
    train_cfg.defrost()
    train_cfg.DATASETS.TEST = ()  # evaluated once below, not also by the trainer's final hook
    train_cfg.freeze()
    trainer = Trainer(train_cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()

    results = Trainer.test(cfg, trainer.model)
    if "bbox" in results or "segm" in results:  # one test dataset: results are not nested
        results = dict(results)
    else:
        results = dict(next(iter(results.values())))
    results["_datasets"] = list(cfg.DATASETS.TEST)

    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    images = draw_predictions(
        cfg,
        model,
        os.path.join(args.output, "predictions"),
        args.num_images,
        args.confidence_threshold,
    )
    plot_losses(
        os.path.join(cfg.OUTPUT_DIR, "metrics.json"), os.path.join(args.output, "losses.png")
    )
    print_ap_tables(results)
    print(
        f"\nDemo finished in {(time.monotonic() - start) / 60:.1f} min. Wrote:\n"
        f"  {os.path.join(args.output, 'losses.png')}\n"
        + "".join(f"  {p}\n" for p in images)
        + f"  {cfg.OUTPUT_DIR}/ (checkpoints, metrics.json, log.txt, inference/)"
    )
    return results


if __name__ == "__main__":
    main()
