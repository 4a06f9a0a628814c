"""
The report of the RL personalization benchmark (`benchmarks/rl/rl_personalization.py`): per context and method, the mean
and spread over seeds of the gold reward before and after training, of the win rate over the initial policy and of
the KL to it; the curves over steps (one PNG per context, the methods on it, and kl.png), the cross-context matrix
(cross_context.png); the Markdown and JSON files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from trl_micro.evaluation_reports import markdown_table, new_figure, save_figure, write_report

METHOD_LABELS = {"micro": "MiCRo (Stage 2 routing)", "single": "SingleReward", "gold": "gold (ceiling)"}
CEILING_GAP = 0.05  # how far below the gold-trained policy's win rate the MiCRo-trained one may stay
CAP_LIMIT = 0.20  # the share of answers cut at the budget below which the budget leaves the tastes room
CURVE_PANELS = (
    ("gold", "gold reward (mean)"),
    ("win_rate", "win rate over the initial policy"),
    ("tokens", "tokens per completion"),
    ("cap_share", "share cut at the completion budget"),
)


def spread(values: Sequence[float | None]) -> dict:
    """Mean, sample std (0 for one value) and count of the values that are not None."""
    array = np.asarray([value for value in values if value is not None], dtype=np.float64)
    if not len(array):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0, "n": len(array)}


def runs_of(runs: list[dict], method: str) -> list[dict]:
    return [run for run in runs if run["method"] == method]


def training_curve(runs: list[dict], key: str, window: int) -> dict:
    """
    `{"steps", "mean"}`: the logged `key` (absent on steps that drew no prompt of its context), its trailing mean over
    `window` steps, averaged over the runs.
    """
    series = [{entry["step"]: entry[key] for entry in run["log"] if key in entry} for run in runs]
    steps = sorted(set().union(*series))

    def trailing(values: dict, step: int) -> float:
        recent = [value for logged, value in values.items() if step - window < logged <= step]
        return float(np.mean(recent)) if recent else float("nan")

    means = [float(np.nanmean([trailing(values, step) for values in series])) for step in steps]
    return {"steps": steps, "mean": means}


def summarize(runs: list[dict], window: int) -> dict:
    """
    `{"table": {context: {method: {metric: spread}}}, "curves": {method: [{step, metric: {context: spread}}]},
    "training_gold": {method: {context: training_curve}}}`, the last over `window` steps.
    """
    methods = list(dict.fromkeys(run["method"] for run in runs))
    contexts = list(runs[0]["points"][0]["gold"])
    table = {context: {} for context in contexts}
    curves, training_gold = {}, {}
    for method in methods:
        own = runs_of(runs, method)
        for context in contexts:
            table[context][method] = {
                "gold_before": spread([run["points"][0]["gold"][context] for run in own]),
                "gold_after": spread([run["points"][-1]["gold"][context] for run in own]),
                "win_rate_before": spread([run["points"][0]["win_rate"][context] for run in own]),
                "win_rate_after": spread([run["points"][-1]["win_rate"][context] for run in own]),
                "words_before": spread([run["points"][0]["words"][context] for run in own]),
                "words_after": spread([run["points"][-1]["words"][context] for run in own]),
                "tokens_before": spread([run["points"][0]["tokens"][context] for run in own]),
                "tokens_after": spread([run["points"][-1]["tokens"][context] for run in own]),
                "cap_share_after": spread([run["points"][-1]["cap_share"][context] for run in own]),
                "kl_last": spread([run["points"][-1].get("kl") for run in own]),
                "cross_win_rate": {
                    judge: spread([run["points"][-1]["cross_win_rate"][context][judge] for run in own])
                    for judge in contexts
                },
            }
        steps = [point["step"] for point in own[0]["points"]]
        training_gold[method] = {context: training_curve(own, f"gold/{context}", window) for context in contexts}
        curves[method] = []
        for index, step in enumerate(steps):
            row = {"step": step, "kl": spread([run["points"][index].get("kl") for run in own])}
            for metric, _ in CURVE_PANELS:
                row[metric] = {
                    context: spread([run["points"][index][metric][context] for run in own]) for context in contexts
                }
            curves[method].append(row)
    return {"contexts": contexts, "methods": methods, "table": table, "curves": curves, "training_gold": training_gold}


def cell(value: dict, digits: int = 2) -> str:
    if value["mean"] is None:
        return "n/a"
    if value["n"] > 1:
        return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"
    return f"{value['mean']:.{digits}f}"


def plot_context(summary: dict, context: str, path: Path, window: int) -> Path:
    """
    Held-out gold mean, win rate and words against the step, one line per method (shaded ± std over seeds), and the
    gold mean on the training samples (trailing mean over `window` steps, mean over seeds).
    """
    labels = [label for _, label in CURVE_PANELS] + [f"gold on training samples ({window}-step mean)"]
    figure = new_figure(4.0 * len(labels) + 1.5, 3.6)
    panels = figure.subplots(1, len(labels), squeeze=False)[0]
    for index, method in enumerate(summary["methods"]):
        rows = summary["curves"][method]
        steps = np.asarray([row["step"] for row in rows])
        for panel, (metric, _) in zip(panels, CURVE_PANELS):
            mean = np.asarray([row[metric][context]["mean"] for row in rows], dtype=np.float64)
            std = np.asarray([row[metric][context]["std"] for row in rows], dtype=np.float64)
            panel.plot(steps, mean, marker="o", markersize=3, color=f"C{index}", label=METHOD_LABELS[method])
            panel.fill_between(steps, mean - std, mean + std, color=f"C{index}", alpha=0.15)
        training = summary["training_gold"][method][context]
        panels[-1].plot(training["steps"], training["mean"], color=f"C{index}")
    panels[1].axhline(0.5, color="grey", linestyle="--", linewidth=1)
    for panel, label in zip(panels, labels):
        panel.set_xlabel("GRPO step")
        panel.set_title(label, fontsize=10)
        panel.grid(alpha=0.3)
    handles, names = panels[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside right upper", frameon=False)
    figure.suptitle(f"{context}: held-out prompts, judged by the gold reward of {context}")
    return save_figure(figure, path)


def plot_kl(summary: dict, path: Path) -> Path:
    """Mean logged KL to the initial policy between evaluations, one line per method."""
    figure = new_figure(6.5, 3.6)
    panel = figure.subplots()
    for index, method in enumerate(summary["methods"]):
        rows = [row for row in summary["curves"][method] if row["kl"]["mean"] is not None]
        if rows:
            steps = [row["step"] for row in rows]
            panel.plot(
                steps,
                [row["kl"]["mean"] for row in rows],
                marker="o",
                markersize=3,
                color=f"C{index}",
                label=METHOD_LABELS[method],
            )
    panel.set_xlabel("GRPO step")
    panel.set_ylabel("KL to the initial policy")
    panel.grid(alpha=0.3)
    panel.legend(frameon=False)
    return save_figure(figure, path)


def plot_cross_context(summary: dict, path: Path) -> Path:
    """
    The cross-context matrix at the last evaluation, one panel per method: rows the context the answers were asked
    under, columns the gold that judged them, each cell the win rate over the initial policy (mean over seeds).
    """
    contexts, methods = summary["contexts"], summary["methods"]
    figure = new_figure(2.2 + 1.3 * len(contexts) * len(methods), 1.2 + 0.9 * len(contexts))
    panels = figure.subplots(1, len(methods), squeeze=False)[0]
    for panel, method in zip(panels, methods):
        matrix = np.asarray(
            [
                [summary["table"][row][method]["cross_win_rate"][column]["mean"] for column in contexts]
                for row in contexts
            ],
            dtype=np.float64,
        )
        image = panel.imshow(matrix, cmap="RdBu", vmin=0.0, vmax=1.0)
        for (row, column), value in np.ndenumerate(matrix):
            panel.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=10)
        panel.set_xticks(range(len(contexts)), [f"judged by\n{context}" for context in contexts], fontsize=8)
        panel.set_yticks(range(len(contexts)), [f"answered under\n{context}" for context in contexts], fontsize=8)
        panel.set_title(METHOD_LABELS[method], fontsize=10)
    figure.colorbar(image, ax=list(panels), label="win rate over the initial policy", shrink=0.9)
    return save_figure(figure, path)


def rewards_paragraph(results: dict) -> str:
    settings, sizes = results["settings"], results["reward_sizes"]
    if results.get("scenario") == "dsp":
        trained = (
            f"MiCRo (K=4) and SingleReward on the {sizes['stage1']} DSP pairs of {settings['stage1_queries']} queries "
            "(every domain, contexts not shown), with the library's default head training; MiCRo's Stage 2 state from "
            f"{settings['adaptation_pairs']} labelled pairs per domain of {settings['adaptation_queries']} other "
            f"queries; the gold, one head per domain on its pairs of {settings['gold_queries']} queries that no other "
            "reward saw; held-out prompts and test pairs from other queries again"
        )
    else:
        trained = (
            f"MiCRo (K={settings['num_contexts']}) and SingleReward on {settings['stage1_pairs']} Stage 1 pairs per "
            "context rated by the topic's owner, contexts not shown; MiCRo's Stage 2 state from "
            f"{settings['adaptation_pairs']} labelled pairs per context; the gold, one head per context on "
            f"{settings['gold_pairs']} pairs of that context that no other reward saw"
        )
    return (
        f"Rewards over one frozen backbone ({results['reward_backbone']}): {trained} "
        f"(benchmarks/rl/personalization_rewards.py). Built in {results['reward_seconds']:.0f} s."
    )


def seeds_sentence(results: dict) -> str:
    """How many seeds each figure averages, and the runs `--report_only` found missing."""
    seeds_of = {}
    for run in results["runs"]:
        seeds_of.setdefault(run["method"], []).append(run["seed"])
    counts = {len(seeds) for seeds in seeds_of.values()}
    if counts == {1}:
        sentence = "One seed: no spread over seeds."
    elif len(counts) == 1:
        sentence = f"Mean ± std over {counts.pop()} seeds."
    else:
        sentence = (
            "Mean ± std over the seeds each method has run ("
            + ", ".join(f"{METHOD_LABELS[method]}: {seeds}" for method, seeds in seeds_of.items())
            + "); a figure without ± is one run."
        )
    missing = results.get("missing_runs") or []
    if missing:
        sentence += (
            " Not run yet: " + ", ".join(f"{METHOD_LABELS[m['method']]} seed {m['seed']}" for m in missing) + "."
        )
    return sentence


def markdown_lines(results: dict, summary: dict, images: dict[str, str]) -> list[str]:
    settings = results["settings"]
    seeds = settings["seeds"]
    completions = settings["prompts_per_step"] * settings["num_generations"]
    lines = [
        f"Command: `{results['command']}`",
        "",
        f"Policy: {results['policy']} (r={settings['lora_r']}, alpha={settings['lora_alpha']}). GRPO (TRL "
        f"GRPOTrainer): {settings['max_steps']} steps of {settings['prompts_per_step']} prompts x "
        f"{settings['num_generations']} completions ({completions} per step) of at most "
        f"{settings['max_completion_length']} tokens, learning rate {settings['learning_rate']}, beta "
        f"{settings['beta']}, temperature {settings['temperature']}; seeds {seeds}, the same prompts and steps for "
        f"every method. {results['train_prompts']} training prompts (prompt x context).",
        "",
        rewards_paragraph(results),
        "",
        f"Evaluation: {results['eval_prompts_per_context']} held-out prompts per context, {settings['eval_samples']} "
        f"samples each, every {settings['eval_every']} steps; win rate against {settings['reference_samples']} samples "
        "per prompt of the initial policy, under that context's gold reward (benchmarks/rl/gold_evaluation.py). "
        + seeds_sentence(results),
        "",
        "## Per context, before and after training",
        "",
    ]
    rows = []
    for context in summary["contexts"]:
        for method in summary["methods"]:
            value = summary["table"][context][method]
            rows.append(
                [
                    context,
                    METHOD_LABELS[method],
                    cell(value["gold_before"]),
                    cell(value["gold_after"]),
                    cell(value["win_rate_after"]),
                    f"{cell(value['words_before'], 1)} → {cell(value['words_after'], 1)}",
                    f"{cell(value['tokens_before'], 1)} → {cell(value['tokens_after'], 1)}",
                    cell(value["cap_share_after"]),
                    cell(value["kl_last"], 3),
                ]
            )
    header = [
        "context",
        "trained against",
        "gold before",
        "gold after",
        "win rate over initial",
        "words before → after",
        "tokens before → after",
        "cap share after",
        f"KL, last {settings['eval_every']} steps",
    ]
    lines += markdown_table(header, rows)
    lines += [
        "",
        "The step-0 win rate (the initial policy against its own reference samples) measures the noise: "
        + ", ".join(
            f"{context} {cell(summary['table'][context][summary['methods'][0]]['win_rate_before'])}"
            for context in summary["contexts"]
        )
        + ".",
        "",
    ]
    lines += cap_share_lines(summary, settings)
    lines += cross_context_lines(summary)
    lines += checks_lines(summary)
    lines += ["## Rewards: accuracy on the test pairs (%)", ""]
    accuracy_rows = [
        [name] + [f"{100 * value['accuracy'][context]:.1f}" for context in summary["contexts"]]
        for name, value in results["reward_accuracy"].items()
    ]
    lines += markdown_table(["reward", *summary["contexts"]], accuracy_rows)
    lines += ["", "## Curves", ""]
    lines += [f"![{name}]({image})" for name, image in images.items()]
    lines += ["", "## Runs", ""]
    lines += markdown_table(
        ["trained against", "seed", "minutes", "s per step (training)", "evaluation minutes"],
        [
            [
                METHOD_LABELS[run["method"]],
                run["seed"],
                f"{run['seconds'] / 60:.1f}",
                f"{run['seconds_per_step']:.1f}",
                f"{run['evaluation_seconds'] / 60:.1f}",
            ]
            for run in results["runs"]
        ],
    )
    return lines


def cap_share_lines(summary: dict, settings: dict) -> list[str]:
    """The share of held-out samples cut at the completion budget, per context and method, at every evaluation."""
    steps = [row["step"] for row in summary["curves"][summary["methods"][0]]]
    rows = [
        [context, METHOD_LABELS[method], *[cell(row["cap_share"][context]) for row in summary["curves"][method]]]
        for context in summary["contexts"]
        for method in summary["methods"]
    ]
    return [
        f"## Completions cut at the budget of {settings['max_completion_length']} tokens",
        "",
        "Share of the held-out samples that end without an end-of-sequence token, at each evaluation (step):",
        "",
        *markdown_table(["context", "trained against", *map(str, steps)], rows),
        "",
    ]


def checks_lines(summary: dict) -> list[str]:
    """
    Per context, whether the policy trained against MiCRo personalizes (on the means over seeds): it wins over its
    initial self (above 0.5), comes within `CEILING_GAP` of the gold-trained policy, wins more under its own context's
    gold than any other cell of its row and column of the cross-context matrix, and leaves fewer than `CAP_LIMIT` of
    its answers cut at the budget. Empty without a MiCRo run.
    """
    if "micro" not in summary["methods"]:
        return []
    contexts, table = summary["contexts"], summary["table"]

    def verdict(passed: bool, detail: str) -> str:
        return f"{'yes' if passed else 'no'} ({detail})"

    rows = []
    for context in contexts:
        micro = table[context]["micro"]
        win = micro["win_rate_after"]["mean"]
        cross = {judge: value["mean"] for judge, value in micro["cross_win_rate"].items()}
        off = [cross[judge] for judge in contexts if judge != context]
        off += [table[other]["micro"]["cross_win_rate"][context]["mean"] for other in contexts if other != context]
        row = [context, verdict(win > 0.5, f"{win:.2f}")]
        if "gold" in summary["methods"]:
            gold = table[context]["gold"]["win_rate_after"]["mean"]
            row.append(verdict(win >= gold - CEILING_GAP, f"{win:.2f} vs {gold:.2f}"))
        else:
            row.append("n/a (no gold run)")
        row.append(verdict(all(cross[context] > value for value in off), f"{cross[context]:.2f} vs max {max(off):.2f}"))
        cap = micro["cap_share_after"]["mean"]
        row.append(verdict(cap < CAP_LIMIT, f"{cap:.2f}"))
        rows.append(row)
    header = [
        "context",
        "wins over its initial self",
        f"within {CEILING_GAP:.2f} of the gold-trained",
        "diagonal above its row and column",
        f"cap share below {CAP_LIMIT:.2f}",
    ]
    return [
        "## Does the MiCRo-trained policy personalize?",
        "",
        f"Per context, at the last evaluation (step {summary['curves']['micro'][-1]['step']}), on the means over seeds; the step-0 win "
        "rate above says how far from 0.5 the noise alone goes.",
        "",
        *markdown_table(header, rows),
        "",
    ]


def cross_context_lines(summary: dict) -> list[str]:
    """At the last evaluation: answers under each context's prompt, win rate over the initial policy by every gold."""
    contexts = summary["contexts"]
    rows = [
        [
            METHOD_LABELS[method],
            context,
            *[cell(summary["table"][context][method]["cross_win_rate"][j]) for j in contexts],
        ]
        for method in summary["methods"]
        for context in contexts
    ]
    return [
        "## Cross-context matrix",
        "",
        "Win rate over the initial policy at the last evaluation of the answers to prompts shown under one context "
        "(row), judged by each context's gold reward (column). Personalization: above 0.5 on the diagonal, not off it "
        "where the tastes conflict (benchmarks/rl/gold_evaluation.py).",
        "",
        *markdown_table(["trained against", "answered under", *[f"judged by {c}" for c in contexts]], rows),
        "",
    ]


def write_outputs(results: dict, output_dir: Path, name: str = "rl_personalization") -> Path:
    """Plots, `<name>.md` and `.json` under `output_dir` (plots prefixed `<name>_` but for the synthetic scenario's
    report); returns the Markdown path."""
    window = results["settings"]["eval_every"]
    summary = summarize(results["runs"], window)
    prefix = "" if name == "rl_personalization" else f"{name}_"
    images = {}
    for context in summary["contexts"]:
        images[context] = plot_context(summary, context, output_dir / f"{prefix}curves_{context}.png", window).name
    images["KL to the initial policy"] = plot_kl(summary, output_dir / f"{prefix}kl.png").name
    images["cross-context matrix"] = plot_cross_context(summary, output_dir / f"{prefix}cross_context.png").name
    _, markdown_path = write_report(
        {**results, "summary": summary}, output_dir / name, markdown_lines(results, summary, images)
    )
    return markdown_path
