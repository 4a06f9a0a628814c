"""The performance scripts run end to end at a tiny shape on the CPU (their real runs use SmolLM2 or a GPU)."""

import json

import pytest

from benchmarks.performance import feature_store, gpu_performance, grpo_step
from trl_micro.testing_utils import save_tiny_backbone

from .rl_fixtures import save_tiny_policy


def test_gpu_performance_script_runs_at_a_tiny_shape(tmp_path):
    output = tmp_path / "gpu_performance.md"
    assert gpu_performance.main(["--preset", "tiny", "--output", str(output)]) == 0
    report = json.loads(output.with_suffix(".json").read_text())
    (shape,) = report["shapes"]
    assert shape["shape"] == "tiny"
    for value in (
        shape["scoring"]["micro_k4_ratio"],
        shape["scoring"]["micro_k10_ratio"],
        shape["feature_pass"]["ratio"],
        shape["lora_step"]["ratio"],
    ):
        assert value > 0
    assert "| tiny | 4 x 32 |" in output.read_text()


def test_feature_store_script_counts_distinct_sequences(tokenizer, tmp_path):
    backbone = save_tiny_backbone(str(tmp_path / "backbone"), tokenizer)
    output = tmp_path / "feature_store.md"
    assert (
        feature_store.main(
            ["--model", backbone, "--dsp_queries", "2", "--synthetic_pairs", "5", "--output", str(output)]
        )
        == 0
    )
    dsp_row = next(line for line in output.read_text().splitlines() if line.startswith("| DSP"))
    sequences = dsp_row.split("|")[3].strip()  # per pair / store, e.g. "64 / 10"
    per_pair, store = (int(value) for value in sequences.split(" / "))
    assert per_pair == 2 * 32 and store == 10  # 2 queries x 16 pairs, 5 answers each


def test_grpo_step_script_times_both_rewards(tokenizer, tmp_path):
    policy = save_tiny_policy(tokenizer, tmp_path / "policy")
    output = tmp_path / "grpo_step.md"
    assert (
        grpo_step.main(
            [
                "--model",
                str(policy),
                "--steps",
                "1",
                "--rounds",
                "1",
                "--generations",
                "2",
                "--completion_tokens",
                "4",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    text = output.read_text()
    assert "| MiCRoReward (K=4, routed by context) |" in text and "Ratio (MiCRo / plain)" in text


@pytest.mark.slow
def test_serving_benchmark_measures_throughput_and_keeps_feedback_across_a_kill(tokenizer, tmp_path):
    """The serving benchmark at a tiny shape: servers on 127.0.0.1 (one of them SIGKILLed and restarted)."""
    from benchmarks.performance import serving

    backbone = save_tiny_backbone(str(tmp_path / "backbone"), tokenizer)
    output = tmp_path / "serving.md"
    argv = ["--model", backbone, "--rounds", "1", "--feedback_per_client", "6", "--output", str(output)]
    assert serving.main(argv) == 0
    report = json.loads(output.with_suffix(".json").read_text())
    assert report["throughput"]["rows"] == serving.CLIENTS * serving.ROWS_PER_CLIENT
    assert report["throughput"]["max_reward_difference"] < 1e-5 and report["throughput"]["ratio"] > 0
    feedback = report["feedback"]
    assert feedback["killed_and_restarted"] and feedback["acknowledged"] == 4 * 6 + 1  # + one to the restarted server
    # every acknowledged comparison is in the store once: a retry of one whose answer the kill cut off has its id
    assert feedback["acknowledged"] == feedback["stored_updates"] == feedback["logged"]
    assert "## Feedback under load" in output.read_text()


@pytest.mark.slow
def test_user_store_benchmark_runs_every_scenario_at_a_tiny_shape(tmp_path):
    """SQLite and a private PostgreSQL, servers on 127.0.0.1 (one SIGKILLed): every acknowledged comparison logged once."""
    from benchmarks.performance import user_store

    output = tmp_path / "user_store.md"
    argv = ["--users", "300", "--small_users", "30", "--feedback", "10", "--score_requests", "10", "--per_client", "3"]
    argv += ["--staleness_trials", "2", "--rebuild_comparisons", "200", "--output", str(output)]
    assert user_store.main(argv) == 0
    report = json.loads(output.with_suffix(".json").read_text())
    assert report["replicas"]["acknowledged_logged_once"] and report["replicas"]["updates_equal_log_rows"]
    assert report["replicas"]["acknowledged"] == 12 and report["replicas"]["killed_and_restarted"]
    assert report["rebuild"]["sequences_computed"] == 0 and report["rebuild"]["comparisons"] == 200
    assert report["staleness"]["p99_ms"] < 5_000 and "## Staleness between replicas" in output.read_text()
