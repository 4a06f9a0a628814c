"""Loaders for the real preference data in ../shared/data (HH-RLHF and its helpful/harmless relabelling)."""

import gzip
import json
import logging
import os
from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset

from trl_micro.bundled.data_dir import DATA_DIR_ENV_VAR, resolve_data_dir
from trl_micro.bundled.hh import (
    ASSISTANT_MARKER,
    CONTEXT_TEXTS,
    HARMLESS_CONTEXT,
    HELPFUL_CONTEXT,
    HH_RELABELED_FILE,
    HH_RLHF_SPLITS,
    load_hh_relabeled,
    load_hh_rlhf,
    split_transcripts,
)
from trl_micro.splits import split_by_context, take_per_context

REPO_ROOT = Path(__file__).resolve().parent.parent
STANDARD_COLUMNS = {"prompt", "chosen", "rejected", "context_id", "context"}


def _data_dir() -> Path:
    from_env = os.environ.get(DATA_DIR_ENV_VAR)
    return Path(from_env) if from_env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    path = _data_dir()
    if not (path / HH_RELABELED_FILE).is_file() or not (path / "hh_rlhf").is_dir():
        pytest.fail(
            f"The real preference data is missing at {path} (set {DATA_DIR_ENV_VAR} or put it at "
            "<repo root>/../shared/data, with hh_relabeled/ and hh_rlhf/). These tests need it; CI has it."
        )
    return path


@pytest.fixture(scope="module")
def relabeled(data_dir) -> Dataset:
    return load_hh_relabeled(data_dir)


def _raw_lines(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _check_standard_format(dataset: Dataset) -> None:
    assert STANDARD_COLUMNS <= set(dataset.column_names)
    for row in dataset:
        assert row["prompt"].startswith("Human:")
        assert row["prompt"].endswith("\n\nAssistant:")
        assert row["chosen"].strip() and row["rejected"].strip()
        assert row["chosen"].strip() != row["rejected"].strip()
        assert "\n\nHuman:" not in row["chosen"] and ASSISTANT_MARKER not in row["chosen"]
        assert row["context"] == CONTEXT_TEXTS[row["context_id"]]


# ---------------------------------------------------------------------------------------------------------------------
# hh_relabeled
# ---------------------------------------------------------------------------------------------------------------------


def test_relabeled_schema_and_counts(relabeled):
    assert set(relabeled.column_names) == STANDARD_COLUMNS | {
        "data_subset",
        "original_label",
        "matches_original_label",
        "source_index",
    }
    counts = Counter(relabeled["context_id"])
    assert set(counts) == {"helpful", "harmless"}
    # 2,157 / 1,886 in the file, less the few pairs with empty or identical responses.
    assert 2140 <= counts["helpful"] <= 2157
    assert 1870 <= counts["harmless"] <= 1886
    assert len(set(relabeled["source_index"])) == len(relabeled)
    # About 41% of the objective labels differ from HH-RLHF's own.
    agreement = sum(relabeled["matches_original_label"]) / len(relabeled)
    assert 0.5 < agreement < 0.7


def test_relabeled_standard_format(relabeled):
    _check_standard_format(relabeled.select(range(0, len(relabeled), 7)))
    assert relabeled.filter(lambda row: row["context_id"] == "helpful")[0]["context"] == HELPFUL_CONTEXT
    assert relabeled.filter(lambda row: row["context_id"] == "harmless")[0]["context"] == HARMLESS_CONTEXT


def test_relabeled_prompt_plus_response_is_the_original_transcript(relabeled, data_dir):
    raw = {line["Index"]: line for line in _raw_lines(data_dir / HH_RELABELED_FILE)}
    for row in relabeled.select(range(0, len(relabeled), 5)):
        line = raw[row["source_index"]]
        assert row["prompt"] + row["chosen"] == line["chosen"]
        assert row["prompt"] + row["rejected"] == line["rejected"]
        assert row["context_id"] == line["objective"]


def test_relabeled_skips_and_logs_empty_or_identical_pairs(data_dir, caplog):
    with caplog.at_level(logging.INFO, logger="trl_micro.bundled.hh"):
        dataset = load_hh_relabeled(data_dir, max_pairs=10)
    total = len(_raw_lines(data_dir / HH_RELABELED_FILE))
    message = next(record.getMessage() for record in caplog.records if "skipped" in record.getMessage())
    assert "empty response" in message and "identical responses" in message
    assert f"kept {total - 8} pairs, skipped 8" in message
    assert len(dataset) == 10


def test_relabeled_max_pairs_is_seeded(data_dir):
    first = load_hh_relabeled(data_dir, max_pairs=50, seed=1)
    again = load_hh_relabeled(data_dir, max_pairs=50, seed=1)
    other = load_hh_relabeled(data_dir, max_pairs=50, seed=2)
    assert len(first) == 50
    assert first["source_index"] == again["source_index"]
    assert first["source_index"] != other["source_index"]
    assert first["source_index"] == sorted(first["source_index"])


# ---------------------------------------------------------------------------------------------------------------------
# hh_rlhf
# ---------------------------------------------------------------------------------------------------------------------


def test_hh_rlhf_loads_the_four_splits(data_dir):
    dataset = load_hh_rlhf(data_dir, max_pairs_per_split=20)
    assert STANDARD_COLUMNS | {"split", "source_index"} == set(dataset.column_names)
    assert Counter(dataset["split"]) == {split: 20 for split in HH_RLHF_SPLITS}
    for row in dataset:
        assert row["context_id"] == ("harmless" if row["split"] == "harmless-base" else "helpful")
    _check_standard_format(dataset)

    raw = {split: _raw_lines(data_dir / "hh_rlhf" / f"{split}_test.jsonl.gz") for split in HH_RLHF_SPLITS}
    for row in dataset:
        line = raw[row["split"]][row["source_index"]]
        assert row["prompt"] + row["chosen"] == line["chosen"].lstrip()
        assert row["prompt"] + row["rejected"] == line["rejected"].lstrip()


def test_hh_rlhf_counts_skipped_pairs(data_dir, caplog):
    with caplog.at_level(logging.INFO, logger="trl_micro.bundled.hh"):
        dataset = load_hh_rlhf(data_dir, splits=("helpful-rejection-sampled",))
    total = len(_raw_lines(data_dir / "hh_rlhf" / "helpful-rejection-sampled_test.jsonl.gz"))
    assert 0 < total - len(dataset) < 0.05 * total
    message = next(record.getMessage() for record in caplog.records if "skipped" in record.getMessage())
    assert f"skipped {total - len(dataset)}" in message
    assert set(dataset["context_id"]) == {"helpful"}


def test_hh_rlhf_unknown_split(data_dir):
    with pytest.raises(ValueError, match="harmful-base"):
        load_hh_rlhf(data_dir, splits=("harmful-base",))


def test_split_transcripts():
    prompt = "Human: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    assert split_transcripts(prompt + " Fine.", prompt + " Fine, thanks!") == (prompt, " Fine.", " Fine, thanks!")
    assert split_transcripts(prompt + " Good.", prompt + " Bad.") == (prompt, " Good.", " Bad.")
    # Transcripts that differ before their final assistant turn, or have no assistant turn in common.
    assert split_transcripts("Human: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d", "Human: a\n\nAssistant: x") is None
    assert split_transcripts("Human: a", "Human: b") is None


# ---------------------------------------------------------------------------------------------------------------------
# Locating the data and bad input
# ---------------------------------------------------------------------------------------------------------------------


def test_data_dir_from_env_var_and_errors(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV_VAR, str(data_dir))
    assert resolve_data_dir() == data_dir
    assert len(load_hh_relabeled(max_pairs=3)) == 3

    missing = tmp_path / "nowhere"
    monkeypatch.setenv(DATA_DIR_ENV_VAR, str(missing))
    with pytest.raises(FileNotFoundError) as error:
        resolve_data_dir()
    assert str(missing) in str(error.value) and DATA_DIR_ENV_VAR in str(error.value)

    monkeypatch.delenv(DATA_DIR_ENV_VAR)
    with pytest.raises(FileNotFoundError, match=f"--data_dir.*{DATA_DIR_ENV_VAR}"):
        resolve_data_dir()  # the library has no default location: an installed package has no checkout beside it

    with pytest.raises(FileNotFoundError, match="both_test.jsonl.gz"):
        load_hh_relabeled(tmp_path)
    with pytest.raises(FileNotFoundError, match="harmless-base_test.jsonl.gz"):
        load_hh_rlhf(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------------------


def _toy_dataset(counts: dict[str, int]) -> Dataset:
    contexts = [context for context, count in counts.items() for _ in range(count)]
    return Dataset.from_dict({"pair_id": list(range(len(contexts))), "context_id": contexts})


def test_split_by_context_is_seeded_stratified_and_disjoint(relabeled):
    fractions = (0.6, 0.25, 0.15)
    parts = split_by_context(relabeled, fractions=fractions, seed=3)
    again = split_by_context(relabeled, fractions=fractions, seed=3)
    other = split_by_context(relabeled, fractions=fractions, seed=4)
    assert list(parts) == ["train", "adaptation", "test"]
    for name in parts:
        assert parts[name]["source_index"] == again[name]["source_index"]
    assert parts["test"]["source_index"] != other["test"]["source_index"]

    ids = [set(parts[name]["source_index"]) for name in parts]
    assert sum(len(part) for part in ids) == len(relabeled) == len(set().union(*ids))

    totals = Counter(relabeled["context_id"])
    for name, fraction in zip(parts, fractions):
        counts = Counter(parts[name]["context_id"])
        for context, total in totals.items():
            assert abs(counts[context] - fraction * total) <= 1, (name, context, counts[context], fraction * total)


def test_split_by_context_on_uneven_contexts():
    dataset = _toy_dataset({"a": 7, "b": 13, "c": 1})
    parts = split_by_context(dataset, fractions=(0.5, 0.3, 0.2), seed=0)
    for name, fraction in zip(parts, (0.5, 0.3, 0.2)):
        counts = Counter(parts[name]["context_id"])
        for context, total in {"a": 7, "b": 13, "c": 1}.items():
            assert abs(counts[context] - fraction * total) <= 1
    with pytest.raises(ValueError, match="'c' has 1 pairs"):
        split_by_context(dataset, sizes_per_context=(3, 2, 1))
    sized = split_by_context(_toy_dataset({"a": 7, "b": 13}), sizes_per_context=(3, 2, 1))
    assert [len(sized[name]) for name in sized] == [6, 4, 2]
    assert Counter(sized["adaptation"]["context_id"]) == {"a": 2, "b": 2}


def test_split_by_context_bad_input():
    dataset = _toy_dataset({"a": 4, "b": 4})
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_context(dataset, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError) as error:
        split_by_context(dataset, context_column="user")
    assert "'user'" in str(error.value) and "pair_id" in str(error.value) and "context_id" in str(error.value)


def test_take_per_context(relabeled):
    eight = take_per_context(relabeled, 8, seed=5)
    thirty_two = take_per_context(relabeled, 32, seed=5)
    assert Counter(eight["context_id"]) == {"helpful": 8, "harmless": 8}
    assert Counter(thirty_two["context_id"]) == {"helpful": 32, "harmless": 32}
    assert set(eight["source_index"]) <= set(thirty_two["source_index"])  # nested draws
    assert take_per_context(relabeled, 8, seed=5)["source_index"] == eight["source_index"]
    assert take_per_context(relabeled, 8, seed=6)["source_index"] != eight["source_index"]


def test_take_per_context_errors():
    dataset = _toy_dataset({"a": 10, "b": 3})
    with pytest.raises(ValueError) as error:
        take_per_context(dataset, 5)
    message = str(error.value)
    assert "'b'" in message and "3 pairs" in message and "5 pairs per context" in message
    with pytest.raises(ValueError) as error:
        take_per_context(dataset, 2, context_column="persona")
    assert "'persona'" in str(error.value) and "context_id" in str(error.value)
