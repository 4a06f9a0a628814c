"""
Stage 1 on conflicting subpopulations, through the demo's own code path (`trl_micro.demo.run_demo`) on a tiny
random backbone: some MiCRo head beats SingleReward on every subpopulation, and with the context in the prompt,
MiCRo's routed reward beats SingleReward on every subpopulation. And the demo itself, as a user runs it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trl_micro.bundled.embedded import embedded_model_path
from trl_micro.bundled.synthetic import SyntheticPreferenceConfig, generate_synthetic_preferences
from trl_micro.scripts.demo import DemoArguments, format_results, run_demo
from trl_micro.testing_utils import build_tiny_tokenizer, save_tiny_backbone

from .conftest import skip_unless_strict


@pytest.fixture(scope="module")
def tiny_tokenizer():
    data = generate_synthetic_preferences(
        SyntheticPreferenceConfig(num_subpopulations=2, num_pairs_per_subpopulation=60)
    )
    corpus = [row[column] for row in data for column in ("prompt", "chosen", "rejected", "context")]
    return build_tiny_tokenizer(corpus, vocab_size=1000)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_micro_beats_single_reward_on_every_subpopulation(tiny_tokenizer, tmp_path, seed):
    backbone = save_tiny_backbone(str(tmp_path / "backbone"), tiny_tokenizer, seed=seed)
    arguments = DemoArguments(
        model_name_or_path=backbone,
        train_pairs_per_subpopulation=240,
        test_pairs_per_subpopulation=100,
        seed=seed,
        feature_cache_dir=str(tmp_path / "features"),
    )
    results = run_demo(arguments)
    single, micro = results["methods"]["SingleReward"], results["methods"]["MiCRo"]
    table = format_results(results)
    assert results["subpopulations"] == ["subpop-0", "subpop-1"]
    for subpopulation in results["subpopulations"]:
        single_accuracy = single[subpopulation]["routed_accuracy"]
        assert max(micro[subpopulation]["head_accuracy"]) > single_accuracy, table
        assert micro[subpopulation]["routed_accuracy"] > single_accuracy, table
    # Each subpopulation is routed mostly to its own head, and not both to the same one.
    top_heads = {max(range(2), key=micro[s]["head_usage"].__getitem__) for s in results["subpopulations"]}
    assert top_heads == {0, 1}, table


def test_one_seed_gives_one_table(tiny_tokenizer, tmp_path):
    """The demo's `--seed` fixes everything it prints: two runs with other global RNG states give the same results."""
    backbone = save_tiny_backbone(str(tmp_path / "backbone"), tiny_tokenizer)
    arguments = DemoArguments(
        model_name_or_path=backbone,
        train_pairs_per_subpopulation=40,
        test_pairs_per_subpopulation=20,
        num_train_epochs=2,
        feature_cache_dir=str(tmp_path / "features"),
    )
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(run_demo(arguments)["methods"])
    assert runs[0] == runs[1]


@pytest.mark.slow
def test_the_demo_as_a_user_runs_it(tmp_path):
    """`trl-micro demo` with the README's settings on the embedded SmolLM2-135M: MiCRo's routed reward beats
    SingleReward on both subpopulations, and the router sends each subpopulation to a head of its own."""
    try:
        embedded_model_path()
    except (ImportError, FileNotFoundError) as error:
        skip_unless_strict(f"the embedded model is not installed: {error}")
    output = tmp_path / "demo.json"
    command = [
        str(Path(sys.executable).parent / "trl-micro"),
        "demo",
        "--output_json",
        str(output),
        "--feature_cache_dir",
        str(tmp_path / "features"),
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=1800,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| subpop-0 |" in result.stdout and "| subpop-1 |" in result.stdout
    results = json.loads(output.read_text())
    single, micro = results["methods"]["SingleReward"], results["methods"]["MiCRo"]
    for subpopulation in ("subpop-0", "subpop-1"):
        assert micro[subpopulation]["routed_accuracy"] > single[subpopulation]["routed_accuracy"], result.stdout
    top_heads = {max(range(2), key=micro[s]["head_usage"].__getitem__) for s in ("subpop-0", "subpop-1")}
    assert top_heads == {0, 1}, result.stdout
