from .micro_config import MiCRoRewardConfig
from .micro_trainer import MiCRoRewardTrainer, build_micro_model

__all__ = ["MiCRoRewardConfig", "MiCRoRewardTrainer", "build_micro_model"]
