"""Run by test_distributed.py: the same total batch on 1 process and on 2 CPU processes (gloo).

``python tests/engine/dist_check.py <work_dir>`` writes into ``work_dir``:

* ``ref.pt``: one training step (losses, gradients after full-model clipping, parameters after
  the SGD step) of the whole batch
  of 4 images in this process, plus ``raw_grads`` (before clipping) and ``naive_grads``: the
  gradients two processes would get if the box count were *not* all-reduced (each half normalised
  by its own boxes, then averaged), which the test uses to show it can tell the two apart;
* ``rank{0,1}.pt``: the same step with each of 2 processes seeing half of the batch, through
  Detectron2's ``SimpleTrainer`` and ``comm``, and solq_d2's optimizer and DDP wrapper (the
  trainer's);
* ``final_rank{0,1}.pt`` and ``out/``: a 3-iteration ``solq_d2.engine.Trainer`` run on both
  processes with distributed COCO evaluation at the end.

Detectron2 v0.6's ``launch`` requires CUDA, so the processes are started here with
``torch.multiprocessing`` and the gloo process group is created as ``launch`` would do it.
"""

import copy
import itertools
import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import detectron2.utils.comm as comm
from detectron2.data import DatasetCatalog
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import EventStorage

import engine_toy
from solq_d2.engine import Trainer, build_mapper, create_ddp_model

DATASET = "engine_dist_train"
WORLD = 2
# The model (one-line switch): "solq", whose criterion all-reduces the box count, or "toy".
ARCH = "solq"


def _cfg(work_dir):
    cfg = engine_toy.make_cfg(DATASET, DATASET, os.path.join(work_dir, "out"), arch=ARCH)
    cfg.SOLVER.MAX_ITER = 3
    cfg.SOLVER.CHECKPOINT_PERIOD = 100
    return cfg


def _batch(cfg):
    """4 images (with 1, 0, 3 and 1 boxes), mapped deterministically (no flip / crop)."""
    dicts = DatasetCatalog.get(DATASET)[:4]
    mapper = build_mapper(cfg, True)
    return [mapper(copy.deepcopy(d)) for d in dicts]


def _step_cfg(cfg):
    """SGD without momentum for the one-step comparison: the update is linear in the (clipped)
    gradients, so it can be compared at the gradients' precision (AdamW's first update is about
    lr * sign(g), which flips on float noise for gradients near 0). AdamW runs in the trainer."""
    cfg = cfg.clone()
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.MOMENTUM = 0.0
    cfg.SOLVER.BASE_LR = 0.1
    return cfg


def _one_step(cfg, batch):
    cfg = _step_cfg(cfg)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = Trainer.build_optimizer(cfg, model)
    trainer = SimpleTrainer(
        create_ddp_model(model, broadcast_buffers=False), itertools.repeat(batch), optimizer
    )
    with EventStorage(0) as storage:
        trainer.run_step()
        losses = {k: v.latest() for k, v in storage.histories().items() if "loss" in k}
    return {
        "losses": losses,  # on the main process: averaged over processes by SimpleTrainer
        "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "init_params": init,
        "lr": cfg.SOLVER.BASE_LR,
        "num_boxes": [len(x["instances"]) for x in batch],
    }


def _grads_only(cfg, batch):
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    sum(model(batch).values()).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank, url, work_dir):
    torch.set_num_threads(1)
    # a short timeout: a collective that one process never joins fails the test instead of hanging
    dist.init_process_group(
        "gloo", init_method=url, world_size=WORLD, rank=rank, timeout=timedelta(seconds=90)
    )
    if hasattr(comm, "create_local_process_group"):  # detectron2 main
        comm.create_local_process_group(WORLD)
    else:  # detectron2 v0.6: what its launch() does
        comm._LOCAL_PROCESS_GROUP = dist.new_group(list(range(WORLD)))
    comm.synchronize()
    engine_toy.register_tiny_coco(DATASET, os.path.join(work_dir, "ds"))
    cfg = _cfg(work_dir)

    batch = _batch(cfg)
    half = len(batch) // WORLD
    step = _one_step(cfg, batch[rank * half : (rank + 1) * half])
    torch.save(step, os.path.join(work_dir, f"rank{rank}.pt"))

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    final = {n: p.detach().clone() for n, p in trainer.model.module.named_parameters()}
    results = getattr(trainer, "_last_eval_results", None) if comm.is_main_process() else None
    torch.save({"params": final, "eval": results}, os.path.join(work_dir, f"final_rank{rank}.pt"))
    comm.synchronize()
    dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(work_dir):
    torch.set_num_threads(1)
    engine_toy.register_tiny_coco(DATASET, os.path.join(work_dir, "ds"))
    cfg = _cfg(work_dir)
    batch = _batch(cfg)
    ref = _one_step(cfg, batch)
    half = len(batch) // WORLD
    halves = [_grads_only(cfg, batch[i * half : (i + 1) * half]) for i in range(WORLD)]
    ref["naive_grads"] = {n: sum(h[n] for h in halves) / WORLD for n in halves[0]}
    ref["raw_grads"] = _grads_only(cfg, batch)
    torch.save(ref, os.path.join(work_dir, "ref.pt"))

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, nprocs=WORLD, args=(f"tcp://127.0.0.1:{_free_port()}", work_dir))


if __name__ == "__main__":
    main(sys.argv[1])
