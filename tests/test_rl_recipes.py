"""The personalized RL recipes end to end on tiny models: one process, and two CPU processes under DeepSpeed ZeRO."""

import json
import socket
import subprocess
import sys

import pytest
import torch

from trl_micro import MiCRoReward, OnlineRouter, ResidualHeads

from .conftest import REPO_ROOT
from .rl_fixtures import CPU_FLAGS, TINY_GRPO_FLAGS, policy_path, prompt_dataset, save_untrained_micro  # noqa: F401

GRPO_RECIPE = str(REPO_ROOT / "recipes" / "grpo_personalized.py")
PPO_RECIPE = str(REPO_ROOT / "recipes" / "ppo_personalized.py")
ACCELERATE_CONFIGS = REPO_ROOT / "recipes" / "accelerate_configs"
GRPO_FLAGS = [*TINY_GRPO_FLAGS, "--lora_r", "4", "--lora_alpha", "8"]
PROBE_FLAGS = ["--probe_prompts", "1", "--probe_max_new_tokens", "6"]
PPO_FLAGS = [
    "--per_device_train_batch_size",
    "2",
    "--gradient_accumulation_steps",
    "1",
    "--num_mini_batches",
    "1",
    "--total_episodes",
    "8",
    "--response_length",
    "8",
    "--num_ppo_epochs",
    "1",
    "--num_sample_generations",
    "0",
    "--lora_r",
    "4",
    "--lora_alpha",
    "8",
    "--stop_token",
    "eos",
]


@pytest.fixture()
def run_inputs(tokenizer, policy_path, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.jsonl"
    with open(prompts, "w") as file:
        for row in prompt_dataset(6):
            file.write(json.dumps(row) + "\n")
    reward_path = save_untrained_micro(tokenizer, tmp_path / "rm")
    return ["--model_name_or_path", policy_path, "--reward_model_path", reward_path, "--prompt_dataset", str(prompts)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command, output_dir):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    return json.loads((output_dir / "personalized_rewards.json").read_text())


def run_recipe(launcher: list[str], recipe: str, output_dir, *flags: str) -> dict:
    """Run `recipe` with `flags` and `--output_dir`, launched by `launcher` (this interpreter, or `two_cpu_processes`);
    it must exit 0. Returns the rewards it logged."""
    return run([*launcher, recipe, *flags, "--output_dir", str(output_dir)], output_dir)


def run_under_zero3(recipe: str, flags: list[str], run_inputs: list[str], output_dir) -> dict:
    """`recipe` on the tiny run's inputs in two CPU processes under DeepSpeed ZeRO-3 (gloo)."""
    zero3 = two_cpu_processes("zero3.yaml")
    return run_recipe(zero3, recipe, output_dir, *run_inputs, *CPU_FLAGS, *flags, "--ddp_backend", "gloo")


def two_cpu_processes(zero_config):
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ACCELERATE_CONFIGS / zero_config),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
    ]


def test_rloo_recipe_logs_reward_per_context_and_probes(run_inputs, tmp_path):
    output_dir = tmp_path / "rloo"
    flags = ["--trainer", "rloo", *run_inputs, *CPU_FLAGS, *GRPO_FLAGS, *PROBE_FLAGS]
    logged = run_recipe([sys.executable], GRPO_RECIPE, output_dir, *flags)
    steps = [entry for entry in logged["log_history"] if "rewards/micro_reward/mean" in entry]
    assert len(steps) == 2 and any(key.startswith("micro/reward/") for key in steps[0])
    assert set(logged["probe"]["after"]) == {"short-reader", "long-reader"}
    assert (output_dir / "adapter_model.safetensors").exists()


def test_grpo_recipe_reads_per_user_stores(run_inputs, tmp_path):
    """The stores `trl-micro eval` saves drop into the recipe: the probe's rewards move by each user's residual."""
    reward_path = run_inputs[run_inputs.index("--reward_model_path") + 1]
    hidden = MiCRoReward.from_pretrained(reward_path).config.reward_feature_size
    router, residuals = OnlineRouter(num_heads=2), ResidualHeads(hidden, l2=0.01)
    generator = torch.Generator().manual_seed(0)
    for user in ("short-reader", "long-reader"):
        router.update(user, torch.tensor([[4.0, -4.0]]))
        residuals.fit(user, torch.zeros(4), 10 * torch.randn(4, hidden, generator=generator))
    router.save(tmp_path / "router.json")
    residuals.save(tmp_path / "residuals.json")
    flags = [*run_inputs, *CPU_FLAGS, *GRPO_FLAGS, "--max_steps", "1", *PROBE_FLAGS]
    plain = run_recipe([sys.executable], GRPO_RECIPE, tmp_path / "plain", *flags)
    stores = [
        "--user_column",
        "context_id",
        "--online_router",
        str(tmp_path / "router.json"),
        "--residual_heads",
        str(tmp_path / "residuals.json"),
    ]
    personal = run_recipe([sys.executable], GRPO_RECIPE, tmp_path / "personal", *flags, *stores)
    before = {"plain": plain["probe"]["before"], "personal": personal["probe"]["before"]}
    assert set(before["plain"]) == set(before["personal"]) == {"short-reader", "long-reader"}
    assert all(abs(before["personal"][user] - before["plain"][user]) > 1e-3 for user in before["plain"])
    logged = [entry for entry in personal["log_history"] if "rewards/micro_reward/mean" in entry]
    assert logged and all(entry["micro/residual_reward"] != 0 for entry in logged)
    assert not any("micro/residual_reward" in entry for entry in plain["log_history"])


@pytest.mark.slow
def test_grpo_recipe_under_zero3_on_two_cpu_processes(run_inputs, tmp_path):
    logged = run_under_zero3(GRPO_RECIPE, GRPO_FLAGS, run_inputs, tmp_path / "grpo-zero3")
    steps = [entry for entry in logged["log_history"] if "rewards/micro_reward/mean" in entry]
    assert len(steps) == 2
    groups = {key for entry in steps for key in entry if key.startswith("micro/reward/")}
    assert groups and groups <= {"micro/reward/short-reader", "micro/reward/long-reader"}


@pytest.mark.ppo
def test_ppo_recipe_trains_a_lora_policy_and_probes(run_inputs, tmp_path):
    output_dir = tmp_path / "ppo"
    logged = run_recipe([sys.executable], PPO_RECIPE, output_dir, *run_inputs, *CPU_FLAGS, *PPO_FLAGS, *PROBE_FLAGS)
    steps = [entry for entry in logged["log_history"] if "objective/scores" in entry]
    assert len(steps) == 4 and all(isinstance(entry["objective/scores"], float) for entry in steps)  # 8 episodes / 2
    assert set(logged["probe"]["before"]) == {"short-reader", "long-reader"}
    assert (output_dir / "adapter_model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.ppo
def test_ppo_recipe_under_zero3_on_two_cpu_processes(run_inputs, tmp_path):
    output_dir = tmp_path / "ppo-zero3"
    logged = run_under_zero3(PPO_RECIPE, PPO_FLAGS, run_inputs, output_dir)
    assert len([entry for entry in logged["log_history"] if "objective/scores" in entry]) == 2
    assert (output_dir / "adapter_model.safetensors").exists()
