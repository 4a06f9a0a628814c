"""MiCRoReward inside TRL's GRPO and RLOO trainers, the by-path drop-in, and bad input."""

import logging

import numpy as np
import pytest
import torch
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

import trl_micro  # noqa: F401  (registers MiCRo with AutoModelForSequenceClassification)
from trl_micro.data_utils import join_context
from trl_micro.personalization.online_router import OnlineRouter
from trl_micro.personalization.residual_heads import ResidualHeads
from trl_micro.rewards import MiCRoReward, truncate_completion
from trl_micro.scripts.rl_utils import show_context_to_policy
from trl_micro.testing_utils import build_tiny_micro_model, save_tiny_backbone

from .conftest import CONTEXTS, STYLES
from .rl_fixtures import (  # noqa: F401
    CONTEXT_IDS,
    policy_path,
    prompt_dataset,
    reward_checkpoint,
    reward_with_eval_stores,
    save_untrained_micro,
)

SHORT, LONG = STYLES["short"][0], STYLES["long"][0]


def chat(role, text):
    return [{"role": role, "content": text}]


def rl_args(config_class, tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "rl"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    values.update(overrides)
    return config_class(**values)


# ----------------------------------------------------------------------------------------------------- routing
def test_trained_reward_ranks_completions_by_context(reward_checkpoint):
    reward = MiCRoReward.from_pretrained(reward_checkpoint)
    prompt = chat("user", "Question number 5: how do I cook rice?")
    completions = [chat("assistant", SHORT), chat("assistant", LONG)] * 2
    contexts = [CONTEXTS["short"]] * 2 + [CONTEXTS["long"]] * 2
    rewards = reward.score([prompt] * 4, completions, contexts=contexts)["rewards"]
    assert rewards[0] > rewards[1], "the short-answer reader should prefer the short answer"
    assert rewards[3] > rewards[2], "the long-answer reader should prefer the long answer"
    assert abs(rewards[0] - rewards[2]) > 1e-3


def test_reward_follows_the_heads_the_context_routes_to(tokenizer):
    """Two heads that disagree (r_1 = -r_0) and a router set by hand to send each context to its own head."""
    model = build_tiny_micro_model(tokenizer, num_heads=2, seed=1)
    reward = MiCRoReward(model, tokenizer)
    prompt, completion = chat("user", "Question number 1: how do I learn chess?"), chat("assistant", SHORT)
    contexts = [CONTEXTS["short"], CONTEXTS["long"]]
    encoded = [
        reward._encode(join_context(prompt, c, model.config.context_template, skip_if_present=True), completion)
        for c in contexts
    ]
    with torch.no_grad():
        model.heads.weight[1] = -model.heads.weight[0]
        router_inputs = model.router_input(reward._score_batch(encoded, None).router_features)
        direction = router_inputs[0] - router_inputs[1]
        model.router.weight.copy_(torch.stack([direction, -direction]) * 50 / direction.norm() ** 2)
        model.router.bias.zero_()
    scores = reward.score([prompt] * 2, [completion] * 2, contexts=contexts)
    assert scores["mixture_weights"][0, 0] > 0.9 and scores["mixture_weights"][1, 1] > 0.9
    assert torch.sign(scores["rewards"][0]) == -torch.sign(scores["rewards"][1]) != 0


def test_online_router_overrides_known_users_only(reward_checkpoint):
    reward = MiCRoReward.from_pretrained(
        reward_checkpoint, context_column=None, user_column="user", online_router=OnlineRouter(num_heads=2)
    )
    reward.online_router.update("alice", torch.tensor([[8.0, -8.0]] * 5))
    prompt, completion = chat("user", "Question number 2: how do I fix a bike?"), chat("assistant", SHORT)
    scores = reward.score([prompt] * 2, [completion] * 2, users=["alice", "bob"])
    assert scores["mixture_weights"][0, 0] > 0.99
    routed = reward.score([prompt], [completion])["mixture_weights"][0]
    torch.testing.assert_close(scores["mixture_weights"][1], routed)  # unknown user: the model's router
    torch.testing.assert_close(scores["rewards"][0], scores["head_rewards"][0] @ scores["mixture_weights"][0])


def test_residual_heads_correct_their_users_rewards_only(reward_checkpoint, tmp_path):
    hidden = MiCRoReward.from_pretrained(reward_checkpoint).config.reward_feature_size
    generator = torch.Generator().manual_seed(0)
    residuals = ResidualHeads(hidden, l2=0.1)
    residuals.fit("alice", torch.zeros(8), torch.randn(8, hidden, generator=generator))
    residuals.save(tmp_path / "residuals.json")
    reward = MiCRoReward.from_pretrained(
        reward_checkpoint, context_column=None, user_column="user", residual_heads=tmp_path / "residuals.json"
    )
    prompt, completion = chat("user", "Question number 3: how do I plant tulips?"), chat("assistant", LONG)
    scores = reward.score([prompt] * 2, [completion] * 2, users=["alice", "bob"])
    plain = reward.score([prompt], [completion])
    features = reward._score_batch([reward._encode(prompt, completion)], None).reward_features[0]
    correction = float(features.double() @ residuals.residual("alice"))
    assert abs(correction) > 1e-3
    torch.testing.assert_close(scores["residual_rewards"], torch.tensor([correction, 0.0]))
    torch.testing.assert_close(scores["rewards"], plain["rewards"].repeat(2) + torch.tensor([correction, 0.0]))
    torch.testing.assert_close(scores["mixture_weights"], plain["mixture_weights"].repeat(2, 1))


def test_integer_user_ids_find_the_stores_eval_writes(reward_checkpoint, tmp_path, caplog):
    """An int `context_id` column reaches stores keyed by str(context_id), as `trl-micro eval` saves them; rows of users
    the stores do not know are counted in the logged metrics and named in a warning."""
    hidden = MiCRoReward.from_pretrained(reward_checkpoint).config.reward_feature_size
    router = OnlineRouter(num_heads=2)
    router.update("17", torch.tensor([[8.0, -8.0]] * 5))
    router.save(tmp_path / "online_router.json")
    residuals = ResidualHeads(hidden, l2=0.1)
    residuals.fit("17", torch.zeros(8), torch.randn(8, hidden, generator=torch.Generator().manual_seed(0)))
    residuals.save(tmp_path / "residual_heads.json")
    reward = reward_with_eval_stores(reward_checkpoint, tmp_path, "context_id")
    prompt, completion = chat("user", "Question number 2: how do I fix a bike?"), chat("assistant", SHORT)
    logged = {}
    with caplog.at_level(logging.WARNING, logger="trl_micro"):
        rewards = reward(
            prompts=[prompt] * 3,
            completions=[completion] * 3,
            context_id=[17, np.int64(17), 99],
            log_metric=logged.__setitem__,
        )
    by_string = reward.score([prompt], [completion], users=["17"])
    assert rewards[0] == pytest.approx(by_string["rewards"][0].item(), abs=1e-5) and rewards[1] == rewards[0]
    assert by_string["online_routed"].tolist() == [True] and by_string["mixture_weights"][0, 0] > 0.99
    unknown = reward.score([prompt], [completion])["rewards"][0].item()  # routed by the model's router, no residual
    assert rewards[2] == pytest.approx(unknown, abs=1e-5) and abs(rewards[0] - unknown) > 1e-3
    assert logged["micro/fallback_rows"] == 1.0 and logged["micro/rows_without_residual"] == 1.0
    assert "1 of 3 rows have a user that the OnlineRouter does not know (e.g. '99'" in caplog.text
    with pytest.raises(TypeError, match=r"`context_id\[0\]` must be a str or an int"):
        reward(prompts=[prompt], completions=[completion], context_id=[17.0])


def test_residual_heads_of_another_backbone_or_without_users_are_refused(reward_checkpoint):
    hidden = MiCRoReward.from_pretrained(reward_checkpoint).config.reward_feature_size
    with pytest.raises(ValueError, match=f"hidden_size={hidden + 1}, the reward model's reward features {hidden}"):
        MiCRoReward.from_pretrained(reward_checkpoint, user_column="user", residual_heads=ResidualHeads(hidden + 1))
    with pytest.raises(ValueError, match="pass `user_column` too"):
        MiCRoReward.from_pretrained(reward_checkpoint, residual_heads=ResidualHeads(hidden))
    with pytest.raises(ValueError, match="pass `user_column` too"):
        MiCRoReward.from_pretrained(reward_checkpoint, online_router=OnlineRouter(num_heads=2))


def test_context_already_in_the_prompt_is_not_joined_twice(reward_checkpoint):
    reward = MiCRoReward.from_pretrained(reward_checkpoint)
    rows = show_context_to_policy(prompt_dataset(1), "context", reward.config.context_template)
    completions = [chat("assistant", SHORT)] * 2
    shown = reward.score(rows["prompt"], completions, contexts=rows["context"])["rewards"]
    joined = reward.score(prompt_dataset(1)["prompt"], completions, contexts=rows["context"])["rewards"]
    torch.testing.assert_close(shown, joined)


# ------------------------------------------------------------------------------------------------- trainers
@pytest.mark.parametrize("trainer_class, config_class", [(GRPOTrainer, GRPOConfig), (RLOOTrainer, RLOOConfig)])
def test_policy_trains_on_personalized_reward(
    trainer_class, config_class, tokenizer, reward_checkpoint, policy_path, tmp_path
):
    reward = MiCRoReward.from_pretrained(reward_checkpoint)
    trainer = trainer_class(
        model=policy_path,
        reward_funcs=[reward],
        args=rl_args(config_class, tmp_path),
        train_dataset=prompt_dataset(4),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    reward.prepare(trainer.accelerator)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "rewards/micro_reward/mean" in entry]
    assert len(logs) == 2
    for key in ("micro/head_reward/0", "micro/head_reward/1", "micro/head_weight/0", "micro/head_weight/1"):
        assert key in logs[0], key
    logged_groups = {key.split("/")[-1] for entry in logs for key in entry if key.startswith("micro/reward/")}
    assert logged_groups and logged_groups <= set(CONTEXT_IDS.values())
    assert logs[0]["micro/head_weight/0"] + logs[0]["micro/head_weight/1"] == pytest.approx(1.0, abs=1e-4)
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all("lora" in name for name in changed)


@pytest.mark.parametrize("conversational", [True, False])
def test_checkpoint_path_is_a_drop_in_reward_model(conversational, tokenizer, policy_path, tmp_path):
    """GRPOTrainer loading the path itself (full text, no EOS, right padding) gives MiCRoReward's rewards."""
    path = save_untrained_micro(tokenizer, tmp_path / "rm", conversational)
    reward = MiCRoReward.from_pretrained(path, context_column=None)
    trainer = GRPOTrainer(
        model=policy_path,
        reward_funcs=[path, reward],
        args=rl_args(GRPOConfig, tmp_path),
        train_dataset=prompt_dataset(1, conversational),
        processing_class=tokenizer,
    )
    assert type(trainer.reward_funcs[0]).__name__ == "MiCRoRewardModel"
    prompts, completions = [], []
    for i, text in enumerate([SHORT, LONG, "", "Ok"]):
        if conversational:
            prompts.append([{"role": "system", "content": CONTEXTS["long"]}, *chat("user", f"Question number {i}?")])
            completions.append(chat("assistant", text))
        else:
            prompts.append(f"{CONTEXTS['short']}\n\n\n\nHuman: Question number {i}?\n\nAssistant:")
            completions.append(f" {text}" if text else "")
    inputs = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    rewards = trainer._calculate_rewards(inputs, prompts, completions, [[0]] * len(prompts))
    torch.testing.assert_close(rewards[:, 0], rewards[:, 1], rtol=1e-4, atol=1e-5)
    assert rewards[:, 0].std() > 0


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_context_column_is_a_clear_error(reward_checkpoint):
    reward = MiCRoReward.from_pretrained(reward_checkpoint)
    with pytest.raises(ValueError, match="column 'context', which the dataset does not have"):
        reward(prompts=[chat("user", "Hi?")], completions=[chat("assistant", SHORT)], persona=["x"])
    routed_by_prompt = MiCRoReward.from_pretrained(reward_checkpoint, context_column=None)
    assert len(routed_by_prompt(prompts=[chat("user", "Hi?")], completions=[chat("assistant", SHORT)])) == 1


def test_none_contexts_and_empty_completions_are_scored(reward_checkpoint):
    reward = MiCRoReward.from_pretrained(reward_checkpoint)
    prompt = chat("user", "Question number 3: how do I cook rice?")
    rewards = reward(
        prompts=[prompt] * 3,
        completions=[chat("assistant", SHORT), chat("assistant", ""), chat("assistant", SHORT)],
        context=[None, CONTEXTS["short"], ""],
    )
    assert all(isinstance(value, float) for value in rewards)
    alone = reward.score([prompt], [chat("assistant", SHORT)])["rewards"][0]
    assert rewards[0] == pytest.approx(alone.item(), abs=1e-5) and rewards[2] == pytest.approx(alone.item(), abs=1e-5)


def test_overlong_completions_keep_prompt_and_ending(reward_checkpoint):
    reward = MiCRoReward.from_pretrained(reward_checkpoint, max_length=40)
    prompt = chat("user", "Question number 3: how do I cook rice?")
    ids, prompt_length = reward._encode(prompt, chat("assistant", LONG * 5))
    assert len(ids) == 40
    assert ids[-2:] == reward.config.completion_end_ids
    full_ids, full_prompt_length = reward._encode(prompt, chat("assistant", SHORT))
    assert prompt_length == full_prompt_length and ids[:prompt_length] == full_ids[:prompt_length]
    assert len(reward.score([prompt], [chat("assistant", LONG * 50)])["rewards"]) == 1
    kept, kept_prompt_length = truncate_completion(list(range(20)) + [7, 9], 15, 10, [7, 9])
    assert kept == list(range(8, 16)) + [7, 9] and kept_prompt_length == 7  # prompt tail, 1 completion token, ending
    with pytest.raises(ValueError, match="no room"):
        truncate_completion([1, 2, 3, 7, 9], 2, 3, [7, 9])


def test_non_micro_checkpoints_are_refused(tokenizer, tmp_path):
    path = save_tiny_backbone(str(tmp_path / "llama"), tokenizer)
    with pytest.raises(ValueError, match="'llama' checkpoint, not a MiCRo reward model"):
        MiCRoReward.from_pretrained(path)
    with pytest.raises(ValueError, match="not a model directory"):
        MiCRoReward.from_pretrained(str(tmp_path / "nothing-here"))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a PEFT adapter but no MiCRo config.json.*merge_and_unload"):
        MiCRoReward.from_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(TypeError, match="needs a MiCRoRewardModel"):
        MiCRoReward(torch.nn.Linear(2, 2), tokenizer)
    with pytest.raises(ValueError, match="names users for `user_store`.*pass one of them"):
        MiCRoReward(build_tiny_micro_model(tokenizer), tokenizer, user_column="user")


PROMPT, COMPLETION = chat("user", "Hi?"), chat("assistant", SHORT)
BAD_CALLS = {
    "None prompt": (
        dict(prompts=[PROMPT, None], completions=[COMPLETION] * 2),
        r"`prompts\[1\]` is NoneType None: every prompt and completion",
    ),
    "None completion": (dict(prompts=[PROMPT], completions=[None]), r"`completions\[0\]` is NoneType None"),
    "zero rows": (dict(prompts=[], completions=[]), "no rows: `prompts` and `completions` are empty"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_calls_name_the_field(reward_checkpoint, case):
    call, message = BAD_CALLS[case]
    with pytest.raises(ValueError, match=message):
        MiCRoReward.from_pretrained(reward_checkpoint, context_column=None)(**call)


@pytest.mark.parametrize("max_length", [0, -5, 2.5])
def test_max_length_must_be_a_positive_integer(reward_checkpoint, max_length):
    with pytest.raises(ValueError, match="`max_length` must be an integer >= 1"):
        MiCRoReward.from_pretrained(reward_checkpoint, max_length=max_length)


def test_logged_groups_are_capped(reward_checkpoint):
    reward = MiCRoReward.from_pretrained(reward_checkpoint, context_column=None, max_logged_groups=2)
    logged = {}
    prompt, completion = chat("user", "Hi?"), chat("assistant", SHORT)
    reward(
        prompts=[prompt] * 3,
        completions=[completion] * 3,
        context_id=["a", "b/c", "d"],
        log_metric=lambda name, value: logged.setdefault(name, value),
    )
    assert {"micro/reward/a", "micro/reward/b_c"} <= set(logged) and "micro/reward/d" not in logged
