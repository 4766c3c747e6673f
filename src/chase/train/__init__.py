"""The reference trainer behind ``chase train``: config, data, loop, checkpoints, run folder, DDP.

Nothing here is imported by ``import chase``; YAML, torchvision and tqdm are loaded only when used.
"""

from chase.train.config import ConfigError, TrainConfig, load_config
from chase.train.run import train

__all__ = ["ConfigError", "TrainConfig", "load_config", "train"]
