"""trl-micro: MiCRo personalized reward models (mixture of Bradley-Terry heads + context-aware routing) for TRL."""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .configuration_micro import MiCRoConfig
from .context_adaptation import ContextAdaptation, adapt_to_contexts
from .modeling_micro import MiCRoRewardModel, MiCRoRewardOutput
from .online_router import OnlineRouter
from .ppo_reward import MiCRoRewardForPPO
from .residual_heads import ResidualHeads
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
    "adapt_to_contexts",
    "score_preference_pairs",
]
