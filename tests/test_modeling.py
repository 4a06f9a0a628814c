import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as hf_logging

import trl_micro  # noqa: F401  (registers the Auto classes)
from trl_micro import MiCRoConfig, MiCRoRewardModel
from trl_micro.data_utils import encode_prompt_completion, marker_token_ids
from trl_micro.modeling_micro import find_prompt_end
from trl_micro.testing_utils import build_tiny_micro_model, save_tiny_backbone


def encode_batch(tokenizer, prompts, completions, padding_side="right"):
    encoded = [encode_prompt_completion(tokenizer, p, c) for p, c in zip(prompts, completions)]
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), length), tokenizer.pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for row, (ids, _) in enumerate(encoded):
        span = slice(0, len(ids)) if padding_side == "right" else slice(length - len(ids), length)
        input_ids[row, span] = torch.tensor(ids)
        attention_mask[row, span] = 1
    prompt_lengths = torch.tensor([n for _, n in encoded])
    return input_ids, attention_mask, prompt_lengths


PROMPTS = ["Question number 1: how do I cook rice?\n", "Question number 22: how do I fix a bike?\n"]
COMPLETIONS = ["Sure.", "Here is a detailed answer that walks through every step carefully."]


@pytest.fixture()
def model(tokenizer):
    return build_tiny_micro_model(tokenizer, num_heads=3).eval()


def test_outputs_and_routed_reward(model, tokenizer):
    input_ids, attention_mask, prompt_lengths = encode_batch(tokenizer, PROMPTS, COMPLETIONS)
    out = model(input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=prompt_lengths)
    assert out.logits.shape == (2, 1) and out.head_rewards.shape == (2, 3) and out.router_logits.shape == (2, 3)
    weights = torch.softmax(out.router_logits, dim=-1)
    torch.testing.assert_close(out.logits[:, 0], (weights * out.head_rewards).sum(-1))
    torch.testing.assert_close(out.mixture_weights, weights)


def test_each_row_is_routed_by_its_own_prompt(model, tokenizer):
    input_ids, attention_mask, prompt_lengths = encode_batch(tokenizer, PROMPTS, COMPLETIONS)
    batch = model(input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=prompt_lengths)
    for row in range(2):
        alone = model(
            input_ids=input_ids[row : row + 1, : attention_mask[row].sum()],
            prompt_lengths=prompt_lengths[row : row + 1],
        )
        torch.testing.assert_close(alone.router_logits[0], batch.router_logits[row], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(alone.logits[0], batch.logits[row], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batch.router_logits[0], batch.router_logits[1])


def test_router_reads_the_prompt_only(model, tokenizer):
    a = encode_batch(tokenizer, PROMPTS[:1], COMPLETIONS[:1])
    b = encode_batch(tokenizer, PROMPTS[:1], COMPLETIONS[1:])
    out_a = model(input_ids=a[0], attention_mask=a[1], prompt_lengths=a[2])
    out_b = model(input_ids=b[0], attention_mask=b[1], prompt_lengths=b[2])
    torch.testing.assert_close(out_a.router_logits, out_b.router_logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out_a.head_rewards, out_b.head_rewards)


def test_left_and_right_padding_agree(model, tokenizer):
    right = encode_batch(tokenizer, PROMPTS, COMPLETIONS, "right")
    left = encode_batch(tokenizer, PROMPTS, COMPLETIONS, "left")
    out_right = model(input_ids=right[0], attention_mask=right[1], prompt_lengths=right[2])
    position_ids = (left[1].cumsum(1) - 1).clamp(min=0)
    out_left = model(input_ids=left[0], attention_mask=left[1], prompt_lengths=left[2], position_ids=position_ids)
    torch.testing.assert_close(out_left.logits, out_right.logits, rtol=1e-4, atol=1e-5)


def test_prompt_boundary_from_marker_matches_prompt_lengths(tokenizer):
    model = build_tiny_micro_model(tokenizer, num_heads=2).eval()
    marker = "<|im_start|>assistant\n"
    model.config.prompt_marker_ids = marker_token_ids(tokenizer, marker)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    completions = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    input_ids, attention_mask, prompt_lengths = encode_batch(tokenizer, prompts, completions)
    end = find_prompt_end(input_ids, attention_mask, model.config.prompt_marker_ids)
    torch.testing.assert_close(end, prompt_lengths - 1)
    with_lengths = model(input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=prompt_lengths)
    from_marker = model(input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(from_marker.logits, with_lengths.logits)


def test_missing_marker_falls_back_to_last_token_with_a_warning(model, tokenizer):
    input_ids, attention_mask, _ = encode_batch(tokenizer, PROMPTS, COMPLETIONS)
    with pytest.warns(UserWarning, match="no prompt boundary"):
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    last = attention_mask.sum(1) - 1
    full = model(input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=last + 1)
    torch.testing.assert_close(out.logits, full.logits)


def test_encoder_backbone_router_does_not_see_the_response(tokenizer):
    model = build_tiny_micro_model(tokenizer, kind="bert", num_heads=2).eval()
    assert model.config.backbone_is_causal is False
    a = encode_batch(tokenizer, PROMPTS[:1], COMPLETIONS[:1])
    b = encode_batch(tokenizer, PROMPTS[:1], COMPLETIONS[1:])
    out_a = model(input_ids=a[0], attention_mask=a[1], prompt_lengths=a[2])
    out_b = model(input_ids=b[0], attention_mask=b[1], prompt_lengths=b[2])
    torch.testing.assert_close(out_a.router_logits, out_b.router_logits, rtol=1e-4, atol=1e-5)


def test_mixture_weights_override(model, tokenizer):
    input_ids, attention_mask, prompt_lengths = encode_batch(tokenizer, PROMPTS, COMPLETIONS)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        prompt_lengths=prompt_lengths,
        mixture_weights=torch.tensor([0.0, 1.0, 0.0]),
    )
    torch.testing.assert_close(out.logits[:, 0], out.head_rewards[:, 1])
    with pytest.raises(ValueError, match="mixture_weights"):
        model(input_ids=input_ids, attention_mask=attention_mask, mixture_weights=torch.ones(2, 5))


def test_gradients_reach_heads_router_and_backbone(tokenizer):
    model = build_tiny_micro_model(tokenizer, num_heads=2)
    input_ids, attention_mask, prompt_lengths = encode_batch(tokenizer, PROMPTS, COMPLETIONS)
    model(input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=prompt_lengths).logits.sum().backward()
    for name in ("heads.weight", "router.weight", "backbone.layers.0.self_attn.q_proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_save_load_round_trip_and_auto_classes(model, tokenizer, tmp_path):
    input_ids, attention_mask, prompt_lengths = encode_batch(tokenizer, PROMPTS, COMPLETIONS)
    expected = model(input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=prompt_lengths)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    for loader in (MiCRoRewardModel, AutoModelForSequenceClassification, AutoModel):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, MiCRoRewardModel)
        got = loaded(input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=prompt_lengths)
        torch.testing.assert_close(got.logits, expected.logits)
        torch.testing.assert_close(got.head_rewards, expected.head_rewards)


def test_heads_stay_float32_under_bf16(model, tmp_path, tokenizer):
    model.save_pretrained(tmp_path)
    loaded = MiCRoRewardModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.backbone.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.heads.weight.dtype == torch.float32 and loaded.router.weight.dtype == torch.float32
    input_ids, attention_mask, prompt_lengths = encode_batch(tokenizer, PROMPTS, COMPLETIONS)
    out = loaded(input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=prompt_lengths)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()


@pytest.mark.parametrize("router_type", ["linear", "mlp", "static"])
def test_heads_and_router_stay_float32_when_the_model_is_cast(tokenizer, router_type):
    kwargs = {"use_router": False} if router_type == "static" else {"router_type": router_type}
    model = build_tiny_micro_model(tokenizer, num_heads=3, **kwargs).eval()
    input_ids, attention_mask, prompt_lengths = encode_batch(tokenizer, PROMPTS, COMPLETIONS)
    expected = model(input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=prompt_lengths).logits
    float32 = {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith("backbone.")}
    for cast, low in (
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.half(), torch.float16),
        (lambda m: m.to("cpu", dtype=torch.bfloat16), torch.bfloat16),
        (lambda m: m.bfloat16(), torch.bfloat16),
    ):
        model.float()
        assert cast(model) is model
        assert model.backbone.embed_tokens.weight.dtype == low
        for name, parameter in model.named_parameters():
            if not name.startswith("backbone."):  # float32, and not rounded through the low precision on the way
                assert parameter.dtype == torch.float32 and torch.equal(parameter, float32[name]), name
    model.to(torch.bfloat16)
    out = model(input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=prompt_lengths)
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, expected, rtol=0.1, atol=0.05)
    model.to(torch.float64)  # a cast up applies to every module
    assert model.heads.weight.dtype == torch.float64 and model.backbone.embed_tokens.weight.dtype == torch.float64


def test_from_pretrained_says_nothing_about_model_types(model, tmp_path):
    """Loading a MiCRo checkpoint printed transformers' "a model of type `micro` ... of type ``" warning every time."""
    model.save_pretrained(tmp_path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # whatever an earlier test (or script) set, warnings must get through here
    try:
        with CaptureLogger(hf_logging.get_logger("transformers")) as captured:
            MiCRoRewardModel.from_pretrained(tmp_path)
            hf_logging.get_logger("transformers.configuration_utils").warning("still captured")
    finally:
        hf_logging.set_verbosity(verbosity)
    assert "still captured" in captured.out and "to instantiate a model of type" not in captured.out


def test_missing_model_paths_are_named(tmp_path):
    missing = str(tmp_path / "no" / "such-model")
    with pytest.raises(ValueError, match="`model`: there is no model directory at .*such-model"):
        MiCRoRewardModel.from_pretrained(missing)
    with pytest.raises(ValueError, match="`backbone`: there is no model directory at .*such-model"):
        MiCRoRewardModel.from_backbone(missing)


def test_from_backbone_and_static_mixture(tokenizer, tmp_path):
    save_tiny_backbone(str(tmp_path), tokenizer)
    model = MiCRoRewardModel.from_backbone(str(tmp_path), num_heads=4, use_router=False)
    reference = AutoModel.from_pretrained(tmp_path)
    torch.testing.assert_close(model.backbone.embed_tokens.weight, reference.embed_tokens.weight)
    input_ids, attention_mask, prompt_lengths = encode_batch(tokenizer, PROMPTS, COMPLETIONS)
    out = model(input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=prompt_lengths)
    torch.testing.assert_close(out.mixture_weights, torch.full((2, 4), 0.25))


def test_bad_configs_and_mismatched_checkpoints(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="num_heads"):
        MiCRoConfig(text_config=model.config.text_config, num_heads=0)
    with pytest.raises(ValueError, match="router_type"):
        MiCRoConfig(text_config=model.config.text_config, router_type="attention")
    model.save_pretrained(tmp_path / "micro")
    with pytest.raises(ValueError, match="num_heads=3, but num_heads=5"):
        MiCRoRewardModel.from_pretrained(tmp_path / "micro", num_heads=5)
    other = build_tiny_micro_model(tokenizer, num_heads=3, hidden_size=32)
    with pytest.raises(ValueError, match="hidden_size"):
        MiCRoRewardModel.from_pretrained(tmp_path / "micro", config=other.config)
    save_tiny_backbone(str(tmp_path / "llama"), tokenizer)
    with pytest.raises(ValueError, match="not a MiCRo checkpoint"):
        MiCRoRewardModel.from_pretrained(tmp_path / "llama")


def test_router_reads_standardized_prompt_features(tokenizer):
    """n(h) = (h - mean) / std: the router's logits ignore the scale and offset of the prompt feature; off, they don't."""
    normalized = build_tiny_micro_model(tokenizer, num_heads=3).eval()
    features = torch.randn(4, 64) * 50 + 3
    rewards = torch.randn(4, normalized.config.reward_feature_size)
    raw = build_tiny_micro_model(tokenizer, num_heads=3, router_input_norm=False).eval()
    raw.router.load_state_dict(normalized.router.state_dict())
    with torch.no_grad():
        out = normalized(reward_features=rewards, router_features=features)
        rescaled = normalized(reward_features=rewards, router_features=features * 0.01 - 7)
        unnormalized = raw(reward_features=rewards, router_features=features)
        standardized = (features - features.mean(-1, keepdim=True)) / features.std(-1, unbiased=False, keepdim=True)
        expected = normalized.router(standardized)
    torch.testing.assert_close(out.router_logits, rescaled.router_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.router_logits, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(unnormalized.router_logits, raw.router(features))
    assert not torch.allclose(unnormalized.router_logits, out.router_logits)
