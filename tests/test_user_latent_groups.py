"""Stage 1 with user ids (issue 42, part 1): `latent_groups="user"` gives all of a user's pairs one latent head."""

import pytest
import torch
from datasets import Dataset

from trl_micro import MiCRoRewardTrainer
from trl_micro.testing_utils import build_tiny_micro_model
from trl_micro.trainer.data_collator import user_latent_groups
from trl_micro.trainer.head_initialization import em_initial_heads

from .test_trainer import make_args

ANSWERS = {"short": "Sure.", "long": "Here is a detailed answer with every step explained.", "plain": "Ok."}
USERS = ["ann", "bob", None, "ann", "", "cat", "bob", "cat", None]  # None and "": no id


def user_pairs(num_prompts: int = 3) -> Dataset:
    """Pairs over several prompts with the user ids of `USERS` (in turn): a user's pairs have different prompts."""
    rows = []
    for i in range(num_prompts):
        prompt = f"Question number {i}: how do I cook rice?\n"
        for taste, other in (("short", "long"), ("long", "plain"), ("plain", "short")):
            rows.append({"prompt": prompt, "chosen": ANSWERS[taste], "rejected": ANSWERS[other]})
    return Dataset.from_list(rows).add_column("user_id", [USERS[row % len(USERS)] for row in range(len(rows))])


def expected_groups(dataset: Dataset) -> list[list[int]]:
    """Rows of each latent group, from the raw columns: one per user id, the others by prompt and chosen response."""
    keys = []
    for row in dataset:
        user = row["user_id"]
        keys.append(("user", str(user)) if user not in (None, "") else ("text", row["prompt"], row["chosen"]))
    return sorted(sorted(row for row, other in enumerate(keys) if other == key) for key in set(keys))


def test_user_latent_groups_numbers_users_and_falls_back_per_pair():
    fallback = [[1], [2], [3], [1], [3], [4], [5], [6], [9]]
    groups = user_latent_groups(["ann", "bob", None, "ann", "", 7, "bob", "7", None], fallback)
    # ann, bob, pair [3], ann, pair [3] again (same chosen sequence), 7 and "7" one user, bob, a new pair
    assert groups == [0, 1, 2, 0, 2, 3, 1, 3, 4]
    with pytest.raises(TypeError, match=r"rater\[1\]"):
        user_latent_groups(["ann", 1.5], [[1], [2]], column="rater")
    with pytest.raises(ValueError, match="2 user ids for 3 pairs"):
        user_latent_groups(["a", "b"], [[1], [2], [3]])


@pytest.mark.parametrize("use_feature_cache", [True, False])
def test_user_groups_are_the_trainers_latents_and_loss(tokenizer, tmp_path, use_feature_cache):
    data = user_pairs()
    model = build_tiny_micro_model(tokenizer, num_heads=3)
    args = make_args(
        tmp_path,
        num_heads=3,
        latent_groups="user",
        freeze_backbone=True,
        use_feature_cache=use_feature_cache,
        router_balance_coef=0.0,
        per_device_train_batch_size=4,
    )
    trainer = MiCRoRewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    groups = trainer.train_dataset["latent_group"]
    found = sorted(sorted(row for row, other in enumerate(groups) if other == group) for group in set(groups))
    assert found == expected_groups(data)

    # Every batch holds whole users, and its loss is the direct per-user mixture likelihood of the module docstring.
    loader = trainer.get_train_dataloader()
    model.eval()
    for batch in loader:
        rows = batch["latent_group"].tolist()
        assert all(rows.count(group) == groups.count(group) for group in set(rows))
        inputs = {name: value for name, value in batch.items()}
        loss = trainer.compute_loss(model, dict(inputs))
        features = {key: value for key, value in inputs.items() if key not in ("latent_group", "pair_num_tokens")}
        with torch.no_grad():
            out = model(**features)
        chosen, rejected = out.head_rewards.chunk(2)
        margins, weights = chosen - rejected, torch.softmax(out.router_logits.chunk(2)[0], -1)
        direct = []
        for group in sorted(set(rows)):
            members = [i for i, other in enumerate(rows) if other == group]
            log_likelihood = torch.nn.functional.logsigmoid(margins[members]).sum(0)
            mixed = torch.logsumexp(weights[members].mean(0).log() + log_likelihood, 0)
            direct.append(-mixed / len(members))
        torch.testing.assert_close(loss.detach(), torch.stack(direct).mean(), atol=1e-5, rtol=1e-5)


def test_the_em_start_fits_one_latent_head_per_user(tokenizer, tmp_path):
    data = user_pairs(4)
    model = build_tiny_micro_model(tokenizer, num_heads=2)
    args = make_args(tmp_path, latent_groups="user", freeze_backbone=True, head_init_restarts=2, head_init_l2=[1.0])
    trainer = MiCRoRewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer._initialize_heads()
    rows = torch.tensor(trainer.train_dataset["pair_index"])
    bank = trainer._feature_bank.features
    differences = (bank["chosen_reward"][rows] - bank["rejected_reward"][rows]).float()
    by_user = torch.tensor([group for group in trainer.train_dataset["latent_group"]])
    expected = em_initial_heads(differences, by_user, 2, restarts=2, l2=[1.0], seed=0, holdout=args.head_init_holdout)
    torch.testing.assert_close(model.heads.weight.detach(), expected.to(model.heads.weight))
    per_pair = em_initial_heads(differences, torch.arange(len(rows)), 2, restarts=2, l2=[1.0], seed=0,
                                holdout=args.head_init_holdout)  # fmt: skip
    assert not torch.allclose(expected, per_pair)  # the grouping changes the start


def test_user_grouping_needs_the_user_column(tokenizer, tmp_path):
    model = build_tiny_micro_model(tokenizer, num_heads=2)
    data = user_pairs().rename_column("user_id", "rater")
    with pytest.raises(ValueError, match="user column 'user_id'.*--user_column"):
        MiCRoRewardTrainer(
            model=model, args=make_args(tmp_path, latent_groups="user"), train_dataset=data, processing_class=tokenizer
        )
    trainer = MiCRoRewardTrainer(
        model=model,
        args=make_args(tmp_path, latent_groups="user", user_column="rater"),
        train_dataset=data,
        processing_class=tokenizer,
    )
    assert len(set(trainer.train_dataset["latent_group"])) == len(expected_groups(user_pairs()))
    with pytest.raises(ValueError, match="user_column"):
        make_args(tmp_path, latent_groups="user", user_column="")


def test_trl_micro_train_takes_the_user_column(tokenizer, tmp_path):
    from trl_micro.scripts.train import main, make_parser
    from trl_micro.testing_utils import save_tiny_backbone

    backbone = save_tiny_backbone(str(tmp_path / "backbone"), tokenizer)
    data_file = tmp_path / "pairs.jsonl"
    user_pairs(4).rename_column("user_id", "rater").to_json(data_file)
    argv = ["--model_name_or_path", backbone, "--dataset_name", str(data_file), "--output_dir", str(tmp_path / "rm")]
    argv += ["--num_heads", "2", "--latent_groups", "user", "--user_column", "rater", "--freeze_backbone"]
    argv += ["--num_train_epochs", "1", "--report_to", "none", "--save_strategy", "no", "--use_cpu"]
    argv += ["--feature_cache_dir", str(tmp_path / "cache"), "--model_card_pairs", "0"]
    script_args, training_args, model_args = make_parser().parse_args_and_config(argv)
    assert (training_args.latent_groups, training_args.user_column) == ("user", "rater")
    main(script_args, training_args, model_args)
    assert (tmp_path / "rm" / "config.json").exists()


def test_cached_pair_index_data_groups_by_user_and_trains_without_token_counts(tokenizer, tmp_path):
    """The benchmarks' path: a `pair_index` dataset over a feature bank, with a user column and no token counts."""
    from trl_micro.feature_cache import CachedFeatureCollator

    generator = torch.Generator().manual_seed(0)
    bank = CachedFeatureCollator()
    config = build_tiny_micro_model(tokenizer, num_heads=2).config
    sizes = {"chosen_reward": config.reward_feature_size, "rejected_reward": config.reward_feature_size}
    sizes["router"] = config.text_config.hidden_size
    bank.add({name: torch.randn(12, size, generator=generator) for name, size in sizes.items()})
    users = ["a", "b", "a", None, "c", "b", "a", "c", None, "b", "c", "a"]
    data = Dataset.from_dict({"pair_index": list(range(12)), "user_id": users})
    model = build_tiny_micro_model(tokenizer, num_heads=2)
    args = make_args(tmp_path, latent_groups="user", freeze_backbone=True, head_init="random", max_steps=3)
    trainer = MiCRoRewardTrainer(
        model=model, args=args, train_dataset=data, data_collator=bank, processing_class=tokenizer
    )
    assert trainer.train_dataset["latent_group"] == [0, 1, 0, 2, 3, 1, 0, 3, 4, 1, 3, 0]  # no id: a pair of its own
    trainer.train()
    assert trainer.state.global_step == 3
