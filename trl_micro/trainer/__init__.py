from .adaptation_config import RouterAdaptationConfig
from .adaptation_trainer import RouterAdaptationTrainer
from .base_config import MiCRoBaseConfig
from .lora import merge_lora_run, prepare_peft_config
from .micro_config import MiCRoRewardConfig
from .micro_trainer import MiCRoRewardTrainer, build_micro_model

__all__ = [
    "MiCRoBaseConfig",
    "MiCRoRewardConfig",
    "MiCRoRewardTrainer",
    "RouterAdaptationConfig",
    "RouterAdaptationTrainer",
    "build_micro_model",
    "merge_lora_run",
    "prepare_peft_config",
]
