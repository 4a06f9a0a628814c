"""
trl-micro: MiCRo personalized reward models (mixture of Bradley-Terry heads + context-aware routing) for TRL.

`import trl_micro` registers the "micro" model type with transformers' Auto classes and imports nothing else but the
config: the model classes register when the first MiCRo config is built (an Auto load builds the config before it
looks up the model class), and each public name below is imported from its module the first time it is used (as
transformers and TRL do), so a process that only scores or serves never loads the trainers.
"""

from typing import TYPE_CHECKING

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .configuration_micro import MiCRoConfig

__version__ = "0.1.0"


def _register_model_classes() -> None:
    from .modeling_micro import MiCRoRewardModel

    AutoModel.register(MiCRoConfig, MiCRoRewardModel, exist_ok=True)
    AutoModelForSequenceClassification.register(MiCRoConfig, MiCRoRewardModel, exist_ok=True)


AutoConfig.register(MiCRoConfig.model_type, MiCRoConfig, exist_ok=True)
MiCRoConfig.on_first_build.append(_register_model_classes)

_LAZY = {
    "MiCRoRewardModel": ".modeling_micro",
    "MiCRoRewardOutput": ".modeling_micro",
    "MiCRoReward": ".rewards",
    "MiCRoRewardForPPO": ".ppo_reward",
    "PairScores": ".scoring",
    "score_preference_pairs": ".scoring",
    "MiCRoRewardConfig": ".trainer",
    "MiCRoRewardTrainer": ".trainer",
    "RouterAdaptationConfig": ".trainer",
    "RouterAdaptationTrainer": ".trainer",
    "OnlineRouter": ".personalization",
    "ResidualHeads": ".personalization",
    "UserAdaptation": ".personalization",
    "UserStore": ".personalization",
    "adapt_to_users": ".personalization",
    "open_user_store": ".personalization",
    "ContextAdaptation": ".personalization.adaptation",  # deprecated names, removed in the next release
    "adapt_to_contexts": ".personalization.adaptation",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # what static tools and IDEs see
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

__all__ = [
    "ContextAdaptation",
    "MiCRoConfig",
    "MiCRoReward",
    "MiCRoRewardConfig",
    "MiCRoRewardForPPO",
    "MiCRoRewardModel",
    "MiCRoRewardOutput",
    "MiCRoRewardTrainer",
    "OnlineRouter",
    "PairScores",
    "ResidualHeads",
    "RouterAdaptationConfig",
    "RouterAdaptationTrainer",
    "UserAdaptation",
    "UserStore",
    "adapt_to_contexts",
    "adapt_to_users",
    "open_user_store",
    "score_preference_pairs",
]
