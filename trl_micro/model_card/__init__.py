r"""
The model card of a MiCRo checkpoint (its `README.md`, what the Hub page shows): TRL's reward-model card
(`trl.trainer.utils.generate_model_card`) followed by what a reader needs to use the K heads: the model (base model,
K, router), the data, the training settings, how to load it, and one card per head, measured on the training or
evaluation pairs with the checkpoint's own router:

- routed: the share of pairs whose largest router weight is the head's, and the head's mean weight;
- accuracy: the share of pairs the head alone ranks correctly (ties count half), over all pairs and per context when
  the pairs name one (`context_id`, else the context text);
- length: the Pearson correlation, over the pairs' responses y, of the head's reward r_k(x, y) with the length of y
  in characters (positive: the head rewards longer responses);
- examples: the responses it scores highest and lowest, shortened;

plus the head-usage plot (mean router weight per head and context; matplotlib, `pip install 'trl-micro[eval]'`).
`trl-micro eval` adds its per-context table ([`add_evaluation_section`]). Each section sits between HTML comments
(`<!-- trl-micro:name -->`), so a later save or evaluation replaces its own section and keeps the others.
"""

from .head_measurements import HeadCard, measure_heads, message_text, preference_summary
from .hub_names import card_base_model, data_name, polish_trl_card, quick_start_lines
from .sections import add_evaluation_section, micro_section_lines, replace_section, write_card_section
from .trainer_card import MiCRoModelCardMixin, sample_pairs

__all__ = [
    "HeadCard",
    "MiCRoModelCardMixin",
    "add_evaluation_section",
    "card_base_model",
    "data_name",
    "measure_heads",
    "message_text",
    "micro_section_lines",
    "polish_trl_card",
    "preference_summary",
    "quick_start_lines",
    "replace_section",
    "sample_pairs",
    "write_card_section",
]
