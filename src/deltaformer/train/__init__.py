"""Training: the :class:`Trainer` loop, schedules, exact checkpoint/resume, and torchrun data parallel."""

from .checkpoint import TrainingCheckpoint, load_checkpoint, save_checkpoint
from .distributed import DistEnv, init_distributed
from .evaluation import evaluate, predict_probabilities
from .probe import layer_features
from .schedule import WarmupDecay, make_scheduler
from .seeding import seed_everything
from .trainer import TrainConfig, Trainer

__all__ = [
    "DistEnv",
    "TrainConfig",
    "Trainer",
    "TrainingCheckpoint",
    "WarmupDecay",
    "evaluate",
    "init_distributed",
    "layer_features",
    "load_checkpoint",
    "make_scheduler",
    "predict_probabilities",
    "save_checkpoint",
    "seed_everything",
]
