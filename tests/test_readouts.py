"""
The readouts (`MiCRoConfig.reward_readout`, `reward_layer`, `router_readout`): what the heads and the router read of
the backbone's hidden states, on every path that scores (the slow path, the feature store, checkpoints in and out of
trl_micro, PPO).
"""

import json
import sys

import pytest
import torch

from trl_micro import MiCRoConfig, MiCRoRewardModel
from trl_micro.feature_cache import FeatureStore
from trl_micro.testing_utils import build_tiny_micro_model, tiny_backbone_config

from .rl_fixtures import save_untrained_micro
from .test_modeling import COMPLETIONS, PROMPTS, encode_batch
from .test_remote_code import SCORE_WITHOUT_TRL_MICRO, assert_scored_alike, run_checked

READOUTS = [
    {"reward_readout": "last", "router_readout": "last"},
    {"reward_readout": "mean", "router_readout": "mean"},
    {"reward_readout": "last_mean", "router_readout": "last"},
    {"reward_readout": "mean", "router_readout": "last", "reward_layer": 1},
    {"reward_readout": "last_mean", "router_readout": "mean", "reward_layer": 0},
]


def direct_features(model, ids, prompt_length):
    """h(x, y) and h(x) of one unpadded sequence, computed from its hidden states by hand."""
    config = model.config
    with torch.no_grad():
        outputs = model.backbone(input_ids=torch.tensor([ids]), output_hidden_states=True)
        if not config.backbone_is_causal:
            prompt_out = model.backbone(input_ids=torch.tensor([ids[:prompt_length]])).last_hidden_state[0]
        else:
            prompt_out = outputs.last_hidden_state[0, :prompt_length]
    layer = (
        outputs.last_hidden_state[0] if config.reward_layer is None else outputs.hidden_states[config.reward_layer][0]
    )
    parts = {"last": layer[-1], "mean": layer[prompt_length:].mean(dim=0)}
    reward = torch.cat([parts[name] for name in config.reward_readout.split("_")])
    router = prompt_out[-1] if config.router_readout == "last" else prompt_out.mean(dim=0)
    return reward, router


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("readout", READOUTS, ids=lambda r: "-".join(str(v) for v in r.values()))
def test_features_equal_a_direct_computation_for_every_padding_and_batch(tokenizer, kind, readout):
    model = build_tiny_micro_model(tokenizer, kind=kind, num_heads=3, **readout).eval()
    expected_size = 64 * (2 if readout["reward_readout"] == "last_mean" else 1)
    assert model.config.reward_feature_size == expected_size and model.heads.in_features == expected_size
    prompts, completions = PROMPTS + PROMPTS[:1], COMPLETIONS + COMPLETIONS[1:]
    # BERT's absolute positions count the left padding: only decoders with rotary positions read left-padded rows alike
    for padding_side in ("right", "left") if kind == "llama" else ("right",):
        input_ids, attention_mask, prompt_lengths = encode_batch(tokenizer, prompts, completions, padding_side)
        with torch.no_grad():
            reward, router = model.compute_features(input_ids, attention_mask, prompt_lengths)
            # and in another batch: each row alone
            for row in range(len(prompts)):
                ids = input_ids[row][attention_mask[row].bool()].tolist()
                want_reward, want_router = direct_features(model, ids, int(prompt_lengths[row]))
                torch.testing.assert_close(reward[row], want_reward, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(router[row], want_router, rtol=1e-4, atol=1e-5)
                alone = model.compute_features(torch.tensor([ids]), None, prompt_lengths[row : row + 1])
                torch.testing.assert_close(alone[0][0], reward[row], rtol=1e-4, atol=1e-5)
    assert reward.dtype == torch.float32 and reward.shape == (3, expected_size) and router.shape == (3, 64)


def test_readouts_read_different_things(tokenizer):
    """Each readout is its own feature: the mean is not the last token, and a layer is not the output."""
    input_ids, attention_mask, prompt_lengths = encode_batch(tokenizer, PROMPTS, COMPLETIONS)
    features = {}
    for readout in READOUTS[:2] + READOUTS[3:4]:
        model = build_tiny_micro_model(tokenizer, **readout).eval()
        with torch.no_grad():
            features[str(readout)] = model.compute_features(input_ids, attention_mask, prompt_lengths)
    values = list(features.values())
    assert not torch.allclose(values[0][0], values[1][0]) and not torch.allclose(values[0][1], values[1][1])
    assert not torch.allclose(values[1][0], values[2][0])


def test_one_store_serves_every_pooling_and_keeps_layers_apart(tokenizer, tmp_path):
    """Models reading one backbone's layer differently share its store (each gets its own readout's features); another
    layer has a store of its own."""
    sequences = [(encode_batch(tokenizer, PROMPTS[:1], COMPLETIONS[:1])[0][0].tolist(), 5)]
    directories = []
    for readout in READOUTS:
        model = build_tiny_micro_model(tokenizer, **readout).eval()
        store = FeatureStore(model, tmp_path)
        reward, router = store.features(sequences)
        with torch.no_grad():
            want = model.compute_features(torch.tensor(sequences[0][:1]), None, torch.tensor([5]))
        torch.testing.assert_close(reward, want[0])
        torch.testing.assert_close(router, want[1])
        computed = store.num_computed
        assert computed == (0 if store.directory in directories else 1)  # the first model of a layer computes
        directories.append(store.directory)
    assert len(set(directories)) == 3  # the output, layer 1 and layer 0


def test_bad_readouts_name_the_field(tokenizer):
    config = tiny_backbone_config(tokenizer)
    with pytest.raises(ValueError, match="reward_readout must be one of"):
        MiCRoConfig(text_config=config, reward_readout="first")
    with pytest.raises(ValueError, match="router_readout must be one of"):
        MiCRoConfig(text_config=config, router_readout="last_mean")
    with pytest.raises(ValueError, match="reward_layer=3 is out of range: the backbone has 2 layers"):
        MiCRoConfig(text_config=config, reward_layer=3)
    with pytest.raises(ValueError, match="reward_layer must be an integer"):
        MiCRoConfig(text_config=config, reward_layer="middle")


def test_a_checkpoint_with_a_readout_scores_the_same_in_and_out_of_trl_micro(tokenizer, tmp_path, no_trl_micro):  # noqa: F811
    readout = {"reward_readout": "mean", "router_readout": "mean", "reward_layer": 1}
    path = save_untrained_micro(tokenizer, tmp_path / "rm", **readout)
    saved = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert {key: saved[key] for key in readout} == readout
    model = MiCRoRewardModel.from_pretrained(path).eval()
    assert model.config.readout_name == "mean@layer1/mean"
    prompts = [[{"role": "user", "content": "Question number 3?"}]]
    result = run_checked(
        [sys.executable, "-c", SCORE_WITHOUT_TRL_MICRO, path, json.dumps(prompts), json.dumps(COMPLETIONS)],
        no_trl_micro,
        tmp_path,
    )
    remote = json.loads(result.stdout.split("RESULT", 1)[1])
    local = assert_scored_alike(model, remote)
    # the text path finds the prompt boundary itself and reads the same response tokens as the explicit lengths
    torch.testing.assert_close(local["by_text"].logits, local["by_lengths"].logits, rtol=1e-4, atol=1e-5)


def test_a_checkpoint_saved_before_readouts_loads_with_the_last_token(tokenizer, tmp_path):
    """config.json without the readout fields (older trl-micro): the heads read the last token, as they were trained."""
    model = build_tiny_micro_model(tokenizer, num_heads=2, reward_readout="last", router_readout="last").eval()
    model.save_pretrained(tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    config = json.loads(config_file.read_text())
    for key in ("reward_readout", "reward_layer", "router_readout"):
        del config[key]
    config_file.write_text(json.dumps(config))
    loaded = MiCRoRewardModel.from_pretrained(tmp_path / "old").eval()
    assert loaded.config.readout_name == "last@output/last"
    input_ids, attention_mask, prompt_lengths = encode_batch(tokenizer, PROMPTS, COMPLETIONS)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=prompt_lengths).logits
        got = loaded(input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=prompt_lengths).logits
    torch.testing.assert_close(got, expected)
