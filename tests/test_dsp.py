"""The DSP loader (trl-micro/dsp): pairs per domain context, split by query, reversals, wordings, bad files."""

import gzip
import json

import pytest

from trl_micro.bundled.catalog import load_named_dataset
from trl_micro.bundled.data_dir import resolve_data_dir
from trl_micro.bundled.dsp import (
    DOMAINS,
    DSP_FILE,
    HELD_OUT_WORDINGS,
    NORMAL,
    SEEN_WORDINGS,
    dsp_pairs,
    load_dsp,
    load_dsp_queries,
    split_queries,
)

from .conftest import skip_unless_strict


@pytest.fixture(scope="module")
def dsp():
    try:
        resolve_data_dir()
        return load_dsp(seed=0)
    except FileNotFoundError as error:
        skip_unless_strict(str(error))


def _write(tmp_path, items) -> None:
    path = tmp_path / DSP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        json.dump(items, handle)


def _item(query="Name a colour.", **overrides):
    responses = {style: f"A {style} answer to: {query}" for style in (*DOMAINS, NORMAL)}
    responses.update(overrides)
    return {"query": query, "responses": responses}


def test_splits_are_by_query_and_hold_every_pair_of_a_query(dsp):
    queries = {name: set(split["query_id"]) for name, split in dsp.items()}
    assert not queries["train"] & queries["adaptation"] and not queries["train"] & queries["test"]
    assert not queries["adaptation"] & queries["test"]
    assert queries["test_unseen_wordings"] == queries["test"]
    assert (
        650 < len(queries["train"]) + len(queries["adaptation"]) + len(queries["test"]) <= 661
    )  # a few lose every pair
    train = dsp["train"]
    per_query = {}
    for query, domain in zip(train["query_id"], train["context_id"]):
        per_query.setdefault(query, []).append(domain)
    full = [domains for domains in per_query.values() if len(domains) == 16]
    assert len(full) > 0.9 * len(per_query)  # 4 pairs per context; a few queries lose pairs with empty answers
    assert all(sorted(set(domains)) == sorted(DOMAINS) for domains in full)
    assert load_dsp(seed=1)["train"]["query_id"] != train["query_id"]  # the seed redraws the split


def test_any_two_domains_reverse_between_their_contexts(dsp):
    train = dsp["train"]
    labelled = {
        (query, row["chosen"][0]["content"], row["rejected"][0]["content"]): row["context_id"]
        for query, row in zip(train["query_id"], train)
    }
    reversals = [key for key in labelled if (key[0], key[2], key[1]) in labelled]
    assert len(reversals) > 0.7 * len(train)  # every domain-vs-domain pair appears in both orders
    query, chosen, rejected = reversals[0]
    assert labelled[(query, chosen, rejected)] != labelled[(query, rejected, chosen)]
    agreed = [row for row in train if row["agreed"]]
    assert agreed and all(row["rejected_style"] == NORMAL for row in agreed)
    assert not any(row["chosen_style"] == NORMAL for row in train)  # no context prefers the plain answer


def test_contexts_are_worded_and_some_wordings_are_held_out(dsp):
    seen = {wording for wordings in SEEN_WORDINGS.values() for wording in wordings}
    held_out = {wording for wordings in HELD_OUT_WORDINGS.values() for wording in wordings}
    assert not seen & held_out
    for split in ("train", "adaptation", "test"):
        assert set(dsp[split]["context"]) <= seen
    assert set(dsp["test_unseen_wordings"]["context"]) <= held_out
    for row in dsp["train"].select(range(20)):
        assert row["context"] in SEEN_WORDINGS[row["context_id"]]
        assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    assert set(load_named_dataset("trl-micro/dsp")) == {"train", "adaptation", "test", "test_unseen_wordings"}


def test_split_queries_is_seeded_and_checked():
    train, adaptation, test = split_queries(10, (0.6, 0.2, 0.2), seed=3)
    assert (len(train), len(adaptation), len(test)) == (6, 2, 2)
    assert sorted(train + adaptation + test) == list(range(10))
    assert split_queries(10, seed=3) == (train, adaptation, test)
    with pytest.raises(ValueError, match="summing to 1"):
        split_queries(10, (0.5, 0.2, 0.2))


def test_empty_and_identical_answers_are_skipped(tmp_path, caplog):
    items = [_item(), _item("Name a fruit.", normal=""), _item("Name a tree.", business="A academy answer to: x")]
    items[2]["responses"]["business"] = items[2]["responses"]["academy"]
    _write(tmp_path, items)
    loaded = load_dsp_queries(tmp_path)
    with caplog.at_level("INFO", logger="trl_micro.bundled.dsp"):
        pairs = dsp_pairs(loaded, [0, 1, 2])
    assert len(pairs) == 16 + (16 - 4) + (16 - 2)
    assert "empty answer" in caplog.text and "identical answers" in caplog.text


def test_missing_or_malformed_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="domain_specific_preference.test.json.gz"):
        load_dsp_queries(tmp_path)
    (tmp_path / DSP_FILE).parent.mkdir(parents=True)
    (tmp_path / DSP_FILE).write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not a gzipped JSON list"):
        load_dsp_queries(tmp_path)
    _write(tmp_path, [_item(), {"query": "x", "responses": {"academy": "a"}}])
    with pytest.raises(ValueError, match=r"item 1: `responses.business` is missing"):
        load_dsp_queries(tmp_path)
    _write(tmp_path, [{"responses": {}}])
    with pytest.raises(ValueError, match="item 0 has no non-empty text `query`"):
        load_dsp_queries(tmp_path)
