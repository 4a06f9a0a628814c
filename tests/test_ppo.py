"""PPO (TRL 1.12 only: `make test-ppo`) with a MiCRo reward model, and the recipe's message on newer TRL."""

import subprocess
import sys
from importlib.util import find_spec

import pytest
import torch

from trl_micro.ppo_reward import MiCRoRewardForPPO
from trl_micro.rewards import MiCRoReward

from .conftest import CONTEXTS, REPO_ROOT, STYLES
from .rl_fixtures import save_untrained_micro

HAS_PPO = find_spec("trl.experimental.ppo") is not None
RECIPE = str(REPO_ROOT / "recipes" / "ppo_personalized.py")


@pytest.mark.skipif(HAS_PPO, reason="this TRL still has PPOTrainer")
def test_recipe_on_newer_trl_says_how_to_install_the_extra():
    result = subprocess.run([sys.executable, RECIPE, "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "pip install 'trl-micro[ppo]'" in result.stderr and "make .venv-ppo/.installed" in result.stderr


@pytest.mark.ppo
@pytest.mark.parametrize(
    "readout",
    [{}, {"reward_readout": "mean", "router_readout": "mean", "reward_layer": 1}, {"reward_readout": "last_mean"}],
    ids=["default", "mean-layer1-mean", "last_mean"],
)
def test_ppo_reads_the_routed_reward(tokenizer, tmp_path, readout):
    """TRL's get_reward on left-padded query + response (stopped at EOS, padded after) equals MiCRoReward, for every
    readout: a reward pooled over the response is still the one score PPO reads."""
    from trl.experimental.utils import get_reward

    path = save_untrained_micro(tokenizer, tmp_path / "rm", **readout)
    reward_model = MiCRoRewardForPPO.from_pretrained(path)
    scorer = MiCRoReward.from_pretrained(path, context_column=None)
    prompts = [
        [{"role": "system", "content": CONTEXTS["short"]}, {"role": "user", "content": "Question number 1?"}],
        [{"role": "user", "content": "Question number 22: how do I cook rice?"}],
    ]
    texts = [STYLES["short"][0], STYLES["long"][0]]
    queries = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, return_dict=True)["input_ids"] for p in prompts
    ]
    responses = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    pad = tokenizer.pad_token_id
    context_length = max(len(q) for q in queries)
    response_length = max(len(r) for r in responses) + 3
    rows = [
        [pad] * (context_length - len(q)) + q + r + [pad] * (response_length - len(r))
        for q, r in zip(queries, responses)
    ]
    _, ppo_rewards, _ = get_reward(reward_model, torch.tensor(rows), pad, context_length)
    expected = scorer.score(prompts, [[{"role": "assistant", "content": t}] for t in texts])["rewards"]
    torch.testing.assert_close(ppo_rewards, expected, rtol=1e-4, atol=1e-5)
