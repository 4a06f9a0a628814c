r"""
A MiCRo reward model in the shape TRL's PPOTrainer (TRL 1.0-1.12, `trl.experimental.ppo`) reads a reward model in.

PPO scores a rollout with `get_reward(model, query_responses, pad_token_id, context_length)`: it runs
`getattr(model, model.base_model_prefix)(input_ids, attention_mask, position_ids, output_hidden_states=True, ...)`,
applies `model.score` to the last hidden states to get one score per token, and keeps the score of each row's last
non-padding token. A MiCRo reward is not a per-token linear read-out (the router needs the prompt), so
[`MiCRoRewardForPPO`] runs the whole MiCRo forward in its "backbone" and hands back the routed reward r(x, y | c) of
each row repeated at every position; `score` is the identity. PPO therefore gets exactly

    r(x, y | c)                                     (the routed reward, `trl_micro.modeling_micro.routed_reward`)

where the prompt x (the query, carrying the context c, e.g. as its system message) ends at the last
`config.prompt_marker_ids` in the row (the chat template's assistant header for chat data). Rollouts that stop at the
EOS are completed with the rest of the ending training used (`config.completion_end_ids`, e.g. the newline after
`<|im_end|>`), so they are scored at the token training scored. Use it as `reward_model`, not as `value_model`: the
value model needs per-token values (TRL's recipe: `AutoModelForSequenceClassification` of the policy's backbone).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.modeling_outputs import BaseModelOutput

from .modeling_micro import MiCRoRewardModel


class RoutedRewardBackbone(nn.Module):
    """Runs the MiCRo forward and returns the routed reward of each row as a one-feature "hidden state" per token."""

    def __init__(self, model: MiCRoRewardModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, **ignored) -> BaseModelOutput:
        # `position_ids` (PPO left-pads queries) are not needed: the model right-aligns the rows it completes, and the
        # rotary or absolute positions of a right-aligned row start at 0, as in training.
        rewards = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (batch, 1)
        per_token = rewards[:, None, :].expand(-1, input_ids.shape[1], -1)
        return BaseModelOutput(last_hidden_state=per_token, hidden_states=(per_token,))


class MiCRoRewardForPPO(nn.Module):
    """
    `reward_model` for TRL's PPOTrainer; see the module docstring.

    ```python
    reward_model = MiCRoRewardForPPO.from_pretrained("micro-rm")
    trainer = PPOTrainer(args=..., model=policy, ref_model=None, reward_model=reward_model, value_model=value, ...)
    ```
    """

    base_model_prefix = "routed_reward"

    def __init__(self, model: MiCRoRewardModel):
        super().__init__()
        if not isinstance(model, MiCRoRewardModel):
            raise TypeError(f"MiCRoRewardForPPO needs a MiCRoRewardModel, got {type(model).__name__}.")
        if not model.config.prompt_marker_ids:
            raise ValueError(
                "This MiCRo model has no `prompt_marker_ids`, so the router cannot find where PPO's query ends. Set "
                "`model.config.prompt_marker_ids` to the ids that end every query (the chat template's assistant "
                "header), or train on chat data or with `prompt_marker`."
            )
        self.config = model.config
        self.routed_reward = RoutedRewardBackbone(model.eval())
        self.score = nn.Identity()

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | str = torch.float32, **kwargs) -> MiCRoRewardForPPO:
        return cls(MiCRoRewardModel.from_pretrained(path, dtype=dtype, **kwargs))

    @property
    def micro_model(self) -> MiCRoRewardModel:
        return self.routed_reward.model

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.micro_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
