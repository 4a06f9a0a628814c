"""The per-sequence feature store: the backbone's features, each distinct sequence computed once, checked on read."""

import multiprocessing
import os

import pytest
import torch
from datasets import Dataset

from trl_micro.data_utils import tokenize_pairs
from trl_micro.feature_cache import FeatureStore, compute_sequence_features, pair_features, pair_sequences
from trl_micro.testing_utils import build_tiny_micro_model

from .conftest import make_conflicting_pairs


def shared_response_pairs(num_prompts: int) -> Dataset:
    """Three responses per prompt, every pair of them, each in both orders (two raters): 6 pairs, 3 + 3 sequences."""
    rows = []
    for i in range(num_prompts):
        prompt = f"Question number {i}: how do I cook rice?\n"
        responses = ["Sure.", "Yes, done.", f"Here is a detailed answer number {i}."]
        for a in range(3):
            for b in range(3):
                if a != b:
                    rows.append({"prompt": prompt, "chosen": responses[a], "rejected": responses[b], "context": ""})
    return Dataset.from_list(rows)


def _tokenized(tokenizer, model, pairs: Dataset) -> Dataset:
    return tokenize_pairs(pairs, tokenizer, model.config.context_template, "context")


def _reference(model, sequences):
    """Every sequence through the backbone alone (batch of one): the features the store must give."""
    rows = [
        model.compute_features(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), torch.tensor([length]))
        for ids, length in sequences
    ]
    return torch.cat([reward for reward, _ in rows]), torch.cat([router for _, router in rows])


@pytest.fixture()
def model(tokenizer):
    return build_tiny_micro_model(tokenizer).eval()


def test_store_gives_the_backbones_features_computing_each_sequence_once(tokenizer, model, tmp_path):
    tokenized = _tokenized(tokenizer, model, shared_response_pairs(4))
    sequences = pair_sequences(tokenized)
    distinct = len({(tuple(ids), length) for ids, length in sequences})
    assert (distinct, len(sequences)) == (12, 48)  # each response appears in 4 of the 12 sequence slots of its prompt

    store = FeatureStore(model, tmp_path, segment_size=5)
    reward, router = store.features(sequences, batch_size=4)
    assert (store.num_computed, store.num_reused) == (distinct, 0)
    expected_reward, expected_router = _reference(model, sequences)
    torch.testing.assert_close(reward, expected_reward, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(router, expected_router, atol=1e-5, rtol=1e-5)
    assert len(store.segments()) == -(-distinct // 5)

    per_pair = compute_sequence_features(model, sequences, batch_size=4)  # what the per-pair cache computed
    torch.testing.assert_close(reward, per_pair[0], atol=1e-5, rtol=1e-5)

    again = FeatureStore(model, tmp_path)
    torch.testing.assert_close(again.features(sequences)[0], reward, atol=0, rtol=0)
    assert (again.num_computed, again.num_reused) == (0, distinct)


def test_pair_features_reuse_sequences_across_datasets_and_growth(tokenizer, model, tmp_path):
    pairs = shared_response_pairs(10)
    first = _tokenized(tokenizer, model, pairs.select(range(54)))
    features = pair_features(model, first, tmp_path)
    direct = pair_features(model, first, use_store=False)
    for name in features:
        torch.testing.assert_close(features[name], direct[name], atol=1e-5, rtol=1e-5)

    grown = _tokenized(tokenizer, model, pairs)  # 10 more pairs: only their new sequences run
    store = FeatureStore(model, tmp_path)
    store.features(pair_sequences(grown))
    new_sequences = {(tuple(ids), length) for ids, length in pair_sequences(grown)} - {
        (tuple(ids), length) for ids, length in pair_sequences(first)
    }
    assert store.num_computed == len(new_sequences) > 0

    other_model = build_tiny_micro_model(tokenizer, seed=1)  # another backbone: nothing shared
    assert FeatureStore(other_model, tmp_path).directory != store.directory


def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flipped":
        data[-7] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped", "nan"])
def test_damaged_segment_is_named_recomputed_and_replaced(tokenizer, model, tmp_path, how):
    sequences = pair_sequences(_tokenized(tokenizer, model, make_conflicting_pairs(8)))
    store = FeatureStore(model, tmp_path)
    reward, _ = store.features(sequences)
    (segment,) = store.segments()
    if how == "nan":
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(segment), "pt") as handle:
            metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
        tensors["mean"][0, 0] = float("nan")
        save_file(tensors, str(segment), metadata=metadata)
    else:
        _damage(segment, how)
    with pytest.warns(UserWarning, match=f"{segment}.*damaged"):
        again = store.features(sequences)[0]
    assert store.num_computed == len({(tuple(ids), length) for ids, length in sequences})
    torch.testing.assert_close(again, reward, atol=1e-6, rtol=1e-6)
    assert not segment.exists() and len(store.segments()) == 1
    torch.testing.assert_close(FeatureStore(model, tmp_path).features(sequences)[0], reward, atol=0, rtol=0)


def test_failed_or_non_finite_write_leaves_nothing_behind(tokenizer, model, tmp_path, monkeypatch):
    sequences = pair_sequences(_tokenized(tokenizer, model, make_conflicting_pairs(4)))
    store = FeatureStore(model, tmp_path)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("trl_micro.feature_cache.save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        store.features(sequences)
    assert os.listdir(store.directory) == []
    monkeypatch.undo()

    with torch.no_grad():
        next(model.backbone.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite features"):
        FeatureStore(model, tmp_path / "nan").features(sequences)


def _fill(root, corpus, rows, queue):
    from tests.conftest import make_conflicting_pairs as pairs_of
    from trl_micro.testing_utils import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(corpus)
    model = build_tiny_micro_model(tokenizer).eval()
    sequences = pair_sequences(_tokenized(tokenizer, model, pairs_of(40).select(rows)))
    store = FeatureStore(model, root, segment_size=3)
    store.features(sequences)
    queue.put(store.num_computed)


def test_two_writers_filling_one_store_lose_nothing(tmp_path):
    from tests.conftest import tokenizer_corpus

    corpus = tokenizer_corpus()
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    writers = [
        context.Process(target=_fill, args=(tmp_path, corpus, rows, queue)) for rows in (range(0, 30), range(10, 40))
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=300)
        assert writer.exitcode == 0
    assert sorted(queue.get() for _ in writers)[0] > 0

    from trl_micro.testing_utils import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(corpus)
    model = build_tiny_micro_model(tokenizer).eval()
    sequences = pair_sequences(_tokenized(tokenizer, model, make_conflicting_pairs(40)))
    store = FeatureStore(model, tmp_path)
    reward, router = store.features(sequences)
    assert store.num_computed == 0  # every sequence of both writers landed, whole
    assert not [name for name in os.listdir(store.directory) if name.endswith(".tmp")]
    expected_reward, expected_router = _reference(model, sequences)
    torch.testing.assert_close(reward, expected_reward, atol=1e-5, rtol=1e-5)
