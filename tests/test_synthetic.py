import itertools

import pytest

from trl_micro.bundled.synthetic import (
    AXES,
    MAX_SUBPOPULATIONS,
    SyntheticPreferenceConfig,
    generate_synthetic_preferences,
    preference_probability,
    subpopulation_contexts,
    subpopulation_paraphrases,
    true_preference,
    utility,
)

COLUMNS = {
    "prompt",
    "chosen",
    "rejected",
    "context",
    "context_id",
    "subpopulation",
    "topic",
    "chosen_style",
    "rejected_style",
}


def generate(**kwargs):
    kwargs.setdefault("num_pairs_per_subpopulation", 100)
    return generate_synthetic_preferences(SyntheticPreferenceConfig(**kwargs))


def test_same_seed_same_dataset_other_seed_other_dataset():
    assert generate(seed=3).to_list() == generate(seed=3).to_list()
    assert generate(seed=3)["chosen"] != generate(seed=4)["chosen"]


def test_schema_in_trl_explicit_prompt_format():
    dataset = generate(num_subpopulations=3, num_pairs_per_subpopulation=20)
    assert set(dataset.column_names) == COLUMNS
    assert len(dataset) == 60
    row = dataset[0]
    assert all(isinstance(row[name], str) for name in ("prompt", "chosen", "rejected", "context", "context_id"))
    assert row["context_id"] == f"subpop-{row['subpopulation']}"
    assert row["context"] == subpopulation_contexts(3)[row["subpopulation"]]
    assert len(row["chosen_style"]) == len(AXES)
    assert sorted(set(dataset["subpopulation"])) == [0, 1, 2]
    assert not any(text.endswith("<|im_end|>") for text in dataset["chosen"])


def test_conversational_variant_holds_chat_messages():
    dataset = generate(conversational=True, num_pairs_per_subpopulation=10)
    plain = generate(num_pairs_per_subpopulation=10)
    row, plain_row = dataset[0], plain[0]
    assert row["prompt"] == [{"role": "user", "content": plain_row["prompt"]}]
    assert row["chosen"] == [{"role": "assistant", "content": plain_row["chosen"]}]
    assert row["rejected"] == [{"role": "assistant", "content": plain_row["rejected"]}]


def test_responses_of_a_pair_always_differ_in_text_and_style():
    dataset = generate(num_subpopulations=MAX_SUBPOPULATIONS, num_pairs_per_subpopulation=50)
    for row in dataset:
        assert row["chosen"] != row["rejected"]
        assert row["chosen_style"] != row["rejected_style"]


def test_noiseless_labels_agree_with_true_preference():
    dataset = generate(num_subpopulations=4)
    for row in dataset:
        assert true_preference(row["chosen_style"], row["rejected_style"], row["subpopulation"]) == 1


def test_label_noise_flips_some_labels_and_matches_the_bradley_terry_rate():
    dataset = generate(num_subpopulations=2, num_pairs_per_subpopulation=1000, label_noise=1.0)
    agree = [true_preference(r["chosen_style"], r["rejected_style"], r["subpopulation"]) == 1 for r in dataset]
    expected = [
        max(p, 1 - p)
        for r in dataset
        for p in [preference_probability(r["chosen_style"], r["rejected_style"], r["subpopulation"], label_noise=1.0)]
    ]
    assert 0.5 < sum(agree) / len(agree) < 1.0
    assert sum(agree) / len(agree) == pytest.approx(sum(expected) / len(expected), abs=0.04)


def test_two_subpopulations_conflict_on_most_pairs():
    dataset = generate(num_subpopulations=2, num_pairs_per_subpopulation=300)
    reversed_by_other = [
        true_preference(row["chosen_style"], row["rejected_style"], 1 - row["subpopulation"]) == -1 for row in dataset
    ]
    assert sum(reversed_by_other) / len(dataset) > 0.3


def test_all_designed_subpopulations_are_distinct_and_pairwise_disagree():
    styles = list(itertools.product((0, 1), repeat=len(AXES)))
    pairs = list(itertools.combinations(styles, 2))
    for m, n in itertools.combinations(range(MAX_SUBPOPULATIONS), 2):
        opposite = sum(true_preference(a, b, m) * true_preference(a, b, n) < 0 for a, b in pairs)
        assert opposite / len(pairs) > 0.15, (m, n)


def test_eight_subpopulations_with_paraphrased_contexts():
    dataset = generate(num_subpopulations=8, num_pairs_per_subpopulation=30, context_paraphrase=True)
    assert sorted(set(dataset["subpopulation"])) == list(range(8))
    for row in dataset:
        assert row["context"] in subpopulation_paraphrases(row["subpopulation"])


def test_paraphrases_differ_from_the_original_contexts():
    contexts = subpopulation_contexts(MAX_SUBPOPULATIONS)
    assert len(set(contexts)) == MAX_SUBPOPULATIONS
    for m, context in enumerate(contexts):
        paraphrases = subpopulation_paraphrases(m)
        assert len(paraphrases) >= 2
        assert context not in paraphrases and len(set(paraphrases)) == len(paraphrases)


def test_subset_of_axes_fixes_the_others():
    dataset = generate(axes=("length", "formality"), num_pairs_per_subpopulation=20)
    assert all(len(style) == 2 for style in dataset["chosen_style"])
    assert utility((1, 0), 0, axes=("length", "formality")) == utility((1, 0, 0, 0, 0, 0), 0)


def test_prompt_pool_size():
    dataset = generate(num_prompts=3, num_pairs_per_subpopulation=50)
    assert len(set(dataset["prompt"])) <= 3


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_subpopulations", 0),
        ("num_subpopulations", MAX_SUBPOPULATIONS + 1),
        ("num_pairs_per_subpopulation", 0),
        ("num_prompts", 0),
        ("axes", ("length", "colour")),
        ("axes", ()),
        ("label_noise", -1.0),
        ("conflict_fraction", 1.5),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SyntheticPreferenceConfig(**{field: value})


def test_axes_that_make_subpopulations_agree_are_rejected():
    with pytest.raises(ValueError, match="axes"):  # subpopulations 0 and 1 both dislike enthusiasm
        SyntheticPreferenceConfig(num_subpopulations=2, axes=("enthusiasm",))


def test_bad_subpopulation_index():
    with pytest.raises(ValueError, match="num_subpopulations"):
        subpopulation_contexts(MAX_SUBPOPULATIONS + 1)
    with pytest.raises(ValueError, match="subpopulation"):
        subpopulation_paraphrases(MAX_SUBPOPULATIONS)
