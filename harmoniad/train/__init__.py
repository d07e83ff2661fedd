"""Training HarmoniAD: settings (:mod:`.config`), the loop (:mod:`.loop`), checkpoints (:mod:`.checkpoint`),
fusion weights learned on pseudo-defects after training (:mod:`.fusion`)."""

from harmoniad.train.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    CheckpointInfo,
    load_checkpoint,
    read_checkpoint_info,
    save_checkpoint,
)
from harmoniad.train.config import TrainConfig
from harmoniad.train.loop import build_model, train

__all__ = [
    "CONFIG_FILE",
    "MODEL_FILE",
    "STATE_FILE",
    "CheckpointError",
    "CheckpointInfo",
    "TrainConfig",
    "build_model",
    "load_checkpoint",
    "read_checkpoint_info",
    "save_checkpoint",
    "train",
]
