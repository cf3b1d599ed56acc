"""Training: the paper's recipes as data (``RECIPES``), the loop (mixed precision, channels_last,
``torch.compile``, memory-efficient blocks, gradient accumulation, DistributedDataParallel under
``torchrun``), per-epoch validation and metrics, and atomic checkpoints from which
``train(config, resume=True)`` continues after a crash or a kill.

On CPU with ``deterministic=True`` and ``workers=0``, a run killed at any moment and resumed
ends with exactly the weights of an uninterrupted run: the data order is a permutation seeded by
``(seed, epoch)``, each image's augmentation has its own seed (``densenet.data.datasets.sample_seed``),
and the checkpoints hold the optimizer, scheduler, scaler, step and random-number states.

Modules: ``config`` (settings and recipes), ``setup`` (data, model card and optimiser of a run),
``loop`` (the run), ``checkpointer`` (save and resume), ``metrics`` (the per-epoch log). A front
end: imports ``densenet.tasks`` and the packages below it, never ``serve`` or ``cli``.
"""

from densenet.infer.runtime import AMP_MODES, amp_dtype, distributed_setup, process_group
from densenet.train.config import (
    RECIPES,
    TrainConfig,
    eval_resize,
    make_config,
    milestone_epochs,
    parse_override,
)
from densenet.train.loop import Trainer, train
from densenet.train.setup import TrainingError
from densenet.weights.checkpoint import (
    CheckpointError,
    TrainCheckpoint,
    read_checkpoint,
    save_checkpoint,
)

__all__ = [
    "AMP_MODES",
    "RECIPES",
    "CheckpointError",
    "TrainCheckpoint",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "amp_dtype",
    "distributed_setup",
    "eval_resize",
    "make_config",
    "milestone_epochs",
    "parse_override",
    "process_group",
    "read_checkpoint",
    "save_checkpoint",
    "train",
]
