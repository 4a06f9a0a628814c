"""
Turning comparison runs into the benchmark's files: one JSON + Markdown report and PNG plots per benchmark (through
`metrics`), and the sections of BENCHMARKS.md.

Gap closed, per context c: (acc_method(c) - acc_SingleReward(c)) / (acc_Oracle(c) - acc_SingleReward(c)), computed
on the accuracies averaged over seeds (undefined when the oracle is not above SingleReward).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trl_micro.evaluation_reports import markdown_table, plot_accuracy_per_context, plot_head_usage_heatmap, to_jsonable

from .comparison import (
    DIAGNOSTICS,
    MICRO_ADAPTED,
    MICRO_ADAPTED_UNSEEN,
    MICRO_ONLINE,
    MICRO_RESIDUAL,
    ORACLE,
    SINGLE,
    SINGLE_RESIDUAL,
    ComparisonResult,
)
from .embedded_reports import RL, SERVICE, STUDIES, demote_headings, embedded_section
from .metrics import adaptation_curve, gap_closed, plot_adaptation_curves, summarize_methods, write_seeded_report

STAGE2_SHORT_NAMES = {  # the Stage 2 variants, with their column name in the targets table
    MICRO_ADAPTED: "router adapt.",
    MICRO_ONLINE: "online routing",
    MICRO_RESIDUAL: "online + residual",
}
STAGE2_METHODS = tuple(STAGE2_SHORT_NAMES)


@dataclass
class BenchmarkOutcome:
    """
    Every seed of one benchmark.

    Attributes:
        name: file-name stem, e.g. "hh_relabeled" or "synthetic_m4" (plus "_lora" on the tuned backbone).
        title: heading in the report.
        description: how the pool and splits were drawn.
        runs: one [`ComparisonResult`] per seed, in the order of `seeds`.
        target: fraction of the SingleReward-to-oracle gap that MiCRo + Stage 2 should close on every context.
        seconds: wall time of all seeds (training, adaptation and scoring; the backbone does not run).
        reported_adaptation: adaptation pairs per context of the adaptive methods in the main table.
        leave_one_out: `{context: {method: per_context_accuracy dict}}`, Stage 1 trained without that context's pairs
            (`comparison.leave_one_context_out`, first seed).
    """

    name: str
    title: str
    description: str
    num_heads: int
    seeds: list[int]
    runs: list[ComparisonResult]
    target: float | None = None
    seconds: float = 0.0
    files: dict = field(default_factory=dict)
    reported_adaptation: int | None = None
    leave_one_out: dict = field(default_factory=dict)

    @property
    def contexts(self) -> list[str]:
        return list(self.runs[0].accuracy[SINGLE]["accuracy"])

    @property
    def largest_adaptation(self) -> int:
        return self.reported_adaptation or max(self.runs[0].adaptation[MICRO_ADAPTED])

    @property
    def methods(self) -> list[str]:
        """The methods of this benchmark's table (diagnostics aside), in the comparison's order."""
        return [method for method in self.runs[0].accuracy if method not in DIAGNOSTICS]

    def accuracy_runs(self, methods=None) -> dict:
        """`{method: [per_context_accuracy of each seed]}`."""
        methods = methods or list(self.runs[0].accuracy)
        return {method: [run.accuracy[method] for run in self.runs] for method in methods}

    def mean_accuracy(self, method: str, context: str) -> float:
        return float(np.mean([run.accuracy[method]["accuracy"][context] for run in self.runs]))

    def gap_closed(self, method: str, context: str) -> float:
        """Gap closed on `context`, from the seed means (see the module docstring)."""
        return gap_closed(
            self.mean_accuracy(method, context),
            self.mean_accuracy(SINGLE, context),
            self.mean_accuracy(ORACLE, context),
        )

    def gap_closed_per_seed(self, method: str, context: str) -> list[float]:
        return [
            gap_closed(
                run.accuracy[method]["accuracy"][context],
                run.accuracy[SINGLE]["accuracy"][context],
                run.accuracy[ORACLE]["accuracy"][context],
            )
            for run in self.runs
        ]

    def adaptation_rows(self) -> list[dict]:
        rows = []
        for method in self.runs[0].adaptation:
            per_size = {
                size: [run.adaptation[method][size] for run in self.runs] for size in self.runs[0].adaptation[method]
            }
            rows += adaptation_curve(per_size, method=method, include_summary=False)
        return rows

    def first_seed_head_usage(self) -> dict:
        """`{label: head_usage dict}` of the first seed (head k of one seed is unrelated to head k of another)."""
        return {f"{label}, seed {self.seeds[0]}": usage for label, usage in self.runs[0].head_usage.items()}

    def meets_target(self, method: str) -> bool | None:
        """Whether `method` closes the target share of the gap on every context; None without a target or a gap."""
        gaps = [self.gap_closed(method, context) for context in self.contexts]
        if self.target is None or not all(math.isfinite(gap) for gap in gaps):
            return None
        return all(gap >= self.target for gap in gaps)


PLOT_FILES = {  # files key -> file-name suffix of the benchmark's plots
    "accuracy_plot": "accuracy",
    "adaptation_plot": "adaptation",
    "router_usage_plot": "router_usage",
    "online_usage_plot": "online_usage",
}


def outcome_files(results_dir: Path, name: str) -> dict[str, Path]:
    """The paths of one benchmark's files under `results_dir`: its JSON and Markdown reports and its plots."""
    stem = Path(results_dir) / name
    return {
        "json": stem.with_suffix(".json"),
        "markdown": stem.with_suffix(".md"),
        **{key: stem.with_name(f"{name}_{suffix}.png") for key, suffix in PLOT_FILES.items()},
    }


def _keys_as_ints(value):
    """Mapping keys that JSON turned into strings of integers (adaptation sizes) back into integers."""
    if isinstance(value, dict):
        restore = bool(value) and all(isinstance(key, str) and key.isdigit() for key in value)
        return {(int(key) if restore else key): _keys_as_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_keys_as_ints(item) for item in value]
    return value


def load_outcome(json_path: Path) -> tuple[BenchmarkOutcome, dict] | None:
    """
    The [`BenchmarkOutcome`] a benchmark's JSON report holds (its `outcome` entry) and the record's `settings` and
    `generated` stamp, or None for a report written before outcomes were recorded. Used by `run_all.py --resume`.
    """
    record = json.loads(Path(json_path).read_text(encoding="utf-8")).get("outcome")
    if record is None:
        return None
    fields = _keys_as_ints({key: record[key] for key in record if key not in ("runs", "settings", "generated")})
    fields["leave_one_out"] = record.get("leave_one_out", {})  # keyed by context names
    runs = [ComparisonResult(**_keys_as_ints(run)) for run in record["runs"]]
    outcome = BenchmarkOutcome(**fields, runs=runs)
    outcome.files = outcome_files(Path(json_path).parent, outcome.name)
    return outcome, {"settings": record["settings"], "generated": record["generated"]}


def outcome_record(outcome: BenchmarkOutcome, settings: dict, generated: str) -> dict:
    """What [`load_outcome`] restores: every field of `outcome` but its files, with the settings it ran under."""
    fields = {item.name: getattr(outcome, item.name) for item in dataclasses.fields(outcome) if item.name != "files"}
    return to_jsonable({**fields, "settings": settings, "generated": generated})


def write_outcome_files(
    outcome: BenchmarkOutcome, results_dir: Path, setup: dict, settings: dict | None = None, generated: str = ""
) -> dict:
    """
    `<name>.json` / `<name>.md` (evaluation_reports.write_report) and the PNG plots of one benchmark; returns the paths. The
    JSON also records the outcome itself with `settings` (what it depends on) and `generated`, for `--resume`.
    """
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / outcome.name
    paths = outcome_files(results_dir, outcome.name)
    usage = outcome.first_seed_head_usage()
    results = {
        "title": outcome.title,
        "methods": outcome.accuracy_runs(),
        "reference_methods": {"single": SINGLE, "oracle": ORACLE},
        "adaptation_curves": outcome.adaptation_rows(),
        "head_usage": usage,
        "gap_closed": {
            method: {context: outcome.gap_closed(method, context) for context in outcome.contexts}
            for method in outcome.methods
        },
        "gap_closed_per_seed": {
            method: {context: outcome.gap_closed_per_seed(method, context) for context in outcome.contexts}
            for method in STAGE2_METHODS
        },
        "per_seed_head_accuracy": [run.head_accuracy for run in outcome.runs],
        "subsets": [run.subsets for run in outcome.runs],
        "diagnostics": [run.diagnostics for run in outcome.runs],
        "leave_one_out": outcome.leave_one_out,
        "seconds_per_method": [run.seconds for run in outcome.runs],
        "seeds": outcome.seeds,
        "num_heads": outcome.num_heads,
        "description": outcome.description,
        "setup": setup,
        "outcome": outcome_record(outcome, settings or {}, generated),
    }
    json_path, markdown_path = write_seeded_report(results, stem)
    files = {"json": json_path, "markdown": markdown_path}
    summary = summarize_methods(outcome.accuracy_runs(outcome.methods))
    files["accuracy_plot"] = plot_accuracy_per_context(
        summary["mean"],
        paths["accuracy_plot"],
        std=summary["std"],
        title=f"{outcome.title}: test accuracy per context (mean ± std over {len(outcome.seeds)} seeds)",
    )
    references = {
        name: {context: outcome.mean_accuracy(name, context) for context in outcome.contexts}
        for name in (SINGLE, ORACLE)
    }
    files["adaptation_plot"] = plot_adaptation_curves(
        outcome.adaptation_rows(),
        paths["adaptation_plot"],
        references=references,
        title=f"{outcome.title}: accuracy vs adaptation pairs per context",
    )
    for label, key in ((MICRO_ADAPTED, "router_usage_plot"), (MICRO_ONLINE, "online_usage_plot")):
        entry = next(value for name, value in usage.items() if name.startswith(label))
        files[key] = plot_head_usage_heatmap(
            entry["usage"],
            entry["contexts"],
            paths[key],
            title=f"{outcome.title}: head weights, {label}\n({outcome.largest_adaptation} pairs per context, seed {outcome.seeds[0]})",
        )
    outcome.files = files
    return files


# ------------------------------------------------------------------------------------------------------------ markdown
def _percent(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{100 * value:.1f}"


def _gap(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.2f}"


def _met(outcome: BenchmarkOutcome, context: str) -> str:
    """ "yes" when a Stage 2 variant closes the target share of the gap on `context`; "n/a" when there is no gap."""
    gaps = [outcome.gap_closed(method, context) for method in STAGE2_METHODS]
    if not any(math.isfinite(gap) for gap in gaps):
        return "n/a"
    return "yes" if any(gap >= outcome.target for gap in gaps if math.isfinite(gap)) else "no"


def targets_table(outcomes: list[BenchmarkOutcome]) -> list[str]:
    """One row per benchmark and context: SingleReward, oracle, every Stage 2 variant and its gap closed."""
    rows = []
    for outcome in outcomes:
        for context in outcome.contexts:
            row = [
                outcome.title,
                context,
                _percent(outcome.mean_accuracy(SINGLE, context)),
                _percent(outcome.mean_accuracy(ORACLE, context)),
            ]
            for method in STAGE2_METHODS:
                gaps = [g for g in outcome.gap_closed_per_seed(method, context) if math.isfinite(g)]
                spread = f" [{min(gaps):.2f}, {max(gaps):.2f}]" if len(gaps) > 1 else ""
                row += [
                    _percent(outcome.mean_accuracy(method, context)),
                    _gap(outcome.gap_closed(method, context)) + spread,
                ]
            row += ["–", "–"] if outcome.target is None else [f">= {outcome.target:.1f}", _met(outcome, context)]
            rows.append(row)
    header = ["benchmark", "context", "SingleReward", "Oracle"]
    for method in STAGE2_METHODS:
        header += [STAGE2_SHORT_NAMES[method], "gap closed"]
    header += ["target", "met"]
    return markdown_table(header, rows)


def subset_section(outcome: BenchmarkOutcome) -> list[str]:
    """Accuracy on named subsets of the test pairs (DSP's agreed pairs), seed means, per context."""
    lines = []
    for subset in outcome.runs[0].subsets:
        rows = []
        for method in outcome.runs[0].subsets[subset]:
            if method in DIAGNOSTICS:
                continue
            means = [
                float(np.mean([run.subsets[subset][method]["accuracy"][context] for run in outcome.runs]))
                for context in outcome.contexts
            ]
            rows.append([method, *[_percent(value) for value in means], _percent(float(np.mean(means)))])
        lines += [
            f"#### Test pairs marked `{subset}`",
            "",
            "Accuracy (%) on those pairs alone, mean over seeds (DSP: the pairs whose rejected answer is the "
            "plain one, on which every context agrees).",
            "",
            *markdown_table(["method", *outcome.contexts, "macro"], rows),
            "",
        ]
    return lines


def diagnostics_section(outcome: BenchmarkOutcome) -> list[str]:
    names = {
        "micro_head_agreement": "MiCRo's Stage 1 heads: share of test pairs two heads rank alike (1 = not separated)",
        "hyre_member_disagreement": "HyRe's members: share of test pairs on which at least two members disagree",
        "shared_base_ensemble_disagreement": "Shared-Base Ensemble's heads: the same share",
    }
    rows = [
        [text, ", ".join(f"{run.diagnostics[key]:.3f}" for run in outcome.runs)]
        for key, text in names.items()
        if key in outcome.runs[0].diagnostics
    ]
    return ["#### Diagnostics", "", *markdown_table(["per seed", "value"], rows), ""] if rows else []


def leave_one_out_section(outcome: BenchmarkOutcome) -> list[str]:
    """Stage 1 without one context: accuracy and gap closed on that context (first seed)."""
    if not outcome.leave_one_out:
        return []
    methods = [MICRO_ONLINE, MICRO_RESIDUAL, SINGLE_RESIDUAL]
    rows = []
    for context, results in outcome.leave_one_out.items():
        accuracy = {method: result["accuracy"][context] for method, result in results.items()}
        row = [context, _percent(accuracy[SINGLE]), _percent(accuracy[ORACLE])]
        for method in methods:
            row.append(
                f"{_percent(accuracy[method])} ({_gap(gap_closed(accuracy[method], accuracy[SINGLE], accuracy[ORACLE]))})"
            )
        rows.append(row)
    return [
        "#### Leave one context out",
        "",
        f"Stage 1 (SingleReward and MiCRo) trained without any pair of the context in the first column, then Stage 2 "
        f"on that context from {outcome.largest_adaptation} pairs; accuracy (%) on its test pairs and, in brackets, "
        f"the gap closed (seed {outcome.seeds[0]}).",
        "",
        *markdown_table(["context left out", SINGLE, ORACLE, *methods], rows),
        "",
    ]


def outcome_section(outcome: BenchmarkOutcome, document: Path) -> list[str]:
    """The BENCHMARKS.md section of one benchmark: its report's tables (headings demoted), gap table and plots."""
    lines = [f"### {outcome.title}", "", outcome.description, ""]
    generated = Path(outcome.files["markdown"]).read_text(encoding="utf-8").splitlines()
    for line in generated[1:]:  # the first line is the report's own title; its headings go two levels down
        lines.append("##" + line if line.startswith("#") else line)
    lines.append("")
    gap_rows = []
    for method in outcome.methods:
        if method in (SINGLE, ORACLE):
            continue
        gap_rows.append([method, *[_gap(outcome.gap_closed(method, context)) for context in outcome.contexts]])
    lines += [
        "#### Gap closed per context",
        "",
        "(acc - SingleReward) / (Oracle - SingleReward) on the seed-mean accuracies; 1 = oracle, 0 = SingleReward.",
        "",
        *markdown_table(["method", *outcome.contexts], gap_rows),
        "",
    ]
    lines += subset_section(outcome) + diagnostics_section(outcome) + leave_one_out_section(outcome)
    lines += [f"Wall time of the {len(outcome.seeds)} seeds (features cached): {outcome.seconds:.0f} s.", ""]
    for key, caption in (
        ("accuracy_plot", "accuracy per context"),
        ("adaptation_plot", "adaptation curves"),
        ("router_usage_plot", "head weights after router adaptation"),
        ("online_usage_plot", "head weights of online routing"),
    ):
        relative = Path(os.path.relpath(outcome.files[key], document.parent)).as_posix()
        lines += [f"![{outcome.title}: {caption}]({relative})", ""]
    return lines


# ------------------------------------------------------------------------------------------------------------ document
SETUP_TEXT = """\
**Backbone and features.** Every method uses the same frozen backbone and the same cached features, read with the
library's default readouts (`MiCRoConfig.reward_readout`, `router_readout`): what the reward heads read of each
response and what the router reads of its prompt, computed once per sequence and cached on disk
(`benchmarks.harness.pair_pool`, `trl_micro.feature_cache`). All training goes through the project's trainers
(`MiCRoRewardTrainer`, `RouterAdaptationTrainer`) on those cached features (`freeze_backbone=True`); the backbone
never runs during the comparison.

**Where the context goes (our choice, following the paper).** Stage 1 is mixture modeling on ordinary binary
preferences: it never sees a context label or text, so every method's training pairs are scored *without* their
context (`x + y`). Stage 2 is where the context comes in. Router adaptation puts the context text in the prompt
(`"<context>\\n\\n" + prompt`, the model's `context_template`, as `trl-micro eval` and inference do) and fine-tunes the
router on a few labelled pairs; MiCRo Stage 1 is also scored that way (its router reads the context zero-shot). The
id-based Stage 2 methods (online routing, HyRe) and the context-blind baselines score pairs without the context text:
they know the context by its id. Because MiCRo's heads read the same single forward pass as the router, a context
in the prompt also shifts the features the heads read (they were trained without it); the diagnostic row
"SingleReward, context in prompt" measures the size of that shift on a context-blind model.

**Methods.** SingleReward: one Bradley-Terry (BT) head. StaticMixture: K heads, one learned weight vector
(`use_router=False`), mixture BT loss. Shared-Base Ensemble: K heads each with its own BT loss
(`loss_type="ensemble"`), averaged. HyRe: the ensemble's heads reweighted per context from its adaptation pairs,
w_k ∝ exp(sum_i logsigmoid(delta_k,i)) (an `OnlineRouter` with a uniform prior computes exactly this). MiCRo Stage 1:
K heads + a linear router on the prompt, mixture BT loss with the head-usage balance regularizer. MiCRo + router
adaptation: `RouterAdaptationTrainer` on the adaptation pairs of all contexts at once (heads and backbone frozen),
with the likelihood the plan's router settings name (`adaptation_likelihood`: "context" fits one latent head per
context, `trl_micro.losses.context_mixture_bt_loss`; "pair" the per-pair mixture likelihood).
MiCRo + online routing: one `OnlineRouter` posterior per context id, prior = the Stage-1 router's mean weights over
the context's adaptation prompts (context in the prompt), updated with the adaptation pairs' head margins (eta = 1,
exact Bayes). MiCRo + online routing + residual heads: online routing plus, per context, a `ResidualHeads` correction
u_c . h(x, y) on the backbone's reward features, the maximum a posteriori fit on the adaptation pairs with the routed
margins held fixed and its L2 weight chosen by 4-fold cross-validation on those same pairs
(`trl_micro.personalization.residual_heads`): it can move a context beyond what any mixture of the heads gives. Oracle: one BT head
per context trained on that context's training pairs (it knows every training pair's context: the paper's upper
bound, for a reward that is linear in the features). Adaptive methods are reported with the largest number of
adaptation pairs per context; their curves show the smaller, nested draws. Three
diagnostics (not methods): SingleReward scored with the context in the prompt; the best Stage-1 head of each context,
chosen on the test pairs themselves (the ceiling of any routing that gives a context one head); and an oracle with
MiCRo's own architecture, K heads + router trained per context. MiCRo's routed reward sum_k w_k(x) r_k(x, y) is not
linear in the features (the weights depend on the prompt), so MiCRo can beat the linear BT oracle, and the gap closed
can exceed 1.

**Seeds.** Every seed changes the head and router initialization, the training order, and which evaluation pairs
adapt and which test (a stratified draw); the training pairs of a pool are the same for every seed. Spreads are
sample standard deviations over seeds."""


def _machine_table(machine: dict) -> list[str]:
    rows = [[key, str(value)] for key, value in machine.items()]
    return markdown_table(["", "value"], rows)


def _timings_table(timings, lora, with_performance: bool = True) -> list[str]:
    rows = [
        [f"features of pool `{name}` (tokenize + load or compute)", f"{seconds:.0f}"]
        for name, seconds in timings.pools.items()
    ]
    rows += [[f"comparison `{name}` (all seeds)", f"{seconds:.0f}"] for name, seconds in timings.benchmarks.items()]
    if with_performance:
        rows.append(["performance figures", f"{timings.performance:.0f}"])
    if lora is not None:
        rows.append(["LoRA run (tuning + tuned features + two comparisons)", f"{timings.lora:.0f}"])
    rows.append(["**total**", f"**{timings.total:.0f}**"])
    return markdown_table(["step", "wall time (s)"], rows)


def _verdicts(outcomes: list[BenchmarkOutcome]) -> list[str]:
    lines = []
    for outcome in outcomes:
        if outcome.target is None:
            continue
        parts = []
        for method in STAGE2_METHODS:
            gaps = {context: outcome.gap_closed(method, context) for context in outcome.contexts}
            shown = ", ".join(f"{context} {_gap(gap)}" for context, gap in gaps.items())
            verdict = {True: "meets", False: "misses", None: "cannot be judged on"}[outcome.meets_target(method)]
            parts.append(f"{method}: {verdict} it ({shown})")
        undefined = [c for c in outcome.contexts if not math.isfinite(outcome.gap_closed(MICRO_ADAPTED, c))]
        note = (
            f" No gap to close on {', '.join(undefined)}: the oracle is not above SingleReward there."
            if undefined
            else ""
        )
        lines.append(
            f"- **{outcome.title}** (target: close >= {outcome.target:.0%} of the gap on every context, "
            f"{outcome.largest_adaptation} adaptation pairs per context). " + "; ".join(parts) + "." + note
        )
        lines += _extra_verdicts(outcome)
    return lines


def _extra_verdicts(outcome: BenchmarkOutcome) -> list[str]:
    """Unseen context wordings (target 60% of the gap), the mixture against residual heads alone, agreed pairs."""
    lines = []
    if MICRO_ADAPTED_UNSEEN in outcome.methods:
        gaps = {context: outcome.gap_closed(MICRO_ADAPTED_UNSEEN, context) for context in outcome.contexts}
        met = all(math.isfinite(gap) and gap >= 0.6 for gap in gaps.values())
        lines.append(
            f"  - {MICRO_ADAPTED_UNSEEN} (target >= 60% of the gap per context): "
            + ", ".join(f"{context} {_gap(gap)}" for context, gap in gaps.items())
            + (": met." if met else ": not met.")
        )
    micro, single = MICRO_RESIDUAL, SINGLE_RESIDUAL
    if single in outcome.methods:
        macro = {
            name: float(np.mean([outcome.mean_accuracy(name, context) for context in outcome.contexts]))
            for name in (micro, single)
        }
        lines.append(
            f"  - {micro} {_percent(macro[micro])} against {single} {_percent(macro[single])} macro: the "
            f"mixture {'adds' if macro[micro] > macro[single] else 'does not add'} to the per-context "
            "correction."
        )
    for subset in outcome.runs[0].subsets:
        per_context = {
            context: {
                name: float(np.mean([run.subsets[subset][name]["accuracy"][context] for run in outcome.runs]))
                for name in (SINGLE, MICRO_ONLINE)
            }
            for context in outcome.contexts
        }
        below = [context for context, values in per_context.items() if values[MICRO_ONLINE] < values[SINGLE]]
        lines.append(
            f"  - On the `{subset}` test pairs, {MICRO_ONLINE} is "
            + (f"below {SINGLE} on {', '.join(below)}." if below else f"never below {SINGLE}.")
        )
    return lines


def _performance_section(performance: dict | None) -> list[str]:
    lines = ["## Performance", ""]
    if performance is None:
        return lines + ["Not measured in this run (`--skip_performance`).", ""]
    epoch = performance["epoch"]
    lines += [
        f"Stage 1, frozen backbone, one epoch over {epoch.num_pairs} {performance['epoch_data']} pairs (batch 8, "
        "K = 4), same machine, same moment:",
        "",
        *markdown_table(
            ["path", "seconds"],
            [
                ["slow path (`use_feature_cache=False`): backbone on every step", f"{epoch.slow_epoch_seconds:.2f}"],
                ["feature cache: one-off backbone pass, before the first epoch", f"{epoch.cache_build_seconds:.2f}"],
                ["feature cache: each epoch", f"{epoch.cached_epoch_seconds:.3f}"],
            ],
        ),
        "",
        f"Each cached epoch is {epoch.speedup:.0f}x faster than a slow-path epoch; the cache pays for itself after "
        f"{epoch.cache_build_seconds / max(epoch.slow_epoch_seconds - epoch.cached_epoch_seconds, 1e-9):.1f} epochs.",
        "",
        "Reward scoring, MiCRo against a plain single-head reward model on the same backbone "
        "(`benchmarks/performance/reward_overhead.py`, run by this benchmark; its report follows):",
        "",
    ]
    lines += demote_headings(performance["overhead"].splitlines()[1:])  # its title is replaced by the sentence above
    for name, lead in (
        ("grpo_step", "The whole GRPO step (`benchmarks/performance/grpo_step.py`):"),
        (
            "feature_store",
            "The per-sequence feature store against the per-pair cache it replaced "
            "(`benchmarks/performance/feature_store.py`):",
        ),
        (
            "serving",
            "`trl-micro serve` against in-process scoring, and feedback across a crash (`benchmarks/performance/serving.py`):",
        ),
    ):
        if performance.get(name):
            lines += ["", lead, "", *demote_headings(performance[name].splitlines()[1:])]
    lines += ["", "At GPU scale (`benchmarks/performance/gpu_performance.py`: Llama-3.2-1B and 3B shapes, bf16):", ""]
    if performance.get("gpu_performance"):
        lines += demote_headings(performance["gpu_performance"].splitlines()[1:])
    else:
        lines.append(
            "Not measured yet: no GPU was available to this project's sessions. The script runs in one "
            "command of a few minutes on one GPU with only torch, transformers and peft installed; CI runs it "
            "at a tiny shape on the CPU."
        )
    return lines + [""]


def _lora_section(lora: dict | None, document: Path) -> list[str]:
    lines = ["## LoRA-tuned backbone", ""]
    if lora is None:
        return lines + [
            "Not run in this report. `python -m benchmarks.harness.run_all --lora` adds it: MiCRo Stage 1 with a LoRA adapter "
            "on the backbone (`peft_config`), trained on the hh_relabeled training pairs without context, merged; "
            "then the same comparison on features of the tuned backbone, next to the frozen backbone on the same "
            "training pairs. It uses the single-GPU configuration when a GPU is present and a small CPU configuration "
            "otherwise.",
            "",
        ]
    lines += [
        f"Configuration run: {lora['tuning'].describe()}. LoRA Stage 1 took {lora['tuning_seconds']:.0f} s and the "
        f"tuned backbone's features {lora['feature_seconds']:.0f} s. Both comparisons below use the same "
        f"{lora['train_pairs_per_context']} training pairs per context and the same evaluation draws.",
        "",
    ]
    for outcome in lora["outcomes"].values():
        lines += outcome_section(outcome, document)
    return lines


def render_document(
    plan,
    outcomes,
    performance,
    lora,
    timings,
    machine,
    command,
    date,
    output: Path,
    studies: list[Path] = (),
    rl_reports: list[Path] = (),
    service_reports: list[Path] = (),
    resumed: dict[str, str] | None = None,
) -> str:
    """
    The text of BENCHMARKS.md; `studies`, `rl_reports` and `service_reports`: the reports its Studies, RL and serving
    sections embed (none: no section);
    `resumed`: `{comparison: when it ran}` for the outcomes `--resume` reused.
    """
    lora_outcomes = list(lora["outcomes"].values()) if lora else []
    results_dir = Path(
        os.path.relpath(Path((outcomes + lora_outcomes)[0].files["json"]).parent, output.parent)
    ).as_posix()
    regenerate = (
        "Regenerate with the same command"
        if plan.lora_only
        else "Regenerate with `make benchmark` (frozen backbone) or add `--lora`"
    )
    lines = [
        "# trl-micro benchmarks" + (": the LoRA run" if plan.lora_only else ""),
        "",
        f"Generated by `{command}` on {date}. {regenerate}; do not edit by hand. Per-benchmark JSON and Markdown "
        f"reports and every plot are in `{results_dir}/`.",
        "",
        "## How this was run",
        "",
        f"- Environment: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}`, niceness {machine.get('nice')}, "
        f"{machine['torch_threads']} torch threads.",
        f"- Backbone: `{plan.model}` ({'SmolLM2-135M-Instruct, bundled' if plan.model == 'embedded' else 'custom'}), "
        f"{'frozen' if lora is None else 'frozen, plus a LoRA-tuned copy (see the last section)'}.",
        f"- Seeds: {', '.join(map(str, plan.seeds))}.",
        f"- Machine load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in machine['load_average_start'])}, "
        f"at end {tuple(round(x, 2) for x in machine['load_average_end'])}: the machine is shared, so wall times "
        "include other people's jobs.",
        *(
            [
                "- Reused from earlier runs with the same settings (`--resume`), so not in the wall times below: "
                + ", ".join(f"`{name}` (run {when})" for name, when in resumed.items())
                + "."
            ]
            if resumed
            else []
        ),
        "",
        *_machine_table({k: v for k, v in machine.items() if not k.startswith("load_average")}),
        "",
        "Wall times:",
        "",
        *_timings_table(timings, lora, with_performance=performance is not None),
        "",
        "## Setup",
        "",
        SETUP_TEXT,
        "",
        "Pools:",
        "",
        *[f"- `{name}`: {spec.describe()}." for name, spec in plan.pools.items()],
        "",
        f"Training: heads (and router) {plan.comparison.heads}; router adaptation {plan.comparison.router}; "
        f"adaptation sizes {list(plan.comparison.adaptation_sizes)} pairs per context; online routing eta "
        f"{plan.comparison.online_eta}.",
        "",
        "## Targets",
        "",
        "Gap closed = (acc - SingleReward) / (Oracle - SingleReward) per context, on seed-mean accuracies; in "
        "brackets the range over seeds. `met`: at least one MiCRo Stage 2 variant reaches the target on that context.",
        "",
        *targets_table(outcomes + lora_outcomes),
        "",
        *_verdicts(outcomes + lora_outcomes),
        "",
        "## Results",
        "",
    ]
    if not plan.lora_only:
        for outcome in outcomes:
            lines += outcome_section(outcome, output)
        lines += _performance_section(performance)
    if studies:
        lines += embedded_section(STUDIES, list(studies), output)
    if rl_reports:
        lines += embedded_section(RL, list(rl_reports), output)
    if service_reports:
        lines += embedded_section(SERVICE, list(service_reports), output)
    lines += _lora_section(lora, output)
    return "\n".join(lines).rstrip("\n") + "\n"
