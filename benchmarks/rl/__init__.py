"""The RL personalization benchmark: policies trained with GRPO against MiCRo, SingleReward and a gold reward."""
