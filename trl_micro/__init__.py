"""trl-micro: MiCRo personalized reward models (mixture of Bradley-Terry heads + context-aware routing) for TRL."""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .configuration_micro import MiCRoConfig
from .modeling_micro import MiCRoRewardModel, MiCRoRewardOutput
from .personalization import (
    OnlineRouter,
    ResidualHeads,
    UserAdaptation,
    UserStore,
    adapt_to_users,
    open_user_store,
)
from .personalization.adaptation import ContextAdaptation, adapt_to_contexts
from .ppo_reward import MiCRoRewardForPPO
from .rewards import MiCRoReward
from .scoring import PairScores, score_preference_pairs
from .trainer import MiCRoRewardConfig, MiCRoRewardTrainer, RouterAdaptationConfig, RouterAdaptationTrainer

__version__ = "0.1.0"

AutoConfig.register(MiCRoConfig.model_type, MiCRoConfig, exist_ok=True)
AutoModel.register(MiCRoConfig, MiCRoRewardModel, exist_ok=True)
AutoModelForSequenceClassification.register(MiCRoConfig, MiCRoRewardModel, exist_ok=True)

__all__ = [
    "ContextAdaptation",
    "MiCRoConfig",
    "MiCRoReward",
    "MiCRoRewardForPPO",
    "OnlineRouter",
    "PairScores",
    "ResidualHeads",
    "RouterAdaptationConfig",
    "RouterAdaptationTrainer",
    "MiCRoRewardConfig",
    "MiCRoRewardModel",
    "MiCRoRewardOutput",
    "MiCRoRewardTrainer",
    "UserAdaptation",
    "UserStore",
    "adapt_to_contexts",
    "adapt_to_users",
    "open_user_store",
    "score_preference_pairs",
]
