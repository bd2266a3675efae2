"""The trainer: AdamW + warmup/cosine, evaluation, metrics.jsonl + plot, atomic checkpoints, DDP."""

from mbm.train.config import TrainConfig, load_toml, merge
from mbm.train.evaluate import evaluate
from mbm.train.trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "evaluate", "load_toml", "merge", "train"]
