"""``Trainer``: Detectron2's ``DefaultTrainer`` with solq_d2's optimizer, data, evaluator and
checkpointer."""

import logging
import weakref
from typing import Iterable, Optional

from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.engine import create_ddp_model as d2_create_ddp_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .. import data
from ..checkpoint import SolqD2Checkpointer
from ..evaluation import build_coco_evaluator
from .optimizer import build_optimizer

__all__ = [
    "Trainer",
    "build_mapper",
    "create_ddp_model",
    "model_num_classes",
    "check_model_num_classes",
]

logger = logging.getLogger(__name__)

# MODEL.META_ARCHITECTURE -> the config node holding its NUM_CLASSES (interfaces: one per method).
NUM_CLASSES_KEYS = {"SOLQ": "SOLQ", "SOIT": "SOIT", "QueryInst": "QUERYINST"}


def build_mapper(cfg, is_train: bool):
    """The dataset mapper named by ``INPUT.DATASET_MAPPER_NAME``
    (:func:`solq_d2.data.build_dataset_mapper`)."""
    return data.build_dataset_mapper(cfg, is_train)


def create_ddp_model(model, **kwargs):
    """Detectron2's ``create_ddp_model`` (the model itself when there is one process), made to
    work on CPU too: Detectron2 always passes ``device_ids=[local_rank]``, which
    ``DistributedDataParallel`` rejects for a CPU module (gloo backend)."""
    if comm.get_world_size() > 1 and "device_ids" not in kwargs:
        device = next(model.parameters()).device
        if device.type != "cuda":
            kwargs["device_ids"] = None
    return d2_create_ddp_model(model, **kwargs)


def model_num_classes(cfg) -> Optional[int]:
    """The class count of the configured meta-architecture (``MODEL.<METHOD>.NUM_CLASSES``), or
    None for a meta-architecture that is not one of solq_d2's."""
    key = NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE)
    if key is None or key not in cfg.MODEL or "NUM_CLASSES" not in cfg.MODEL[key]:
        return None
    return int(cfg.MODEL[key].NUM_CLASSES)


def check_model_num_classes(cfg, dataset_names: Iterable[str]) -> None:
    """Raise ``ValueError`` if the model's class count differs from the datasets' metadata.

    The count is ``MODEL.SOLQ/SOIT/QUERYINST.NUM_CLASSES`` per ``MODEL.META_ARCHITECTURE``; other
    meta-architectures are not checked. The comparison (including SOLQ's official 91-way COCO
    classifier, accepted on an 80-class COCO dataset) is :func:`solq_d2.data.check_num_classes`.
    """
    dataset_names = [n for n in dataset_names if n]
    num_classes = model_num_classes(cfg)
    if num_classes is not None and dataset_names:
        data.check_num_classes(cfg, dataset_names, num_classes)


class Trainer(DefaultTrainer):
    """Detectron2's ``DefaultTrainer`` for SOLQ / SOIT / QueryInst.

    Differences from ``DefaultTrainer``:

    * optimizer from :func:`solq_d2.engine.build_optimizer` (AdamW/SGD, LR multipliers by name,
      weight-decay groups, full-model gradient clipping);
    * data loaders use the mapper named by ``INPUT.DATASET_MAPPER_NAME``;
    * evaluation with ``COCOEvaluator`` (``TEST.EVAL_TASKS``; fast path only when built);
    * checkpoints through :class:`SolqD2Checkpointer` (safe loading, atomic saves, official
      formats), and they include the optimizer state so ``--resume`` restores AdamW's moments;
    * the datasets of ``DATASETS.COCO_INSTANCES`` are registered and the model's class count is
      checked against the training datasets before anything is built.
    """

    def __init__(self, cfg):
        """
        Args:
            cfg (CfgNode): a config with solq_d2's keys.
        """
        # The steps of DefaultTrainer.__init__ (identical in Detectron2 v0.6 and main), with the
        # class-count check first, a DDP wrapper that works on CPU, and SolqD2Checkpointer.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        data.register_datasets_from_cfg(cfg)  # DATASETS.COCO_INSTANCES; idempotent
        check_model_num_classes(cfg, cfg.DATASETS.TRAIN)

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)

        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SolqD2Checkpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()  # optimizer (Detectron2 v0.6 omits it)
        return ret

    def load_state_dict(self, state_dict):
        # The base classes of DefaultTrainer restore the iteration and hook states; the inner
        # trainer restores the optimizer. (Detectron2 main does the same in DefaultTrainer.)
        super(DefaultTrainer, self).load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("The checkpoint has no optimizer state: the optimizer starts afresh")

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=build_mapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_coco_evaluator(cfg, dataset_name, output_folder)
