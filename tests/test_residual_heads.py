"""Tests of the per-context residual heads: the MAP fit, cross-validated lambda, scoring, the store and bad input."""

import json

import pytest
import torch

from trl_micro.personalization.residual_heads import ResidualHeads

HIDDEN = 16


def labelled_pairs(generator, direction, num_pairs, routed=None, scale=3.0):
    """
    Feature differences d_i of `num_pairs` random pairs, oriented so that the chosen response is the one the user
    prefers under BT with reward `direction . h`, and the routed margins of those pairs (`routed . d_i`, 0 if None).
    """
    deltas = torch.randn(num_pairs, HIDDEN, generator=generator, dtype=torch.float64)
    draws = torch.rand(num_pairs, generator=generator, dtype=torch.float64)
    prefers_first = draws < torch.sigmoid(scale * deltas @ direction)
    deltas = torch.where(prefers_first[:, None], deltas, -deltas)
    margins = torch.zeros(num_pairs, dtype=torch.float64) if routed is None else deltas @ routed
    return margins, deltas


def objective_gradient(margins, deltas, residual, l2):
    """Gradient of sum_i softplus(-(m_i + u . d_i)) + l2 ||u||^2, written out by hand."""
    return -(torch.sigmoid(-(margins + deltas @ residual))[:, None] * deltas).sum(dim=0) + 2 * l2 * residual


def unit(generator):
    vector = torch.randn(HIDDEN, generator=generator, dtype=torch.float64)
    return vector / vector.norm()


# ----------------------------------------------------------------------------------------------------------- fitting
@pytest.mark.parametrize("l2", [0.1, 1.0, 10.0])
def test_fit_is_the_map_estimate(l2):
    generator = torch.Generator().manual_seed(0)
    margins, deltas = labelled_pairs(generator, unit(generator), 24, routed=unit(generator))
    residuals = ResidualHeads(HIDDEN, l2=l2)
    residual = residuals.fit("alice", margins, deltas)
    gradient = objective_gradient(margins, deltas, residual, l2)
    assert gradient.abs().max() < 1e-6, "the fitted residual is not a stationary point of the convex objective"
    assert residual.norm() > 1e-3
    assert residuals.l2_of("alice") == l2 and residuals.num_pairs("alice") == 24


def test_residual_moves_a_context_the_routing_gets_wrong_toward_its_taste():
    generator = torch.Generator().manual_seed(1)
    taste = unit(generator)
    # Nearly noise-free labels; the routing mildly prefers the opposite of the user's taste.
    margins, deltas = labelled_pairs(generator, taste, 64, routed=-0.3 * taste, scale=20.0)
    test_margins, test_deltas = labelled_pairs(generator, taste, 400, routed=-0.3 * taste, scale=20.0)
    residuals = ResidualHeads(HIDDEN)
    residuals.fit("carol", margins, deltas)
    corrected = test_margins + residuals.rewards(["carol"] * 400, test_deltas).double()
    assert (test_margins > 0).double().mean() < 0.3
    assert (corrected > 0).double().mean() > 0.8


def test_cross_validation_keeps_a_right_routing_and_corrects_a_wrong_one():
    generator = torch.Generator().manual_seed(2)
    taste = unit(generator)
    residuals = ResidualHeads(HIDDEN)
    right = labelled_pairs(generator, taste, 32, routed=3.0 * taste)
    wrong = labelled_pairs(generator, taste, 32, routed=None)
    residuals.fit("right", *right)
    residuals.fit("wrong", *wrong)
    assert residuals.l2_of("right") > residuals.l2_of("wrong")
    assert residuals.residual("right").norm() < residuals.residual("wrong").norm()


def test_large_l2_means_no_correction_and_refits_are_deterministic():
    generator = torch.Generator().manual_seed(3)
    margins, deltas = labelled_pairs(generator, unit(generator), 16)
    assert ResidualHeads(HIDDEN, l2=1e8).fit("dave", margins, deltas).abs().max() < 1e-6
    residuals = ResidualHeads(HIDDEN)
    first = residuals.fit("dave", margins, deltas)
    torch.testing.assert_close(residuals.fit("dave", margins, deltas), first, rtol=0, atol=0)


def test_fit_many_fits_each_user_on_its_own_rows():
    generator = torch.Generator().manual_seed(8)
    alice, bob = labelled_pairs(generator, unit(generator), 8), labelled_pairs(generator, unit(generator), 6)
    users = ["alice", "bob"] * 6 + ["alice", "alice"]
    rows = {"alice": [0, 2, 4, 6, 8, 10, 12, 13], "bob": [1, 3, 5, 7, 9, 11]}
    margins, deltas = torch.zeros(14, dtype=torch.float64), torch.zeros(14, HIDDEN, dtype=torch.float64)
    for name, (user_margins, user_deltas) in (("alice", alice), ("bob", bob)):
        margins[rows[name]], deltas[rows[name]] = user_margins, user_deltas
    many = ResidualHeads(HIDDEN, l2=1.0)
    many.fit_many(users, margins, deltas)
    one = ResidualHeads(HIDDEN, l2=1.0)
    for name, pairs in (("alice", alice), ("bob", bob)):
        torch.testing.assert_close(many.residual(name), one.fit(name, *pairs))
    with pytest.raises(ValueError, match="13 user ids for 14 labelled pairs"):
        many.fit_many(users[:-1], margins, deltas)
    fresh = ResidualHeads(HIDDEN, l2=1.0)
    with pytest.raises(TypeError, match="must be a str"):
        fresh.fit_many(users[:-1] + [None], margins, deltas)
    assert len(fresh) == 0, "a bad id must stop the call before any user is fitted"


# ----------------------------------------------------------------------------------------------------------- scoring
def test_rewards_add_each_users_residual_and_nothing_for_the_others():
    generator = torch.Generator().manual_seed(4)
    residuals = ResidualHeads(HIDDEN, l2=1.0)
    residuals.fit("alice", *labelled_pairs(generator, unit(generator), 8))
    features = torch.randn(3, HIDDEN, generator=generator)
    rewards = residuals.rewards(["alice", "bob", None], features)
    assert rewards.dtype == torch.float32 and rewards.shape == (3,)
    torch.testing.assert_close(rewards[0], (features[0].double() @ residuals.residual("alice")).float())
    assert rewards[1] == 0 and rewards[2] == 0
    with pytest.raises(ValueError, match=r"reward_features.*\(3, 16\)"):
        residuals.rewards(["alice", "bob", None], features[:, :8])


def test_integer_and_string_ids_are_one_user():
    generator = torch.Generator().manual_seed(8)
    residuals = ResidualHeads(HIDDEN, l2=1.0)
    residuals.fit(17, *labelled_pairs(generator, unit(generator), 6))
    assert residuals.users() == ["17"] and 17 in residuals and "17" in residuals and None not in residuals
    features = torch.randn(3, HIDDEN, generator=generator)
    rewards = residuals.rewards([17, "17", None], features)
    assert rewards[0] != 0 and rewards[2] == 0
    torch.testing.assert_close(rewards[0], (features[0].double() @ residuals.residual("17")).float())
    torch.testing.assert_close(residuals.rewards(["17"], features[1:2])[0], rewards[1])
    with pytest.raises(TypeError, match=r"`user_ids\[1\]` must be a str or an int"):
        residuals.rewards(["17", 1.5, None], features)


# ------------------------------------------------------------------------------------------------------------- store
def test_save_and_load_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(5)
    residuals = ResidualHeads(HIDDEN, cv_folds=3, model_fingerprint="rm-1")
    for user in ("alice", "bob"):
        residuals.fit(user, *labelled_pairs(generator, unit(generator), 12))
    path = tmp_path / "residuals.json"
    residuals.save(path)
    loaded = ResidualHeads.load(path, expected_hidden_size=HIDDEN, expected_fingerprint="rm-1")
    assert loaded.users() == ["alice", "bob"] and loaded.cv_folds == 3 and loaded.l2 is None
    for user in ("alice", "bob"):
        torch.testing.assert_close(loaded.residual(user), residuals.residual(user), rtol=0, atol=0)
        assert loaded.l2_of(user) == residuals.l2_of(user) and loaded.num_pairs(user) == 12


def test_load_rejects_other_models_and_corrupt_files(tmp_path):
    generator = torch.Generator().manual_seed(6)
    residuals = ResidualHeads(HIDDEN, l2=1.0, model_fingerprint="rm-1")
    residuals.fit("alice", *labelled_pairs(generator, unit(generator), 4))
    path = tmp_path / "residuals.json"
    residuals.save(path)
    with pytest.raises(ValueError, match="hidden_size=16, but hidden_size=32"):
        ResidualHeads.load(path, expected_hidden_size=32)
    with pytest.raises(ValueError, match="model_fingerprint='rm-1', but model_fingerprint='rm-2'"):
        ResidualHeads.load(path, expected_fingerprint="rm-2")
    text = path.read_text()
    (tmp_path / "truncated.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        ResidualHeads.load(tmp_path / "truncated.json")
    payload = json.loads(text)
    payload["users"]["alice"]["residual"] = payload["users"]["alice"]["residual"][:-1]
    (tmp_path / "short.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="not 16 finite numbers"):
        ResidualHeads.load(tmp_path / "short.json")
    (tmp_path / "router.json").write_text(json.dumps({"format": "trl-micro-online-router"}))
    with pytest.raises(ValueError, match="not a trl-micro-residual-heads file"):
        ResidualHeads.load(tmp_path / "router.json")


def test_merge_keeps_every_writers_users(tmp_path):
    """Two writers of one store fit their own users and save with merge=True: the store keeps all of them."""
    generator = torch.Generator().manual_seed(9)
    path = tmp_path / "residuals.json"
    base = ResidualHeads(HIDDEN, l2=1.0, model_fingerprint="rm-1")
    base.fit("carol", *labelled_pairs(generator, unit(generator), 4))
    base.save(path)
    writer_a, writer_b = ResidualHeads.load(path), ResidualHeads.load(path)
    writer_a.fit("alice", *labelled_pairs(generator, unit(generator), 5))
    writer_b.fit("bob", *labelled_pairs(generator, unit(generator), 6))
    writer_b.fit("carol", *labelled_pairs(generator, unit(generator), 7))  # a refit replaces the stored residual
    writer_a.save(path, merge=True)
    writer_b.save(path, merge=True)
    stored = ResidualHeads.load(path)
    assert sorted(stored.users()) == ["alice", "bob", "carol"]
    for user_id, writer in (("alice", writer_a), ("bob", writer_b), ("carol", writer_b)):
        torch.testing.assert_close(stored.residual(user_id), writer.residual(user_id), rtol=0, atol=0)
    assert stored.num_pairs("carol") == 7 and sorted(writer_b.users()) == ["alice", "bob", "carol"]
    other = ResidualHeads(HIDDEN, l2=1.0, model_fingerprint="rm-2")
    other.fit("dave", *labelled_pairs(generator, unit(generator), 4))
    with pytest.raises(ValueError, match="Cannot merge into the residual-head store.*model_fingerprint='rm-1'"):
        other.save(path, merge=True)
    assert sorted(ResidualHeads.load(path).users()) == ["alice", "bob", "carol"]


# --------------------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_named_and_changes_nothing():
    generator = torch.Generator().manual_seed(7)
    margins, deltas = labelled_pairs(generator, unit(generator), 6)
    residuals = ResidualHeads(HIDDEN)
    residuals.fit("alice", margins, deltas)
    before = residuals.residual("alice")
    with pytest.raises(ValueError, match=r"feature_deltas.*\(6, 16\)"):
        residuals.fit("alice", margins, deltas[:, :4])
    with pytest.raises(ValueError, match=r"routed_margins.*\(N,\)"):
        residuals.fit("alice", margins[:0], deltas[:0])
    with pytest.raises(ValueError, match="must be finite"):
        residuals.fit("alice", margins.clone().fill_(float("nan")), deltas)
    with pytest.raises(ValueError, match="fewer than cv_folds=4.*fixed `l2`"):
        residuals.fit("alice", margins[:3], deltas[:3])
    for bad_id in (7.0, None, False):
        with pytest.raises(TypeError, match="`user_id` must be a str or an int"):
            residuals.fit(bad_id, margins, deltas)
    torch.testing.assert_close(residuals.residual("alice"), before, rtol=0, atol=0)
    with pytest.raises(KeyError, match="No residual head for user 'bob'"):
        residuals.residual("bob")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden_size": 0}, "hidden_size must be an integer >= 1"),
        ({"hidden_size": True}, "hidden_size must be an integer >= 1"),
        ({"hidden_size": HIDDEN, "l2": -1.0}, "l2 must be a finite number > 0"),
        ({"hidden_size": HIDDEN, "l2_grid": []}, "l2_grid must be a non-empty list"),
        ({"hidden_size": HIDDEN, "cv_folds": 1}, "cv_folds must be an integer >= 2"),
        ({"hidden_size": HIDDEN, "cv_folds": 4.0}, "cv_folds must be an integer >= 2"),
        ({"hidden_size": HIDDEN, "max_iter": 0}, "max_iter must be an integer >= 1"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResidualHeads(**kwargs)
