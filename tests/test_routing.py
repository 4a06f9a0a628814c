"""Tests of the online per-context router (Hedge / Bayesian posterior over the reward heads) and its store."""

import json
import os
import time

import numpy as np
import pytest
import torch

from trl_micro.personalization.online_router import OnlineRouter

K = 4


def direct_posterior(prior, deltas, eta=1.0):
    """prior * prod_n sigmoid(delta_n) ** eta, normalized: the definition, computed naively."""
    weights = torch.as_tensor(prior, dtype=torch.float64) * torch.sigmoid(deltas.double()).pow(eta).prod(dim=0)
    return weights / weights.sum()


def random_prior(generator, num_heads=K):
    return torch.softmax(torch.randn(num_heads, generator=generator, dtype=torch.float64), dim=0)


def simulated_comparison(generator, followed_head, num_heads=K, scale=2.0):
    """Head margins of a random pair, oriented by a label the user draws from `followed_head`'s BT likelihood."""
    margins = scale * torch.randn(num_heads, generator=generator)
    prefers_first = torch.rand((), generator=generator) < torch.sigmoid(margins[followed_head])
    return margins if prefers_first else -margins


# ----------------------------------------------------------------------------------------------------------- posterior
@pytest.mark.parametrize("eta", [1.0, 0.3, 2.5])
def test_posterior_matches_direct_computation(eta):
    generator = torch.Generator().manual_seed(0)
    router = OnlineRouter(K, eta=eta)
    for user in range(5):
        prior = random_prior(generator)
        deltas = 1.5 * torch.randn(7, K, generator=generator)
        for delta in deltas[:3]:
            router.update(f"u{user}", delta, prior=prior)
        router.update(f"u{user}", deltas[3:].numpy(), prior=prior)  # a batch, as a numpy array
        expected = direct_posterior(prior, deltas, eta)
        torch.testing.assert_close(router.weights(f"u{user}", dtype=torch.float64), expected, rtol=1e-10, atol=1e-12)
        assert router.num_updates(f"u{user}") == 7


@pytest.mark.parametrize("forgetting", [1.0, 0.9, 0.5])
def test_batch_equals_sequential_updates(forgetting):
    generator = torch.Generator().manual_seed(1)
    prior = random_prior(generator)
    deltas = 3 * torch.randn(25, K, generator=generator)
    sequential = OnlineRouter(K, eta=0.7, forgetting=forgetting)
    batched = OnlineRouter(K, eta=0.7, forgetting=forgetting)
    for delta in deltas:
        sequential.update("u", delta.tolist(), prior=prior)  # a list
    batched.update("u", deltas, prior=prior)
    torch.testing.assert_close(
        batched.weights("u", dtype=torch.float64), sequential.weights("u", dtype=torch.float64), rtol=1e-9, atol=1e-12
    )
    assert batched.num_updates("u") == sequential.num_updates("u") == 25


def test_forgetting_matches_its_recursion():
    generator = torch.Generator().manual_seed(2)
    prior = random_prior(generator)
    deltas = torch.randn(6, K, generator=generator, dtype=torch.float64)
    gamma, eta = 0.8, 1.3
    log_weights = prior.log()
    for delta in deltas:
        log_weights = gamma * log_weights + (1 - gamma) * prior.log()
        log_weights = log_weights + eta * torch.nn.functional.logsigmoid(delta)
        log_weights = log_weights - torch.logsumexp(log_weights, dim=0)
    router = OnlineRouter(K, eta=eta, forgetting=gamma)
    router.update("u", deltas, prior=prior)
    torch.testing.assert_close(router.weights("u", dtype=torch.float64), log_weights.exp(), rtol=1e-10, atol=1e-12)


def test_update_many_groups_rows_by_user():
    generator = torch.Generator().manual_seed(3)
    user_ids = ["a", "b", "a", "c", "b", "a"]
    deltas = torch.randn(len(user_ids), K, generator=generator)
    priors = torch.softmax(torch.randn(len(user_ids), K, generator=generator), dim=1)
    router = OnlineRouter(K)
    router.update_many(user_ids, deltas, priors=priors)
    for user_id in "abc":
        rows = [i for i, u in enumerate(user_ids) if u == user_id]
        expected = direct_posterior(priors[rows[0]], deltas[rows])
        torch.testing.assert_close(router.weights(user_id, dtype=torch.float64), expected, rtol=1e-6, atol=1e-9)
    assert router.users() == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"\(6, 4\)"):
        router.update_many(user_ids, deltas[:5])


@pytest.mark.parametrize("seed", range(5))
def test_weight_moves_to_the_head_the_user_follows(seed):
    generator = torch.Generator().manual_seed(seed)
    router = OnlineRouter(K)
    for _ in range(20):
        router.update("user", simulated_comparison(generator, followed_head=2))
    weights = router.weights("user")
    assert int(weights.argmax()) == 2
    assert weights[2] > 0.5


def test_forgetting_follows_a_switching_user_faster():
    generator = torch.Generator().manual_seed(4)
    before = torch.stack([simulated_comparison(generator, followed_head=0, scale=3.0) for _ in range(60)])
    after = torch.stack([simulated_comparison(generator, followed_head=3, scale=3.0) for _ in range(10)])
    remembering, forgetting = OnlineRouter(K), OnlineRouter(K, forgetting=0.8)
    for router in (remembering, forgetting):
        router.update("user", before)
    assert int(remembering.weights("user").argmax()) == 0
    for router in (remembering, forgetting):
        router.update("user", after)
    assert forgetting.weights("user")[3] > remembering.weights("user")[3]
    assert int(forgetting.weights("user").argmax()) == 3
    assert int(remembering.weights("user").argmax()) == 0  # still stuck on the old head


def test_extreme_deltas_stay_finite():
    router = OnlineRouter(K, eta=3.0, forgetting=0.95)
    extreme = torch.tensor([[1e4, -1e4, 1e4, -1e4], [-1e4, -1e4, -1e4, -1e4], [1e4, 1e4, -1e4, 1e4]])
    for _ in range(500):
        router.update("u", extreme)
    weights = router.weights("u", dtype=torch.float64)
    assert torch.isfinite(weights).all() and torch.isfinite(router._states["u"].log_weights).all()
    assert abs(float(weights.sum()) - 1) < 1e-12
    assert int(weights.argmax()) == 0  # the only head that agrees with every label
    router.update("v", torch.full((K,), -1e4))  # every head is certain the label is wrong: no information
    torch.testing.assert_close(router.weights("v"), torch.full((K,), 1 / K))


# --------------------------------------------------------------------------------------------------- users and priors
def test_unknown_user_gets_its_prior():
    default = torch.tensor([0.1, 0.2, 0.3, 0.4])
    router = OnlineRouter(K, default_prior=default)
    assert "nobody" not in router and len(router) == 0
    torch.testing.assert_close(router.weights("nobody"), default)
    given = np.array([0.4, 0.3, 0.2, 0.1])
    torch.testing.assert_close(router.weights("nobody", prior=given), torch.tensor(given, dtype=torch.float32))
    torch.testing.assert_close(OnlineRouter(K).weights("nobody"), torch.full((K,), 0.25))
    assert router.num_updates("nobody") == 0
    assert "nobody" not in router


def test_prior_is_only_used_at_first_sight():
    router = OnlineRouter(K)
    first = torch.tensor([0.7, 0.1, 0.1, 0.1])
    router.update("u", torch.zeros(K) + 0.5, prior=first)  # equal deltas: evidence cancels, the prior remains
    torch.testing.assert_close(router.weights("u"), first)
    router.update("u", torch.zeros(K) + 0.5, prior=torch.tensor([0.1, 0.1, 0.1, 0.7]))
    torch.testing.assert_close(router.weights("u"), first)


def test_identical_responses_are_a_no_op():
    router = OnlineRouter(K, forgetting=0.5)
    assert torch.equal(router.update("u", torch.zeros(K)), torch.full((K,), 0.25))
    assert "u" not in router and router.num_updates("u") == 0
    router.update("u", [1.0, -1.0, 0.0, 2.0], prior=[0.1, 0.2, 0.3, 0.4])
    before = router.weights("u", dtype=torch.float64)
    router.update("u", torch.zeros(3, K))
    assert torch.equal(router.weights("u", dtype=torch.float64), before)
    assert router.num_updates("u") == 1
    mixed = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, -1.0, 0.5]])
    reference = OnlineRouter(K, forgetting=0.5)
    reference.update("u", [1.0, -1.0, 0.0, 2.0], prior=[0.1, 0.2, 0.3, 0.4])
    reference.update("u", mixed[1])
    router.update("u", mixed)
    torch.testing.assert_close(router.weights("u"), reference.weights("u"))
    assert router.num_updates("u") == 2


def test_reset_users_len_contains():
    router = OnlineRouter(K)
    router.update("a", torch.ones(K) * torch.arange(K))
    router.update("b", -torch.arange(K).float())
    assert len(router) == 2 and "a" in router and router.users() == ["a", "b"]
    router.reset("a")
    router.reset("never-seen")
    assert "a" not in router and router.users() == ["b"]
    torch.testing.assert_close(router.weights("a"), torch.full((K,), 0.25))


# ----------------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_heads": 0}, "num_heads"),
        ({"num_heads": 2.5}, "num_heads"),
        ({"num_heads": K, "eta": 0.0}, "eta"),
        ({"num_heads": K, "eta": float("inf")}, "eta"),
        ({"num_heads": K, "forgetting": 0.0}, "forgetting"),
        ({"num_heads": K, "forgetting": 1.5}, "forgetting"),
        ({"num_heads": K, "default_prior": [0.5, 0.5]}, "default_prior"),
        ({"num_heads": K, "default_prior": [1.0, 2.0, 3.0, 4.0]}, "default_prior"),
        ({"num_heads": K, "default_prior": [0.5, 0.5, 0.0, 0.0]}, "default_prior"),
        ({"num_heads": K, "model_fingerprint": 123}, "model_fingerprint"),
    ],
)
def test_invalid_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        OnlineRouter(**kwargs)


def test_invalid_updates():
    router = OnlineRouter(K)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        router.update("u", torch.zeros(3) + 1)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        router.update("u", torch.ones(2, 5))
    with pytest.raises(ValueError, match="finite"):
        router.update("u", [1.0, float("nan"), 0.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        router.update("u", torch.tensor([[1.0, 0.0, 0.0, 0.0], [float("inf"), 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="prior"):
        router.update("u", torch.ones(K), prior=torch.zeros(K) + 1.0)
    for bad_id in (7.0, True, None, b"7"):
        with pytest.raises(TypeError, match="`user_id` must be a str or an int"):
            router.update(bad_id, torch.ones(K))
    with pytest.raises(TypeError, match=r"`user_ids\[1\]` must be a str or an int"):
        router.update_many(["a", 2.5], torch.ones(2, K))
    assert len(router) == 0  # nothing was half-applied


def test_integer_and_string_ids_are_one_user():
    """The one id rule: 17, np.int64(17) and "17" name the same user everywhere (the store keys it "17")."""
    router = OnlineRouter(K)
    router.update(17, [2.0, -1.0, 0.5, 0.0])
    router.update_many([np.int64(17), "17", 18], torch.tensor([[1.0, 0.0, -2.0, 0.5]] * 3))
    assert router.users() == ["17", "18"] and router.num_updates("17") == 3 and router.num_updates(17) == 3
    assert 17 in router and np.int32(17) in router and "17" in router and None not in router
    torch.testing.assert_close(router.weights(np.int64(17)), router.weights("17"))
    reference = OnlineRouter(K)
    reference.update("17", torch.tensor([[2.0, -1.0, 0.5, 0.0], [1.0, 0.0, -2.0, 0.5], [1.0, 0.0, -2.0, 0.5]]))
    torch.testing.assert_close(router.weights("17"), reference.weights("17"))
    router.reset(17)
    assert "17" not in router


# ---------------------------------------------------------------------------------------------------------- persistence
def populated_router(num_users, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    router = OnlineRouter(K, **kwargs)
    deltas = 2 * torch.randn(num_users, 3, K, generator=generator)
    priors = torch.softmax(torch.randn(num_users, K, generator=generator), dim=1)
    for user in range(num_users):
        router.update(f"user-{user}", deltas[user, : 1 + user % 3], prior=priors[user])
    return router


def assert_same_router(loaded, original):
    assert (loaded.num_heads, loaded.eta, loaded.forgetting, loaded.model_fingerprint) == (
        original.num_heads,
        original.eta,
        original.forgetting,
        original.model_fingerprint,
    )
    assert loaded.users() == original.users()
    for user_id in original.users():
        assert loaded.num_updates(user_id) == original.num_updates(user_id)
        assert torch.equal(loaded._states[user_id].log_weights, original._states[user_id].log_weights)
        assert torch.equal(loaded._states[user_id].log_prior, original._states[user_id].log_prior)


def test_save_load_round_trip(tmp_path):
    router = populated_router(2000, eta=0.5, forgetting=0.9, default_prior=[0.1, 0.2, 0.3, 0.4], model_fingerprint="m1")
    path = tmp_path / "routing.json"
    router.save(path)
    loaded = OnlineRouter.load(path, expected_num_heads=K, expected_fingerprint="m1")
    assert_same_router(loaded, router)
    torch.testing.assert_close(loaded.default_prior, router.default_prior)
    # A loaded router keeps learning exactly as the original would.
    router.update("user-7", [1.0, 2.0, -3.0, 0.5])
    loaded.update("user-7", [1.0, 2.0, -3.0, 0.5])
    assert torch.equal(loaded.weights("user-7"), router.weights("user-7"))
    assert sorted(os.listdir(tmp_path)) == ["routing.json", "routing.json.lock"]  # the store and its writers' lock


def test_ten_thousand_users_save_and_load_quickly(tmp_path):
    router = OnlineRouter(K)
    router.update_many([f"user-{user}" for user in range(10_000)], torch.randn(10_000, K))
    path = tmp_path / "routing.json"
    start = time.perf_counter()
    router.save(path)
    loaded = OnlineRouter.load(path)
    elapsed = time.perf_counter() - start
    assert len(loaded) == 10_000
    assert elapsed < 5.0, f"save + load of 10k users took {elapsed:.2f}s"


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_crash_during_save_keeps_the_previous_store(tmp_path, monkeypatch, failing):
    path = tmp_path / "routing.json"
    old = populated_router(50, seed=2)
    old.save(path)
    new = populated_router(80, seed=3)

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, failing, crash)
    with pytest.raises(OSError, match="simulated crash"):
        new.save(path)
    monkeypatch.undo()
    assert_same_router(OnlineRouter.load(path), old)
    assert sorted(os.listdir(tmp_path)) == ["routing.json", "routing.json.lock"]  # no temporary file left behind


def test_truncated_or_corrupt_store_is_a_clear_error(tmp_path):
    path = tmp_path / "routing.json"
    populated_router(20).save(path)
    text = path.read_text()
    for broken in (text[: len(text) // 2], text[:-1], "", "\x00\xff garbage"):
        path.write_bytes(broken.encode("utf-8", errors="surrogatepass") if broken else b"")
        with pytest.raises(ValueError, match="corrupt or truncated") as error:
            OnlineRouter.load(path)
        assert str(path) in str(error.value)
    payload = json.loads(text)
    payload["users"]["user-3"]["log_weights"] = [0.0, 1.0]
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        OnlineRouter.load(path)
    path.write_text(json.dumps({"something": "else"}))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        OnlineRouter.load(path)


def test_unnormalized_weights_in_a_store_are_refused(tmp_path):
    path = tmp_path / "routing.json"
    populated_router(4).save(path)
    payload = json.loads(path.read_text())
    for field in ("log_weights", "log_prior"):
        edited = json.loads(json.dumps(payload))
        edited["users"]["user-2"][field] = [value + 0.5 for value in edited["users"]["user-2"][field]]  # sum e^0.5
        path.write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=rf"corrupt.*{field} of user 'user-2' are not normalized.*1\.6487"):
            OnlineRouter.load(path)


def test_store_of_another_model_is_refused(tmp_path):
    path = tmp_path / "routing.json"
    populated_router(5, model_fingerprint="model-a").save(path)
    with pytest.raises(ValueError, match=r"num_heads=4.*num_heads=8"):
        OnlineRouter.load(path, expected_num_heads=8)
    with pytest.raises(ValueError, match=r"'model-a'.*'model-b'"):
        OnlineRouter.load(path, expected_fingerprint="model-b")
    assert len(OnlineRouter.load(path, expected_num_heads=K, expected_fingerprint="model-a")) == 5


# -------------------------------------------------------------------------------------------------- several writers
def test_merge_replays_each_writers_comparisons_on_the_store(tmp_path):
    """
    Two writers load one store, each applies its own comparisons (to a shared user and to a user of its own), and both
    save with merge=True: the store ends as if every comparison had been applied in the order the writers saved,
    forgetting included; each writer then holds the merged store.
    """
    generator = torch.Generator().manual_seed(5)
    path = tmp_path / "routing.json"
    prior = random_prior(generator)
    first_deltas, a_deltas, b_deltas = (2 * torch.randn(n, K, generator=generator) for n in (3, 4, 5))
    start = OnlineRouter(K, forgetting=0.8)
    start.update("shared", first_deltas, prior=prior)
    start.save(path)
    writer_a, writer_b = OnlineRouter.load(path), OnlineRouter.load(path)
    writer_a.update("shared", a_deltas)
    writer_a.update("only-a", a_deltas[:2])
    writer_b.update("shared", b_deltas)
    writer_b.update("only-b", b_deltas[:3], prior=prior)
    writer_a.save(path, merge=True)
    writer_b.save(path, merge=True)

    sequential = OnlineRouter(K, forgetting=0.8)
    sequential.update("shared", torch.cat([first_deltas, a_deltas, b_deltas]), prior=prior)
    sequential.update("only-a", a_deltas[:2])
    sequential.update("only-b", b_deltas[:3], prior=prior)
    stored = OnlineRouter.load(path)
    assert sorted(stored.users()) == ["only-a", "only-b", "shared"]
    for user_id in stored.users():
        torch.testing.assert_close(
            stored.weights(user_id, dtype=torch.float64),
            sequential.weights(user_id, dtype=torch.float64),
            rtol=1e-10,
            atol=1e-12,
        )
        assert stored.num_updates(user_id) == sequential.num_updates(user_id)
    torch.testing.assert_close(stored._states["shared"].log_prior, sequential._states["shared"].log_prior)
    assert_same_router(writer_b, stored)  # the last writer holds the store
    assert sorted(writer_a.users()) == ["only-a", "shared"]  # the first one, the store as it saved it

    writer_a.reset("only-a")  # a reset is merged too: the user leaves the store
    writer_a.save(path, merge=True)
    assert sorted(OnlineRouter.load(path).users()) == ["only-b", "shared"]


def test_merge_refuses_a_store_of_other_settings_and_changes_nothing(tmp_path):
    path = tmp_path / "routing.json"
    populated_router(3, eta=0.5).save(path)
    before = path.read_bytes()
    router = OnlineRouter(K, eta=1.0)
    router.update("user-1", [1.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"Cannot merge into the routing store .* eta=0\.5, this one eta=1\.0"):
        router.save(path, merge=True)
    assert path.read_bytes() == before and router.num_updates("user-1") == 1
    fresh = tmp_path / "new" / "routing.json"  # a missing store is created
    router.save(fresh, merge=True)
    assert OnlineRouter.load(fresh).users() == ["user-1"]


def test_accepts_tensors_that_require_grad_and_other_dtypes():
    router = OnlineRouter(K)
    deltas = torch.randn(3, K, requires_grad=True)
    weights = router.update("u", deltas.to(torch.bfloat16), prior=torch.full((K,), 0.25, dtype=torch.float16))
    assert weights.dtype == torch.float32 and not weights.requires_grad
    router.update("u", np.arange(K, dtype=np.int64))
    assert router.num_updates("u") == 4
