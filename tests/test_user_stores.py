"""The per-user stores under concurrent writers (separate processes), and the one rule for user ids."""

import multiprocessing
import os

import numpy as np
import pytest
import torch

from trl_micro.personalization.online_router import OnlineRouter
from trl_micro.personalization.residual_heads import ResidualHeads
from trl_micro.value_checks import normalize_user_id

K, HIDDEN, UPDATES = 4, 8, 200


def comparison_deltas(seed: int, count: int = UPDATES) -> torch.Tensor:
    return 2 * torch.randn(count, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def write_router_updates(path: str, seed: int, own_user: str, reload_each_time: bool) -> None:
    """One writer: UPDATES comparisons of a shared user and of its own, each saved to the store with merge=True."""
    torch.set_num_threads(1)
    router = OnlineRouter(K)  # the store may not exist yet
    for delta in comparison_deltas(seed):
        if reload_each_time and os.path.exists(path):
            router = OnlineRouter.load(path)  # load -> update -> save, as a stateless service would
        router.update("shared", delta)
        router.update(own_user, delta)
        router.save(path, merge=True)


def write_residual_fits(path: str, seed: int, prefix: str, count: int) -> None:
    """One writer: `count` users of its own fitted and saved to the store with merge=True, one at a time."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(seed)
    residuals = ResidualHeads(HIDDEN, l2=1.0)
    for user in range(count):
        residuals.fit(f"{prefix}-{user}", torch.zeros(4), torch.randn(4, HIDDEN, generator=generator))
        residuals.save(path, merge=True)


def run_writers(target, arguments) -> None:
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=target, args=args) for args in arguments]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=600)
    assert [process.exitcode for process in processes] == [0] * len(processes)


@pytest.mark.slow
def test_two_processes_updating_one_routing_store_keep_all_updates(tmp_path):
    path = str(tmp_path / "routing.json")
    run_writers(write_router_updates, [(path, 1, "user-a", True), (path, 2, "user-b", False)])
    router = OnlineRouter.load(path)
    assert router.num_updates("shared") == 2 * UPDATES
    assert router.num_updates("user-a") == router.num_updates("user-b") == UPDATES
    # Without forgetting the posterior is the prior times every comparison's likelihood, in any order.
    for user, seeds in (("shared", (1, 2)), ("user-a", (1,)), ("user-b", (2,))):
        deltas = torch.cat([comparison_deltas(seed) for seed in seeds])
        log_weights = torch.nn.functional.logsigmoid(deltas).sum(dim=0)
        expected = (log_weights - torch.logsumexp(log_weights, dim=0)).exp()
        torch.testing.assert_close(router.weights(user, dtype=torch.float64), expected, rtol=1e-8, atol=1e-10)
    assert sorted(os.listdir(tmp_path)) == ["routing.json", "routing.json.lock"]


@pytest.mark.slow
def test_two_processes_fitting_into_one_residual_store_keep_all_users(tmp_path):
    path = str(tmp_path / "residuals.json")
    run_writers(write_residual_fits, [(path, 1, "a", 50), (path, 2, "b", 50)])
    users = ResidualHeads.load(path).users()
    assert sorted(users) == sorted([f"a-{user}" for user in range(50)] + [f"b-{user}" for user in range(50)])
    assert sorted(os.listdir(tmp_path)) == ["residuals.json", "residuals.json.lock"]


def test_a_plain_save_over_another_writers_changes_is_refused_not_silent(tmp_path):
    """Two writers of one store with plain `save`: the second is refused naming merge=True, and nothing is lost."""
    path = tmp_path / "routing.json"
    OnlineRouter(K).save(path)
    first, second = OnlineRouter.load(path), OnlineRouter.load(path)
    first.update("alice", comparison_deltas(1, 3))
    first.save(path)
    first.update("alice", comparison_deltas(2, 1))
    first.save(path)  # its own store since its last save: fine
    second.update("bob", comparison_deltas(3, 2))
    with pytest.raises(ValueError, match=r"another writer .* merge=True"):
        second.save(path)
    assert OnlineRouter.load(path).num_updates("alice") == 4  # the refused save changed nothing
    second.save(path, merge=True)
    stored = OnlineRouter.load(path)
    assert stored.num_updates("alice") == 4 and stored.num_updates("bob") == 2
    OnlineRouter(K).save(path)  # a router that never read this store replaces it, as documented

    residual_path = tmp_path / "residuals.json"
    ResidualHeads(HIDDEN, l2=1.0).save(residual_path)
    one, other = ResidualHeads.load(residual_path), ResidualHeads.load(residual_path)
    one.fit("alice", torch.zeros(4), torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(0)))
    one.save(residual_path)
    other.fit("bob", torch.zeros(4), torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match=r"residual-head store .* another writer .* merge=True"):
        other.save(residual_path)
    other.save(residual_path, merge=True)
    assert sorted(ResidualHeads.load(residual_path).users()) == ["alice", "bob"]


@pytest.mark.parametrize(("user_id", "expected"), [("alice", "alice"), ("17", "17"), (17, "17"), (np.int64(-3), "-3")])
def test_ids_are_strings_or_integers(user_id, expected):
    assert normalize_user_id(user_id) == expected


@pytest.mark.parametrize("user_id", [17.0, np.float32(1.0), True, np.bool_(False), None, b"17", ("a",)])
def test_other_ids_are_refused_with_the_field_named(user_id):
    with pytest.raises(TypeError, match=r"`context_id\[3\]` must be a str or an int"):
        normalize_user_id(user_id, "context_id[3]")
