"""The benchmark pipeline (benchmarks/harness/run_all.py) and `trl-micro eval`, end to end on tiny models and a few pairs."""

import dataclasses
import importlib
import json
import re

import pytest
import torch

from benchmarks.harness import plan as plans
from benchmarks.harness import run_all
from benchmarks.harness.comparison import DIAGNOSTICS, METHODS
from benchmarks.harness.pair_pool import build_pair_pool
from trl_micro.bundled.data_dir import resolve_data_dir
from trl_micro.personalization.adaptation import fit_online_router, routed_margins
from trl_micro.rewards import MiCRoReward
from trl_micro.scripts.cli import main as cli_main
from trl_micro.testing_utils import build_tiny_micro_model, save_tiny_backbone

from .conftest import eval_command, make_conflicting_pairs, run_eval, save_tiny_checkpoint, skip_unless_strict
from .rl_fixtures import reward_with_eval_stores

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_study(name: str, tokenizer, tmp_path, *arguments: str, data_dir=None, output: str | None = None):
    """Run the study benchmarks/studies/<name>.py on the smoke plan with a tiny backbone (`arguments` after
    `--preset smoke`); it must exit 0 and its report must quote the command that reruns it. Returns the study's module,
    its JSON result and its Markdown report."""
    study = importlib.import_module(f"benchmarks.studies.{name}")
    report = tmp_path / (output or f"{name}.md")
    backbone = save_tiny_backbone(str(tmp_path / "backbone"), tokenizer)
    argv = ["--preset", "smoke", *arguments, "--model", backbone, "--output", str(report)]
    argv += ["--cache_dir", str(tmp_path / "cache"), *(["--data_dir", str(data_dir)] if data_dir else [])]
    assert study.main(argv) == 0
    document = report.read_text()
    assert f"python -m benchmarks.studies.{name} {' '.join(argv)}" in document
    return study, json.loads(report.with_suffix(".json").read_text()), document


@pytest.fixture(scope="module")
def real_data_dir():
    try:
        return resolve_data_dir()
    except FileNotFoundError as error:
        skip_unless_strict(str(error))


def run_pipeline(tokenizer, tmp_path, data_dir, output, *arguments: str) -> tuple[str, list[str], str]:
    """Run benchmarks/harness/run_all.py on the smoke plan with a tiny backbone and the real data (`arguments` after
    the report `output`, the results in tmp_path/results and the cache); it must exit 0 and its report must quote the
    command that reruns it. Returns the backbone's folder, the arguments and the report."""
    backbone = save_tiny_backbone(str(tmp_path / "backbone"), tokenizer)
    argv = ["--preset", "smoke", "--model", backbone, "--output", str(output), "--cache_dir", str(tmp_path / "cache")]
    argv += ["--results_dir", str(tmp_path / "results"), "--data_dir", str(data_dir), *arguments]
    assert run_all.main(argv) == 0
    document = output.read_text()
    assert f"python -m benchmarks.harness.run_all {' '.join(argv)}" in document
    return backbone, argv, document


def test_run_all_smoke_writes_report_tables_and_plots(tokenizer, tmp_path, real_data_dir):
    output, results, performance = tmp_path / "BENCHMARKS.md", tmp_path / "results", tmp_path / "performance"
    backbone, argv, document = run_pipeline(
        tokenizer, tmp_path, real_data_dir, output, "--performance_dir", str(performance), "--lora"
    )
    for heading in (
        "## How this was run",
        "## Setup",
        "## Targets",
        "## Results",
        "## Performance",
        "## LoRA-tuned backbone",
        "### hh_relabeled",
        "### synthetic M=2",
        "### DSP",
        "#### Leave one context out",
        "#### Test pairs marked `agreed`",
        "#### Diagnostics",
        "| MiCRo + router adaptation, unseen context wordings |",
        "| SingleReward + residual heads |",
    ):
        assert heading in document, heading
    for method in METHODS:
        assert f"| {method} |" in document, method
    for context in ("helpful", "harmless", "subpop-0", "subpop-1", "academy", "literature"):
        assert context in document
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", document)
    assert len(images) == 5 * 4  # three benchmarks, and the LoRA run's frozen and tuned comparisons
    for image in images:
        data = (output.parent / image).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000, image

    report = json.loads((results / "hh_relabeled.json").read_text())
    assert report["seeds"] == [0, 1]
    assert set(report["methods"]) == {*METHODS, *DIAGNOSTICS}
    assert len(report["methods"]["SingleReward"]) == 2  # one per-context result per seed
    assert (results / "hh_relabeled_lora_tuned.json").exists()
    assert (performance / "feature_store.md").exists() and not (results / "feature_store.md").exists()

    # --resume reuses every comparison recorded with the same settings: no pool is built, the sections are the same.
    resumed_argv = [*[arg for arg in argv if arg != "--lora"], "--resume", "--skip_performance"]
    assert run_all.main(resumed_argv) == 0
    again = output.read_text()
    section = slice(document.index("## Results"), document.index("## Performance"))
    assert again[again.index("## Results") : again.index("## Performance")] == document[section]
    assert "features of pool" not in again and "comparison `hh_relabeled`" not in again
    assert "(`--resume`), so not in the wall times below: `hh_relabeled` (run " in again
    plan = plans.smoke_plan()
    plan.model = backbone
    spec = plan.benchmarks[0]
    assert run_all.resumed_outcome(spec, plan, results) is not None
    plan.seeds = [0]
    assert run_all.resumed_outcome(spec, plan, results) is None  # other settings: it runs again


def test_hyre_weights_are_the_normalized_likelihood_of_each_head():
    head_margins = torch.tensor([[2.0, -1.0], [1.0, 0.5], [-3.0, 1.0]])
    contexts = ["a", "a", "b"]
    router = fit_online_router(contexts, head_margins)
    likelihood = torch.nn.functional.logsigmoid(head_margins[:2]).sum(dim=0).exp()
    torch.testing.assert_close(router.weights("a"), (likelihood / likelihood.sum()).float())
    margins = routed_margins(router, ["a", "b"], torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    assert margins[0] == pytest.approx(1.0)
    assert margins[1] < 0  # context b trusts head 1


def test_pool_without_context_features_refuses_context_rows(tokenizer, tmp_path):
    data = make_conflicting_pairs(6).rename_column("taste", "context_id")
    pool = build_pair_pool(build_tiny_micro_model(tokenizer), tokenizer, data, cache_dir=tmp_path, num_with_context=2)
    assert len(pool.features.features["router"]) == 6 + 2
    assert pool.rows([1], with_context=True) == [7]
    with pytest.raises(ValueError, match="no features with their context"):
        pool.rows([3], with_context=True)
    subset = pool.subset([1, 4, 5])
    assert subset.num_with_context == 1 and subset.context_ids == [pool.context_ids[i] for i in (1, 4, 5)]
    torch.testing.assert_close(subset.tensors([0], True)["router"], pool.tensors([1], True)["router"])


# ------------------------------------------------------------------------------------------------------- trl-micro eval
@pytest.fixture()
def checkpoint_and_data(tokenizer, tmp_path):
    make_conflicting_pairs(24).to_json(tmp_path / "pairs.jsonl")
    return save_tiny_checkpoint(tokenizer, tmp_path / "ckpt"), str(tmp_path / "pairs.jsonl")


def test_eval_command_writes_report_and_plots(checkpoint_and_data, tmp_path, capsys):
    checkpoint, data_file = checkpoint_and_data
    out = tmp_path / "eval"
    report = run_eval(checkpoint, data_file, out, "--context_id_column", "taste", "--adaptation_pairs", "4")
    assert report["num_pairs"] == {"scored": 24, "evaluated": 16, "adaptation": 8, "adaptation_pool": 8}
    assert set(report["methods"]) >= {
        "routed (checkpoint router)",
        "online routing (4 pairs per context)",
        "head 2 alone",
        "online routing + residual heads (4 pairs per context)",
    }
    residual = report["methods"]["online routing + residual heads (4 pairs per context)"]["accuracy"]
    assert set(residual) == {"short", "long"} and all(0 <= value <= 1 for value in residual.values())
    assert set(report["methods"]["routed (checkpoint router)"]["accuracy"]) == {"short", "long"}
    for name in ("accuracy_per_context.png", "head_usage.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    assert "## Accuracy per context" in (out / "eval_report.md").read_text()
    printed = capsys.readouterr().out
    assert "online routing (4 pairs per context): macro" in printed
    readout = MiCRoReward.from_pretrained(checkpoint).model.config.readout_name
    assert report["model"] == {"num_heads": 3, "readout": readout} and f"readout {readout}" in printed
    # What was adapted is saved per context id and drops into the RL reward.
    reward = reward_with_eval_stores(checkpoint, out, "taste")
    assert set(reward.online_router.users()) == set(reward.residual_heads.users()) == {"short", "long"}
    row = make_conflicting_pairs(1)[0]
    scores = reward.score([row["prompt"]] * 3, [row["chosen"]] * 3, users=["short", "long", "nobody"])
    assert scores["residual_rewards"][2] == 0 and scores["residual_rewards"][:2].abs().min() > 0
    torch.testing.assert_close(scores["mixture_weights"][0], reward.online_router.weights("short"))


def test_eval_command_bad_input(checkpoint_and_data, tmp_path):
    checkpoint, data_file = checkpoint_and_data
    base = eval_command(checkpoint, data_file)
    with pytest.raises(ValueError, match="no context column 'persona'.*--context_column"):
        cli_main([*base, "--output_dir", str(tmp_path / "a"), "--context_column", "persona"])
    with pytest.raises(ValueError, match="--adaptation_pairs 12 needs more than that many pairs"):
        cli_main(
            [*base, "--output_dir", str(tmp_path / "b"), "--context_id_column", "taste", "--adaptation_pairs", "12"]
        )
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    with pytest.raises(OSError, match="Cannot write"):
        cli_main([*base, "--output_dir", str(blocker / "eval")])


def test_a_wrapped_backbone_stays_causal(tokenizer, tmp_path):
    """The router reads the last prompt token of the full sequence: that hidden state must not see the response."""
    from trl_micro import MiCRoRewardModel

    path = save_tiny_backbone(str(tmp_path / "backbone"), tokenizer)
    full = torch.tensor([tokenizer("Question number 1: how do I cook rice?\nSure.")["input_ids"]])
    prompt_length = len(tokenizer("Question number 1: how do I cook rice?\n")["input_ids"])
    for model in (MiCRoRewardModel.from_backbone(path, num_heads=2), build_tiny_micro_model(tokenizer)):
        with torch.no_grad():
            in_full = model.backbone(input_ids=full).last_hidden_state[0, prompt_length - 1]
            alone = model.backbone(input_ids=full[:, :prompt_length]).last_hidden_state[0, -1]
        torch.testing.assert_close(in_full, alone, rtol=1e-4, atol=1e-4)


def test_stage1_sweep_reports_ceiling_online_routing_and_picks(tokenizer, tmp_path):
    variants = tmp_path / "variants.json"
    variants.write_text(
        json.dumps(
            [
                {"name": "as benchmarked"},
                {"name": "K = M", "num_heads_minus_contexts": 0, "heads": {"weight_decay": 0.1}, "eta": 0.5},
                {"name": "from the oracle heads", "init": "oracle"},
            ]
        )
    )
    arguments = ["--benchmark", "synthetic_m2", "--variants", str(variants)]
    _, result, document = run_study("stage1_sweep", tokenizer, tmp_path, *arguments, output="sweep/stage1_sweep.md")
    assert result["contexts"] == ["subpop-0", "subpop-1"] and result["seeds"] == [0, 1]
    first, second, from_oracle = result["variants"]
    assert (first["num_heads"], second["num_heads"]) == (2, 2)
    assert (first["init"], from_oracle["init"]) == ("random", "oracle")
    assert all(0 < row["train_nll"] < 10 for row in result["variants"])
    assert (first["eta"], second["eta"], second["heads"]["weight_decay"]) == (1.0, 0.5, 0.1)
    for row in result["variants"]:
        assert f"| {row['variant']} |" in document
        assert 0 <= row["picks"] <= row["cases"] == 4
        for name in ("ceiling", "online"):
            for context in result["contexts"]:
                accuracy, single, oracle = (
                    row[name]["accuracy"][context],
                    row["single"][context],
                    row["oracle"][context],
                )
                if oracle != single:
                    assert row[name]["gap"][context] == pytest.approx((accuracy - single) / (oracle - single))


def test_stage1_sweep_rejects_bad_variants_and_benchmarks(tmp_path):
    from benchmarks.studies import stage1_sweep

    with pytest.raises(ValueError, match="unknown: \\['epochs'\\]"):
        stage1_sweep.check_variants([{"name": "x", "epochs": 3}])
    with pytest.raises(ValueError, match="must have a `name`"):
        stage1_sweep.check_variants([{"num_heads": 3}])
    with pytest.raises(ValueError, match="not HeadTraining fields"):
        stage1_sweep.check_variants([{"name": "x", "heads": {"lr": 1.0}}])
    with pytest.raises(ValueError, match="`init` must be one of"):
        stage1_sweep.check_variants([{"name": "x", "init": "kmeans"}])
    with pytest.raises(ValueError, match="--benchmark 'nope' is not a comparison"):
        stage1_sweep.main(["--preset", "smoke", "--benchmark", "nope", "--output", str(tmp_path / "s.md")])


def test_router_objective_compares_both_likelihoods_with_the_benchmark_rows(tokenizer, tmp_path):
    router_objective, result, document = run_study(
        "router_objective", tokenizer, tmp_path, "--benchmark", "synthetic_m2"
    )
    assert result["contexts"] == ["subpop-0", "subpop-1"] and result["seeds"] == [0, 1]
    assert 0 <= min(result["context_probe_accuracy"]) <= max(result["context_probe_accuracy"]) <= 1
    assert "Context probe" in document
    for method in router_objective.METHODS:
        assert f"| {method} |" in document
        assert len(result["runs"][method]) == 2  # one per seed
        for context in result["contexts"]:
            per_seed = [run[context] for run in result["runs"][method]]
            assert result["mean"][method][context] == pytest.approx(sum(per_seed) / 2)


def test_lora_only_plan_runs_just_the_lora_run(tokenizer, tmp_path, real_data_dir, monkeypatch):
    """The `hh_lora` preset's shape (LoRA run alone, no main comparisons, no performance figures) at smoke size."""
    hh_lora = plans.hh_lora_plan()
    assert hh_lora.lora_only and hh_lora.lora_tuning.train_pairs_per_context is None  # all training pairs
    assert [spec.name for spec in hh_lora.benchmarks] == [hh_lora.lora_benchmark]

    def smoke_lora_only():
        plan = plans.smoke_plan()
        plan.benchmarks = [spec for spec in plan.benchmarks if spec.name == plan.lora_benchmark]
        plan.pools = {name: pool for name, pool in plan.pools.items() if name == "hh_relabeled"}
        plan.lora_only = True
        return plan

    monkeypatch.setitem(plans.PRESETS, "smoke", smoke_lora_only)
    results = tmp_path / "results"
    _, _, document = run_pipeline(
        tokenizer, tmp_path, real_data_dir, tmp_path / "REPORT.md"
    )  # no --lora: the plan asks
    assert document.startswith("# trl-micro benchmarks: the LoRA run")
    assert "Regenerate with the same command" in document
    assert "## LoRA-tuned backbone" in document and "### hh_relabeled, LoRA-tuned backbone (LoRA run)" in document
    assert "## Performance" not in document and "performance figures" not in document
    assert not (results / "hh_relabeled.json").exists()  # the main comparison did not run
    assert (results / "hh_relabeled_lora_frozen.json").exists() and (results / "hh_relabeled_lora_tuned.json").exists()


@pytest.mark.parametrize("script", ["stage1_sweep", "router_objective", "latent_recovery"])
def test_single_comparison_studies_run_on_dsp(script, tokenizer, tmp_path, real_data_dir):
    """DSP splits evaluation pairs by query (`adaptation_share`): the studies split as run_all does."""
    arguments = ["--benchmark", "dsp", "--seeds", "0"]
    if script == "stage1_sweep":
        variants = tmp_path / "variants.json"
        variants.write_text(json.dumps([{"name": "as benchmarked"}]))
        arguments += ["--variants", str(variants)]
    if script == "latent_recovery":
        arguments += ["--restarts", "2", "--l2", "0.05"]
    _, result, document = run_study(script, tokenizer, tmp_path, *arguments, data_dir=real_data_dir)
    assert result["contexts"] == list(plans.DSP_CONTEXTS)
    if script == "stage1_sweep":
        # the benchmark's own settings: its reported adaptation size (2 of the smoke sizes 2, 4) and head training
        assert result["adaptation_per_context"] == 2
        assert result["benchmark_heads"] == dataclasses.asdict(plans.smoke_plan().comparison.heads)
    if script == "latent_recovery":
        # every DSP prompt's domain answers reverse each other between contexts
        assert result["data"]["0"]["prompts_with_reversals"] > 0
        assert 0 <= result["data"]["0"]["separability"]["accuracy"] <= 1
        assert len(result["fits"]) == 2 * 3  # without and with cannot-links, from the truth and two random starts
        for row in result["summary"]:
            assert 0 < row["truth_purity"] <= 1 and row["truth_log_likelihood"] < 0
            assert f"| 0.05 | {'yes' if row['cannot_link'] else 'no'} | 0 |" in document


def test_readout_study_compares_readouts_on_one_pool(tokenizer, tmp_path, real_data_dir):
    """Every readout is measured on the comparisons asked for; the backbone runs once per pool for all of them."""
    readouts = ["--reward_readouts", "last", "mean", "--router_readouts", "last", "mean"]
    arguments = ["--benchmarks", "synthetic_m2", "dsp", "--seeds", "0", "1", *readouts]
    readout_study, result, document = run_study(
        "readout_study", tokenizer, tmp_path, *arguments, data_dir=real_data_dir
    )
    assert list(result["benchmarks"]) == ["synthetic_m2", "dsp"]
    for entry in result["benchmarks"].values():
        assert list(entry["readouts"]) == [
            "last / router last",
            "mean / router last",
            "last / router mean",
            "mean / router mean",
        ]
        for readout in entry["readouts"].values():
            assert len(readout["runs"]) == 2
            for method in readout_study.METHODS:
                assert 0 <= readout["macro"][method]["mean"] <= 1
    assert "| mean / router last |" in document and "Gap closed per context" in document
    with pytest.raises(SystemExit):
        readout_study.main(["--preset", "smoke", "--benchmarks", "nope", "--output", str(tmp_path / "x.md")])


def test_query_selection_study_reports_curves_per_strategy(tokenizer, tmp_path, real_data_dir):
    """Every strategy at every budget the pool allows, on synthetic and DSP, with the plot and the command."""
    arguments = ["--benchmarks", "synthetic_m2", "dsp", "--seeds", "0", "1", "--budgets", "1", "2"]
    arguments += ["--ranking_candidates", "300"]
    query_selection, result, document = run_study(
        "query_selection", tokenizer, tmp_path, *arguments, data_dir=real_data_dir
    )
    assert (tmp_path / "query_selection.png").read_bytes()[:8] == PNG_SIGNATURE
    for name in ("synthetic_m2", "dsp"):
        summary = result["benchmarks"][name]["summary"]
        assert set(summary) == {"random", "information", "disagreement"}
        for strategy in summary.values():
            assert set(strategy[query_selection.ONLINE]) == {"1", "2"}
            assert set(strategy[query_selection.RESIDUAL]) == {"2"}  # residual heads need 2 pairs per context
            for method in (query_selection.ONLINE, query_selection.RESIDUAL):
                assert all(0 <= value["mean"] <= 1 for value in strategy[method].values())
        for run in result["benchmarks"][name]["runs"]:  # one per seed
            assert set(run["selection_seconds"]) == set(summary)
        ranking = result["benchmarks"][name]["ranking"]
        assert ranking["candidates"] == 300 and set(ranking["seconds"]) >= {"information", "disagreement"}
        assert f"Ranking 300 candidates from stored margins (K = {ranking['num_heads']}" in document


def test_embedded_sections_embed_reports_and_refresh_replaces_only_theirs(tmp_path):
    from benchmarks.harness.embedded_reports import RL, STUDIES, embedded_section, refresh_section

    studies = tmp_path / "benchmarks" / "studies" / "results"
    studies.mkdir(parents=True)
    report = studies / "study.md"
    report.write_text(
        "# A study\n\nGenerated by `python study.py`.\n\n![curves](study.png)\n\n## DSP\n\nSee [the note](../README.md#x)"
        " and [the web](https://example.org).\n\n```\n# not a heading\n```\n"
    )
    rl_report = tmp_path / "benchmarks" / "rl" / "results" / "rl.md"
    rl_report.parent.mkdir(parents=True)
    rl_report.write_text("# An RL run\n\n![matrix](cross_context.png)\n")
    document = tmp_path / "BENCHMARKS.md"
    missing = studies / "missing.md"
    document.write_text(
        "# Benchmarks\n\n## Performance\n\nfast\n\n## Studies\n\nstale\n\n## LoRA-tuned backbone\n\nx\n"
    )

    refresh_section(document, STUDIES, [report, missing])
    text = document.read_text()
    assert "stale" not in text and "fast" in text and text.rstrip().endswith("## LoRA-tuned backbone\n\nx")
    section = text[text.index("## Studies") : text.index("## LoRA-tuned backbone")]
    assert "### A study" in section and "#### DSP" in section and "\n# not a heading\n" in section
    assert "![curves](benchmarks/studies/results/study.png)" in section
    assert "[the note](benchmarks/studies/README.md#x)" in section and "(https://example.org)" in section
    assert "`benchmarks/studies/results/missing.md`: not generated yet" in section
    assert embedded_section(STUDIES, [report], document) == embedded_section(STUDIES, [report], document)

    refresh_section(document, STUDIES, [report])  # a second refresh is the same document, less the missing note
    assert document.read_text().count("### A study") == 1 and "missing.md" not in document.read_text()

    # A document written before the RL section gets it right after the Studies section, then refreshes in place.
    for _ in range(2):
        refresh_section(document, RL, [rl_report], after=STUDIES)
        text = document.read_text()
        assert text.count(RL.heading) == 1 and text.count("### An RL run") == 1
        assert text.index("### A study") < text.index(RL.heading) < text.index("## LoRA-tuned backbone")
        assert "![matrix](benchmarks/rl/results/cross_context.png)" in text

    bare = tmp_path / "bare.md"
    bare.write_text("# Benchmarks\n\n## Results\n")
    with pytest.raises(ValueError, match="no '## Studies' section"):
        refresh_section(bare, STUDIES, [report])
    with pytest.raises(ValueError, match="no '## Policies trained"):
        refresh_section(bare, RL, [rl_report], after=STUDIES)
    with pytest.raises(FileNotFoundError, match="python -m benchmarks.harness.run_all"):
        refresh_section(tmp_path / "absent.md", STUDIES, [report])


def test_run_all_refresh_reports_embeds_the_full_plans_reports(tmp_path):
    document = tmp_path / "BENCHMARKS.md"
    document.write_text("# Benchmarks\n\n## Studies\n\n## LoRA-tuned backbone\n")
    assert run_all.main(["--refresh_reports", "--output", str(document)]) == 0
    text = document.read_text()
    plan = plans.full_plan()
    assert plan.rl_reports and plan.service_reports
    assert text.index("## Studies") < text.index("## Policies trained") < text.index("## Serving many users")
    for path in (*plan.studies, *plan.rl_reports, *plan.service_reports):
        report = plans.REPO_ROOT / path
        assert report.exists() or f"{report.name}`: not generated yet" in text
        if report.exists():
            assert "### " + report.read_text().splitlines()[0].removeprefix("# ") in text


def test_performance_section_keeps_embedded_headings_inside_it():
    from benchmarks.harness.report import _performance_section
    from benchmarks.performance.figures import EpochTiming

    serving = "# Serving\n\nGenerated by `python serving.py`.\n\n## Throughput\n\nfast\n\n```\n## not a heading\n```\n"
    performance = {
        "epoch": EpochTiming(32, 4.0, 3.0, 1.0),
        "epoch_data": "synthetic",
        "overhead": "# Overhead\n\n## Ratio\n",
        "serving": serving,
    }
    lines = _performance_section(performance)
    assert [line for line in lines if line.startswith("## ")] == ["## Performance", "## not a heading"]  # fenced
    assert "#### Throughput" in lines and "#### Ratio" in lines and "## not a heading" in lines
