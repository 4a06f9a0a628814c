r"""
A MiCRo reward model as a reward function of TRL's online trainers (GRPOTrainer, RLOOTrainer).

For a prompt x, a completion y and the example's context c (a user description, a criterion, a persona), the reward is
the personalized reward the model was trained to give,

    r(x, y | c) = r_w(x, c, y)  (+ u_user . h(x, c, y) for a user with a residual head),

with r_w the routed reward under weights w (`trl_micro.modeling_micro.routed_reward`), chosen per completion by, in
order of precedence:

1. the user id in `user_column`, when the user store (`user_store`, `trl_micro.personalization.stores`) or an
   in-memory [`OnlineRouter`] has a posterior for that user (Stage 2 online routing);
2. the router reading the prompt with the context joined as in training (`context_column`; a row whose context is
   `None` or empty, and every row when `context_column=None`, is routed by its prompt alone).

A user with a residual head (in the user store, or a [`ResidualHeads`] passed as `residual_heads`) also gets its
correction u_user . h on the backbone's reward features h (`trl_micro.personalization.residual_heads`); other rows get
none. A user store is read through a cache (`CachedUserStore`): a user's weights are at most `store_staleness_s` old,
so comparisons that other processes record reach this reward within that time.

One scoring core. Every row this reward scores, in a trainer, in `trl-micro serve` or in verl's reward function, goes
through [`MiCRoReward.encode_rows`] (checks, user ids, truncation, tokenization) and [`MiCRoReward.score_encoded`]
(the model, the user state, the accounting of unknown users); nothing else checks a row again. A row it cannot score
raises [`InvalidRow`] (a `ValueError`) naming the list, the row and the fix: a prompt, completion or context that is
not text or a list of chat messages, a message without a text `role` and a text `content`, text that is not valid
Unicode (a lone UTF-16 surrogate), a text prompt with a messages completion (or the reverse), a chat template that
cannot render the row.

User ids follow the stores' one rule (`trl_micro.value_checks.normalize_user_id`): a `str`, or an `int` read as its
decimal string (an integer `context_id` column finds the stores `trl-micro eval` keys by `str(context_id)`), of at most
`MAX_USER_ID_CHARS` characters; `None` is "no user"; any other type is an error ([`InvalidUserId`], also a
`TypeError`). Rows whose user a store does not know are counted and logged (`micro/fallback_rows`: routed by the
model's router instead of the online router; `micro/rows_without_residual`), and a warning names one such user, its
id cut to 32 characters, at most once a minute per kind (the rows since the last one counted in it): constant memory
and log volume, however many distinct unknown users arrive.

Every prompt + completion is tokenized by `encode_prompt_completion`, exactly as in training (EOS or the chat
template's end of turn appended), and scored in batches of `batch_size`, one backbone pass each. A sequence longer
than `max_length` keeps its prompt and its ending and loses the tail of the completion; a prompt that does not fit on
its own loses its beginning (and, with it, a context put in front of it). Before tokenizing, texts are cut the same way
in characters, to `max_chars` (by default `max_length` times the tokenizer's longest token, so the cut never touches a
text that would keep all its tokens): a 10 MB response costs no more to tokenize than one of `max_chars` characters.
The trainer logs, next to TRL's metrics:
`micro/head_reward/k` and `micro/head_weight/k` (which heads drive the reward), `micro/residual_reward` (the mean
residual-head correction, with `residual_heads`), and `micro/reward/<group>`, the mean reward of each context id
(`group_column`), user or context, for up to `max_logged_groups` groups.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from accelerate import PartialState
from accelerate.utils import extract_model_from_parallel
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase
from trl.models import prepare_deepspeed

from .data_utils import Messages, completion_end_token_ids, encode_prompt_completion, join_context, pad_right
from .feature_cache import compute_sequence_readings, reward_model_fingerprint, sequence_key
from .modeling_micro import ADAPTER_CONFIG_NAME, MiCRoRewardModel, is_lora_run, routed_reward
from .personalization.online_router import OnlineRouter
from .personalization.residual_heads import ResidualHeads
from .personalization.stores import CachedUserStore, UserStore, open_user_store
from .reward_inputs import LOGGED_ID_CHARS, InvalidRow, InvalidUserId, check_text, cut_text, row_user_ids  # noqa: F401 (InvalidUserId stays importable from here)
from .value_checks import is_integer

logger = logging.getLogger(__name__)

TRAINER_KWARGS = ("trainer_state", "log_extra", "log_metric", "environments", "completion_ids")
WARNING_INTERVAL_S = 60.0


class EncodedRow(NamedTuple):
    """A row as `MiCRoReward.encode_rows` hands it to `score_encoded`: token ids, prompt length, user id or None."""

    ids: list[int]
    prompt_length: int
    user: str | None


class RateLimitedWarning:
    """Logs at most one warning per `interval_s` seconds; the events in between are counted into the next one."""

    def __init__(self, interval_s: float = WARNING_INTERVAL_S):
        self.interval_s = interval_s
        self._last: float | None = None
        self._folded = 0
        self._lock = threading.Lock()

    def warn(self, count: int, message: Callable[[int], str]) -> None:
        """Record `count` events; if a warning is due, log `message(events since the last warning)`."""
        with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last < self.interval_s:
                self._folded += count
                return
            count, self._folded, self._last = count + self._folded, 0, now
        logger.warning(message(count))


_PROMPT_CUTS = RateLimitedWarning()


class MiCRoReward:
    """
    Reward function for `GRPOTrainer` / `RLOOTrainer` backed by a [`MiCRoRewardModel`]; see the module docstring.

    ```python
    reward = MiCRoReward.from_pretrained("micro-rm", context_column="context")
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=args, train_dataset=prompts_with_context)
    reward.prepare(trainer.accelerator)  # needed under DeepSpeed ZeRO-3, harmless otherwise
    trainer.train()
    ```

    Args:
        model ([`MiCRoRewardModel`]): the reward model (put in eval mode).
        tokenizer: the tokenizer the reward model was trained with.
        context_column (`str` or `None`, defaults to `"context"`): dataset column joined to each prompt. A column
            missing from the dataset is an error; `None` routes by the prompt alone.
        user_column (`str`, *optional*): dataset column of user ids (str or int) routed through `online_router`.
        user_store ([`UserStore`], [`CachedUserStore`] or URL, *optional*): the per-user weights over the heads and
            residual heads, e.g. `"sqlite:///users.db"`. A user it does not know (or a `None` id) is routed by the
            model's router, and counted (`micro/fallback_rows`).
        store_staleness_s (`float`, defaults to 0.5): how old a user's weights read from `user_store` may be, in
            seconds (a `UserStore` or URL is wrapped in a `CachedUserStore` with it).
        online_router ([`OnlineRouter`] or path, *optional*): in-memory per-user weights over the heads (a JSON file
            from `UserAdaptation.save`), instead of a `user_store`.
        residual_heads ([`ResidualHeads`] or path, *optional*): in-memory per-user residual heads added to the routed
            reward, instead of a `user_store`'s; a user without one gets no correction.
        batch_size (`int`, defaults to 16): sequences per backbone pass.
        max_length (`int`, *optional*): longest scored sequence, in tokens (>= 1); `None`: the backbone's
            `max_position_embeddings`.
        max_chars (`int`, *optional*): longest text (a prompt with its context, a completion; the contents of a list
            of messages together) tokenized, in characters (>= 1): a prompt keeps its end, a completion its beginning.
            `None`: `max_length` times the tokenizer's longest token in characters, which cuts only texts that
            `max_length` cuts anyway.
        group_column (`str`, defaults to `"context_id"`): column naming the groups whose mean reward is logged; when
            absent from the dataset, the user id or the context text names the group.
        max_logged_groups (`int`, defaults to 16): groups logged at most (the first ones seen).
        name (`str`, defaults to `"micro_reward"`): the name TRL logs the reward under (`rewards/<name>/mean`).
    """

    def __init__(
        self,
        model: MiCRoRewardModel,
        tokenizer: PreTrainedTokenizerBase,
        context_column: str | None = "context",
        user_column: str | None = None,
        user_store: UserStore | CachedUserStore | str | None = None,
        store_staleness_s: float = 0.5,
        online_router: OnlineRouter | str | os.PathLike | None = None,
        residual_heads: ResidualHeads | str | os.PathLike | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        max_chars: int | None = None,
        group_column: str = "context_id",
        max_logged_groups: int = 16,
        name: str = "micro_reward",
    ):
        if not isinstance(model, MiCRoRewardModel):
            raise TypeError(f"MiCRoReward needs a MiCRoRewardModel, got {type(model).__name__}.")
        has_user_state = user_store is not None or online_router is not None or residual_heads is not None
        if user_column is not None and not has_user_state:
            raise ValueError(
                "`user_column` names users for `user_store` (or `online_router` / `residual_heads`): pass one of them."
            )
        if user_column is None and has_user_state:
            raise ValueError("`user_store`, `online_router` and `residual_heads` are per user: pass `user_column` too.")
        if user_store is not None and (online_router is not None or residual_heads is not None):
            raise ValueError(
                "Pass either `user_store` or the in-memory `online_router` / `residual_heads`, not both: import the "
                "JSON files into the store with `trl-micro users import FILE --user_store URL`."
            )
        if isinstance(user_store, (str, os.PathLike)):
            user_store = open_user_store(user_store, num_heads=model.num_heads)
        if isinstance(user_store, UserStore):
            user_store = CachedUserStore(user_store, max_staleness_s=store_staleness_s)
        if user_store is not None:
            fingerprint = reward_model_fingerprint(model) if user_store.store.settings.model_fingerprint else None
            user_store.store.check_model(num_heads=model.num_heads, model_fingerprint=fingerprint)
            stored_size = user_store.store.settings.hidden_size
            if stored_size is not None and stored_size != model.config.reward_feature_size:
                raise ValueError(
                    f"The user store's residual heads have hidden_size={stored_size}, the reward model's reward "
                    f"features {model.config.reward_feature_size}: they were fitted on another backbone or readout."
                )
        if isinstance(online_router, (str, os.PathLike)):
            online_router = OnlineRouter.load(online_router, expected_num_heads=model.num_heads)
        if online_router is not None and online_router.num_heads != model.num_heads:
            raise ValueError(
                f"The online router has num_heads={online_router.num_heads}, the reward model {model.num_heads}."
            )
        feature_size = model.config.reward_feature_size
        if isinstance(residual_heads, (str, os.PathLike)):
            residual_heads = ResidualHeads.load(residual_heads, expected_hidden_size=feature_size)
        if residual_heads is not None and residual_heads.hidden_size != feature_size:
            raise ValueError(
                f"The residual heads have hidden_size={residual_heads.hidden_size}, the reward model's reward features "
                f"{feature_size} ({model.config.readout_name}): they were fitted on another backbone's features or "
                "another readout's."
            )
        if not is_integer(batch_size) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")
        if max_length is not None and (not is_integer(max_length) or max_length < 1):
            raise ValueError(
                f"`max_length` must be an integer >= 1 (tokens), or None for the backbone's maximum; got "
                f"{max_length!r}."
            )
        if max_chars is not None and (not is_integer(max_chars) or max_chars < 1):
            raise ValueError(f"`max_chars` must be an integer >= 1 (characters), or None; got {max_chars!r}.")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.context_column = context_column
        self.user_column = user_column
        self.user_store = user_store
        self.online_router = online_router
        self.residual_heads = residual_heads
        self.batch_size = batch_size
        if max_length is None:
            max_length = getattr(model.config.text_config, "max_position_embeddings", None)
        self.max_length = max_length
        if max_chars is None and max_length is not None:
            max_chars = max_length * longest_token_chars(tokenizer)
        self.max_chars = max_chars
        self.group_column = group_column
        self.max_logged_groups = max_logged_groups
        self.__name__ = name
        self._logged_groups: dict[str, str] = {}
        self._unknown_user_warnings = {metric: RateLimitedWarning() for metric in UNKNOWN_USER_METRICS}
        self._prepared = False

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase | None = None,
        dtype: torch.dtype | str = torch.float32,
        **kwargs,
    ) -> MiCRoReward:
        """
        Load a MiCRo checkpoint (as saved by `MiCRoRewardTrainer`; a LoRA run's folder loads with its adapter merged)
        and its tokenizer. `kwargs` are the constructor's (`context_column`, `user_column`, `online_router`, ...). A
        checkpoint of another kind is an error.
        """
        path = os.fspath(path)
        if os.path.exists(os.path.join(path, ADAPTER_CONFIG_NAME)) and not is_lora_run(path):
            raise ValueError(
                f"{path} holds a PEFT adapter but no MiCRo config.json beside it, so it is not a LoRA run's folder as "
                "MiCRoRewardTrainer saves it (that one loads here, the adapter merged). Apply the adapter to the model "
                "it was trained on and merge it, `PeftModel.from_pretrained(model, path).merge_and_unload()`, then "
                "save that model with its tokenizer and load the saved folder."
            )
        has_config = os.path.exists(os.path.join(path, "config.json"))
        model_type = AutoConfig.from_pretrained(path).model_type if has_config else None
        if model_type != "micro":
            found = f"a {model_type!r} checkpoint" if model_type else "not a model directory"
            raise ValueError(
                f"{path} is {found}, not a MiCRo reward model. Train one with MiCRoRewardTrainer; a plain reward "
                "model can be passed to `reward_funcs` as it is."
            )
        model = MiCRoRewardModel.from_pretrained(path, dtype=dtype)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, **kwargs)

    @classmethod
    def for_user_ids(
        cls,
        path: str | os.PathLike,
        user_store: str | None = None,
        online_router: OnlineRouter | str | os.PathLike | None = None,
        residual_heads: ResidualHeads | str | os.PathLike | None = None,
        **kwargs,
    ) -> MiCRoReward:
        """
        `from_pretrained` for callers that pass user ids with each call (`score(users=...)`, `rerank`, the server, the
        verl reward) rather than in a dataset column: the user state given (any of `user_store`, `online_router`,
        `residual_heads`) routes them; with none, every row is routed by the model's router.
        """
        per_user = any(state is not None for state in (user_store, online_router, residual_heads))
        return cls.from_pretrained(
            path,
            user_column="user" if per_user else None,
            user_store=user_store,
            online_router=online_router,
            residual_heads=residual_heads,
            **kwargs,
        )

    # ------------------------------------------------------------------------------------------------ placement
    def prepare(self, accelerator) -> MiCRoReward:
        """
        Place the model the way TRL's trainers place a reward model of their own: a DeepSpeed inference engine under
        DeepSpeed (ZeRO-3 partitions it across processes), `accelerator.prepare_model` otherwise. Call it with the
        trainer's accelerator after the trainer is built; every process must then score the same number of batches,
        which GRPO and RLOO guarantee (each process scores its own equal share of completions).
        """
        if self._prepared:
            return self
        if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
            self.model = prepare_deepspeed(self.model, accelerator)
        else:
            self.model = accelerator.prepare_model(self.model, evaluation_mode=True, device_placement=True)
        self._prepared = True
        return self

    def _place_without_accelerator(self) -> None:
        if any(hasattr(parameter, "ds_id") for parameter in self.model.parameters()):
            raise RuntimeError(
                "The MiCRo reward model was built under DeepSpeed ZeRO-3 (its weights are partitioned): call "
                "`reward.prepare(trainer.accelerator)` after building the trainer."
            )
        self.model.to(PartialState().device)
        self._prepared = True

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def config(self):
        return extract_model_from_parallel(self.model).config

    # -------------------------------------------------------------------------------------------------- scoring
    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        log_metric, log_extra = kwargs.get("log_metric"), kwargs.get("log_extra")
        columns = {key: value for key, value in kwargs.items() if key not in TRAINER_KWARGS}
        contexts = self._column(columns, self.context_column, len(prompts))
        users = self._column(columns, self.user_column, len(prompts))
        if users is not None:
            users = row_user_ids(users, self.user_column)
        scores = self.score(prompts, completions, contexts=contexts, users=users)
        rewards = scores["rewards"].tolist()
        if log_metric is not None:
            groups = columns.get(self.group_column) or users or contexts
            self._log_metrics(log_metric, scores, groups)
            if users is not None:
                for metric, (missing, _) in self._unknown_user_rows(scores, users).items():
                    log_metric(metric, float(len(missing)))
        if log_extra is not None:
            for k in range(scores["head_rewards"].shape[1]):
                log_extra(f"micro/head_reward/{k}", scores["head_rewards"][:, k].tolist())
        return rewards

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[str | Messages],
        completions: Sequence[str | Messages],
        contexts: Sequence[str | None] | None = None,
        users: Sequence[str | int | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Score completions without a trainer: `rewards` (N,), `head_rewards` (N, K), `mixture_weights` (N, K),
        `residual_rewards` (N,; 0 for users without a residual head), and which rows the stores knew the user of,
        `online_routed` and `has_residual` (N,; bool), on the CPU. `contexts` and `users` are optional per-row lists
        (see the class docstring). A row `encode_rows` refuses raises [`InvalidRow`]; an empty call is an error.
        """
        return self.score_encoded(self.encode_rows(prompts, completions, contexts=contexts, users=users))

    def encode_rows(
        self,
        prompts: Sequence[str | Messages],
        completions: Sequence[str | Messages],
        contexts: Sequence[str | None] | None = None,
        users: Sequence[str | int | None] | None = None,
        allow_empty: bool = True,
        completion_name: str = "completions",
    ) -> list[EncodedRow]:
        """
        Every row's checks, user id, context, truncation and token ids, as `score_encoded` takes them (see the module
        docstring). A row it cannot score raises [`InvalidRow`] naming it (`completion_name` names the completions in
        the message, e.g. `chosen`); `allow_empty=False` refuses empty texts and messages too (a server that was sent
        nothing to score). Mismatched lengths and an empty call are `ValueError`s.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} {completion_name}.")
        if len(prompts) == 0:
            raise ValueError("MiCRoReward got no rows: `prompts` and `completions` are empty. Pass one per completion.")
        if contexts is not None and len(contexts) != len(prompts):
            raise ValueError(f"{len(contexts)} contexts for {len(prompts)} prompts.")
        user_ids = row_user_ids(users, "users") if users is not None else [None] * len(prompts)
        template = self.config.context_template
        encoded = []
        for row, (prompt, completion) in enumerate(zip(prompts, completions)):
            check_text(prompt, "prompts", row, allow_empty)
            check_text(completion, completion_name, row, allow_empty)
            if isinstance(prompt, list) != isinstance(completion, list):
                kinds = ("a list of messages", "text") if isinstance(prompt, list) else ("text", "a list of messages")
                raise InvalidRow(
                    completion_name,
                    row,
                    f"is {kinds[1]} and its prompt {kinds[0]}: send both as text or both as lists of chat messages.",
                )
            context = contexts[row] if contexts is not None else None
            if context is not None:
                check_text(context, "contexts", row, messages=False)
            joined = join_context(prompt, context, template, skip_if_present=True)
            try:
                ids, prompt_length = self._encode(joined, completion)
            except Exception as error:  # a chat template that cannot render the row, a tokenizer that refuses it
                raise self._unencodable(joined, row, completion_name, error) from error
            encoded.append(EncodedRow(ids, prompt_length, user_ids[row]))
        return encoded

    def _unencodable(self, prompt: str | Messages, row: int, completion_name: str, error: Exception) -> InvalidRow:
        """The `InvalidRow` of a row whose tokenization raised `error`: the prompt's if it fails alone."""
        name = completion_name
        if isinstance(prompt, list):
            try:
                self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            except Exception:
                name = "prompts"
        detail = str(error).splitlines()[0][:200] if str(error) else ""
        return InvalidRow(
            name,
            row,
            f"cannot be tokenized ({type(error).__name__}: {detail}); check its messages' roles and contents against "
            "the model's chat template.",
        )

    @torch.no_grad()
    def score_encoded(self, rows: Sequence[EncodedRow]) -> dict[str, torch.Tensor]:
        """`score` of rows from `encode_rows` (of one call or several: `trl-micro serve` scores requests together)."""
        if len(rows) == 0:
            raise ValueError("MiCRoReward got no rows to score.")
        if not self._prepared:
            self._place_without_accelerator()
        users = [row.user for row in rows]
        has_users = any(user is not None for user in users)
        user_weights, user_residuals = self.user_lookups(users if has_users else None)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))  # less padding per batch
        head_rewards, weights = [None] * len(rows), [None] * len(rows)
        residual_rewards = torch.zeros(len(rows))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            batch_users = [users[i] for i in batch] if has_users else None
            output = self._score_batch([(rows[i].ids, rows[i].prompt_length) for i in batch], batch_users, user_weights)
            for position, row in enumerate(batch):
                head_rewards[row] = output.head_rewards[position]
                weights[row] = output.mixture_weights[position]
            if user_residuals and batch_users is not None:
                residual_rewards[batch] = residual_corrections(batch_users, user_residuals, output.reward_features)
        head_rewards = torch.stack(head_rewards).float().cpu()
        weights = torch.stack(weights).float().cpu()
        scores = {
            "rewards": routed_reward(head_rewards, weights) + residual_rewards,
            "head_rewards": head_rewards,
            "mixture_weights": weights,
            "residual_rewards": residual_rewards,
            "online_routed": torch.tensor([user in user_weights for user in users], dtype=torch.bool),
            "has_residual": torch.tensor([user in user_residuals for user in users], dtype=torch.bool),
        }
        if has_users:
            self._warn_unknown_users(scores, users)
        return scores

    def rerank(
        self,
        prompts: Sequence[str | Messages],
        candidates: Sequence[Sequence[str | Messages]],
        users: Sequence[Sequence[str | int | None]] | None = None,
        contexts: Sequence[str | None] | None = None,
        feature_store=None,
    ):
        """
        Best of n per prompt and user: the index of each user's best candidate and every candidate's score, each
        candidate read by the backbone once however many users rank it ([`trl_micro.reranking.rerank`]).
        """
        from .reranking import rerank

        return rerank(self, prompts, candidates, users=users, contexts=contexts, feature_store=feature_store)

    @torch.no_grad()
    def comparison_margins(
        self,
        prompts: Sequence[str | Messages],
        chosen: Sequence[str | Messages],
        rejected: Sequence[str | Messages],
        contexts: Sequence[str | None] | None = None,
        allow_empty: bool = True,
    ) -> dict[str, Any]:
        """
        Per-head margins r_k(chosen) - r_k(rejected) of N comparisons, as Stage 2 updates a user with them:
        `head_margins` (N, K) on the CPU; `feature_keys`, the feature-store keys of each comparison's two sequences
        (`trl_micro.feature_cache.sequence_key`); and `readings`, the backbone's readings of the 2N sequences in the
        order of `sequence_keys` (what `FeatureStore.add` keeps, so that a rebuild on the same backbone runs none).
        Rows are checked and truncated by `encode_rows` (an [`InvalidRow`] names `chosen[i]` or `rejected[i]`).
        """
        if not (len(prompts) == len(chosen) == len(rejected)) or not prompts:
            raise ValueError(
                f"comparison_margins needs one prompt, chosen and rejected response per comparison, got {len(prompts)} "
                f"prompts, {len(chosen)} chosen and {len(rejected)} rejected."
            )
        pairs = [
            self.encode_rows(prompts, responses, contexts, allow_empty=allow_empty, completion_name=name)
            for name, responses in (("chosen", chosen), ("rejected", rejected))
        ]
        if not self._prepared:
            self._place_without_accelerator()
        model = extract_model_from_parallel(self.model)
        encoded = [(row.ids, row.prompt_length) for pair in zip(*pairs) for row in pair]
        keys = [sequence_key(ids, prompt_length) for ids, prompt_length in encoded]
        readings = compute_sequence_readings(model, encoded, self.batch_size, self.device, progress=False)
        reward_features, router_features = model.features_from_readings(readings)
        heads = model.score_features(reward_features, router_features, None).head_rewards.double().cpu()
        return {
            "head_margins": heads[0::2] - heads[1::2],
            "feature_keys": list(zip(keys[0::2], keys[1::2])),
            "sequence_keys": keys,
            "readings": readings,
        }

    def user_lookups(
        self, users: Sequence[str | None] | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """`({user: weights (K,)}, {user: residual})` of the users among `users` that the user state knows."""
        if users is None:
            return {}, {}
        if self.user_store is not None:
            return self.user_store.lookup(users)
        distinct = {user for user in users if user is not None}
        weights, residuals = {}, {}
        if self.online_router is not None:
            weights = {user: self.online_router.weights(user) for user in distinct if user in self.online_router}
        if self.residual_heads is not None:
            residuals = {user: self.residual_heads.residual(user) for user in distinct if user in self.residual_heads}
        return weights, residuals

    def _score_batch(
        self,
        encoded: list[tuple[list[int], int]],
        users: list[str | None] | None,
        user_weights: dict[str, torch.Tensor] | None = None,
    ):
        device = self.device
        input_ids = pad_right([ids for ids, _ in encoded], self.tokenizer.pad_token_id).to(device)
        attention_mask = pad_right([[1] * len(ids) for ids, _ in encoded], 0).to(device)
        prompt_lengths = torch.tensor([length for _, length in encoded], device=device)
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=prompt_lengths)
        if users is None or not user_weights or not any(user in user_weights for user in users):
            return output
        weights = output.mixture_weights.clone()
        for row, user in enumerate(users):
            if user in user_weights:
                weights[row] = user_weights[user].to(weights)
        # Same features, the online users' weights instead of the router's: no second backbone pass.
        return self.model(
            reward_features=output.reward_features, router_features=output.router_features, mixture_weights=weights
        )

    def encode(
        self, prompt: str | Messages, completion: str | Messages, context: str | None = None
    ) -> tuple[list[int], int]:
        """(token ids, prompt length) of one row as this reward scores it: the context joined to the prompt as in
        training, the sequence truncated to `max_length` (see the module docstring)."""
        return self._encode(
            join_context(prompt, context, self.config.context_template, skip_if_present=True), completion
        )

    def _encode(self, prompt: str | Messages, completion: str | Messages) -> tuple[list[int], int]:
        if self.max_chars is not None:
            prompt, completion = cut_text(prompt, self.max_chars, keep_end=True), cut_text(completion, self.max_chars)
        ids, prompt_length = encode_prompt_completion(self.tokenizer, prompt, completion)
        if self.max_length is None or len(ids) <= self.max_length:
            return ids, prompt_length
        return truncate_completion(ids, prompt_length, self.max_length, self._ending(isinstance(prompt, list)))

    def _ending(self, conversational: bool) -> list[int]:
        return self.config.completion_end_ids or completion_end_token_ids(self.tokenizer, conversational) or []

    @staticmethod
    def _column(columns: dict[str, Any], name: str | None, num_rows: int) -> list | None:
        if name is None:
            return None
        if name not in columns:
            raise ValueError(
                f"MiCRoReward reads the column {name!r}, which the dataset does not have (its other columns: "
                f"{sorted(columns)}). Add it, name the right one, or pass `context_column=None` / `user_column=None`."
            )
        values = list(columns[name])
        if len(values) != num_rows:
            raise ValueError(f"The column {name!r} has {len(values)} values for {num_rows} completions.")
        return values

    # -------------------------------------------------------------------------------------------------- logging
    def _unknown_user_rows(
        self, scores: dict[str, torch.Tensor], users: Sequence[str | None]
    ) -> dict[str, tuple[list[str | None], str]]:
        """`{metric: (users of the rows a store did not know, what happened to them)}` for each store in use."""
        routing = self.user_store if self.user_store is not None else self.online_router
        residuals = self.residual_heads
        if self.user_store is not None and self.user_store.store.settings.hidden_size is not None:
            residuals = self.user_store  # a store that holds residual heads
        found = {}
        for metric, store in zip(UNKNOWN_USER_METRICS, (routing, residuals)):
            if store is not None:
                known = scores[UNKNOWN_USER_METRICS[metric][0]].tolist()
                missing = [user for user, is_known in zip(users, known) if not is_known]
                found[metric] = (missing, f"the {type(store).__name__} does not know")
        return found

    def _warn_unknown_users(self, scores: dict[str, torch.Tensor], users: Sequence[str | None]) -> None:
        """Warn about rows whose user a store does not know: once a minute at most per metric, ids cut short."""
        for metric, (missing, unknown) in self._unknown_user_rows(scores, users).items():
            missing = [user for user in missing if user is not None]
            if not missing:
                continue
            example, consequence = missing[0][:LOGGED_ID_CHARS], UNKNOWN_USER_METRICS[metric][1]
            self._unknown_user_warnings[metric].warn(
                len(missing),
                lambda count, n=len(missing), example=example, unknown=unknown, consequence=consequence, metric=metric: (
                    f"MiCRoReward: {n} of {len(users)} rows have a user that {unknown} (e.g. {example!r}), so they "
                    f"are {consequence}. Counted in `{metric}`; {count} such rows since the last warning, which "
                    f"repeats at most every {WARNING_INTERVAL_S:.0f} s."
                ),
            )

    def _log_metrics(self, log_metric, scores: dict[str, torch.Tensor], groups: list | None) -> None:
        for k in range(scores["head_rewards"].shape[1]):
            log_metric(f"micro/head_reward/{k}", scores["head_rewards"][:, k].mean().item())
            log_metric(f"micro/head_weight/{k}", scores["mixture_weights"][:, k].mean().item())
        if self.residual_heads is not None:
            log_metric("micro/residual_reward", scores["residual_rewards"].mean().item())
        if groups is None:
            return
        rewards_of_group: dict[str, list[float]] = {}
        for group, reward in zip(groups, scores["rewards"].tolist()):
            label = self._group_label(group)
            if label is not None:
                rewards_of_group.setdefault(label, []).append(reward)
        for label, rewards in rewards_of_group.items():
            log_metric(f"micro/reward/{label}", sum(rewards) / len(rewards))

    def _group_label(self, group) -> str | None:
        key = "none" if group is None else str(group)
        if key not in self._logged_groups:
            if len(self._logged_groups) >= self.max_logged_groups:
                return None
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_")[:40] or "group"
            self._logged_groups[key] = (
                slug if slug not in self._logged_groups.values() else f"{slug}_{len(self._logged_groups)}"
            )
        return self._logged_groups[key]


UNKNOWN_USER_METRICS = {
    "micro/fallback_rows": ("online_routed", "routed by the model's own router"),
    "micro/rows_without_residual": ("has_residual", "scored without a residual head"),
}


def longest_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most characters one token of `tokenizer` stands for (its longest vocabulary entry, added tokens included):
    a text of n characters has at least n / this many tokens."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max((len(token) for token in tokens if token is not None), default=1)


def residual_corrections(
    users: Sequence[str | None], residuals: dict[str, torch.Tensor], reward_features: torch.Tensor
) -> torch.Tensor:
    """u_user . h(x, y) `(N,)` on the CPU, float32, of rows with reward features `(N, hidden)`; 0 for rows without."""
    stacked = torch.zeros(len(users), reward_features.shape[-1], dtype=torch.float64)
    for row, user in enumerate(users):
        if user in residuals:
            stacked[row] = residuals[user]
    return (reward_features.detach().double().cpu() * stacked).sum(dim=-1).float()


def truncate_completion(
    ids: list[int], prompt_length: int, max_length: int, ending: list[int]
) -> tuple[list[int], int]:
    """
    Fit `ids` into `max_length` keeping the prompt and the `ending` (so the reward is read where training read it):
    the completion loses its tail; a prompt that does not fit with one completion token and the ending loses its
    beginning.
    """
    ending = ending if ids[len(ids) - len(ending) :] == ending else []
    room_for_prompt = max_length - len(ending) - 1
    if room_for_prompt < 1:
        raise ValueError(f"max_length={max_length} leaves no room for a prompt, a completion and its ending.")
    if prompt_length > room_for_prompt:
        dropped = prompt_length - room_for_prompt
        _PROMPT_CUTS.warn(
            1,
            lambda count: (
                f"A prompt of {prompt_length} tokens does not fit max_length={max_length}: its first {dropped} "
                f"tokens are dropped ({count} prompts cut since the last warning, which repeats at most every "
                f"{WARNING_INTERVAL_S:.0f} s)."
            ),
        )
        ids, prompt_length = ids[prompt_length - room_for_prompt :], room_for_prompt
    completion = ids[prompt_length : len(ids) - len(ending)]
    kept = max_length - prompt_length - len(ending)
    return ids[:prompt_length] + completion[:kept] + ending, prompt_length
