"""
The report of the best-of-n benchmark (`benchmarks/rl/best_of_n.py`): `best_of_n.md` and `.json`, the plot of the
win rate against n per reader (`best_of_n.png`), and the checks of the issue's goals on the means over seeds.
"""

from __future__ import annotations

from pathlib import Path

from trl_micro.evaluation_reports import markdown_table
from trl_micro.evaluation_reports import write_report as write_files

METHOD_NAMES = {
    "micro": "MiCRo (Stage 2 routing)",
    "micro_residual": "MiCRo + residual heads",
    "single": "SingleReward",
    "single_residual": "SingleReward + residual heads",
    "gold": "gold (ceiling)",
}
PLOTTED = ("micro", "single", "single_residual", "gold")
POLICY = {"embedded": "SmolLM2-135M-Instruct (embedded)", "tiny": "a tiny random Llama (smoke: not a result)"}
CEILING_GAP = 0.05  # MiCRo's best of n within this of the gold's
DIFFERENT_TASTE = 0.5  # a reader whose gold correlates below this with the other readers' mean differs from the average


def cell(value: dict, digits: int = 2) -> str:
    if value.get("n", 1) > 1:
        return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"
    return f"{value['mean']:.{digits}f}"


def checks(scenarios: dict, n_max: int) -> list[dict]:
    """The issue's goals, per reader, on the means over seeds at the largest n: each a dict with `met`."""
    found = []
    for scenario, result in scenarios.items():
        methods = result["methods"]
        for reader in result["readers"]:
            micro = methods["micro"]["win_rate"][reader][str(n_max)]["mean"]
            gold = methods["gold"]["win_rate"][reader][str(n_max)]["mean"]
            single = methods["single"]["win_rate"][reader][str(n_max)]["mean"]
            found.append(
                {
                    "scenario": scenario,
                    "reader": reader,
                    "goal": f"MiCRo's best of {n_max} above 0.5",
                    "value": f"{micro:.2f}",
                    "met": micro > 0.5,
                }
            )
            found.append(
                {
                    "scenario": scenario,
                    "reader": reader,
                    "goal": f"within {CEILING_GAP:.2f} of the gold's best of {n_max}",
                    "value": f"{micro:.2f} vs {gold:.2f}",
                    "met": gold - micro <= CEILING_GAP,
                }
            )
            if result["taste_correlation"][reader] < DIFFERENT_TASTE:
                found.append(
                    {
                        "scenario": scenario,
                        "reader": reader,
                        "goal": "above SingleReward (a taste that differs from the average)",
                        "value": f"{micro:.2f} vs {single:.2f}",
                        "met": micro > single,
                    }
                )
            matrix = methods["micro"]["cross_reader"]
            diagonal = matrix[reader][reader]["mean"]
            column = [matrix[other][reader]["mean"] for other in result["readers"] if other != reader]
            found.append(
                {
                    "scenario": scenario,
                    "reader": reader,
                    "goal": "cross-reader: own picks above every other reader's picks under this reader's gold",
                    "value": f"{diagonal:.2f} vs max {max(column):.2f}",
                    "met": diagonal > max(column),
                }
            )
    return found


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(scenario, reader) for scenario, result in results["scenarios"].items() for reader in result["readers"]]
    columns = min(3, len(panels))
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False, sharey=True)
    ns = results["settings"]["ns"]
    for axis, (scenario, reader) in zip(axes.flat, panels):
        methods = results["scenarios"][scenario]["methods"]
        for method in PLOTTED:
            curve = [methods[method]["win_rate"][reader][str(n)] for n in ns]
            means = [point["mean"] for point in curve]
            spread = [point["std"] for point in curve]
            axis.plot(ns, means, marker="o", label=METHOD_NAMES[method])
            axis.fill_between(
                ns, [m - s for m, s in zip(means, spread)], [m + s for m, s in zip(means, spread)], alpha=0.15
            )
        axis.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        axis.set_xscale("log", base=2)
        axis.set_xticks(ns, [str(n) for n in ns])
        axis.set_title(f"{scenario}: {reader}", fontsize=10)
        axis.set_xlabel("n (best of n)")
    for axis in axes[:, 0]:
        axis.set_ylabel("gold win rate over a random candidate")
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def caveat_lines(results: dict) -> list[str]:
    """What the figures do not cover: the gold's reading, the parts of the pools used, the spread shown."""
    settings = results["settings"]
    lines = [
        "What the figures are. The gold heads are the RL benchmark's recipe (one Bradley-Terry head per reader on that "
        "reader's own pairs, queries no other reward saw) but read the bare prompt, as the candidates were sampled and "
        "as the rewards read them, not the reader's message. The ± is the spread over the rewards' training seeds "
        "only: every seed ranks the same few prompts' candidates, so the spread over prompts, which dominates with "
        "this few, is not in it.",
        "",
    ]
    used = []
    if settings.get("stage1_used"):
        used.append(f"synthetic Stage 1 on {settings['stage1_used']} pairs per taste (of {settings['stage1_pairs']})")
    if settings.get("gold_used"):
        used.append(f"synthetic gold on {settings['gold_used']} pairs per taste (of {settings['gold_pairs']})")
    if settings.get("stage1_queries_used"):
        used.append(f"DSP Stage 1 on {settings['stage1_queries_used']} queries (of {settings['stage1_queries']})")
    if settings.get("gold_queries_used"):
        used.append(f"DSP gold on {settings['gold_queries_used']} queries (of {settings['gold_queries']})")
    if used:
        lines += [
            "**Reduced reward pools**: " + "; ".join(used) + ". The split, and so the held-out prompts and the 32 "
            "Stage 2 pairs per reader, are the RL benchmark's.",
            "",
        ]
    return lines


def rewrite(json_path: str | Path) -> Path:
    """Write the report and plot again from a `best_of_n.json` (no model is loaded)."""
    import json

    path = Path(json_path)
    results = json.loads(path.read_text())
    results.pop("checks", None)
    return write_report(results, path.parent, path.stem)


def report_lines(results: dict, plot_name: str) -> list[str]:
    settings = results["settings"]
    ns = settings["ns"]
    n_max = max(ns)
    lines = [f"Command: `{results['command']}`", ""]
    if results.get("partial"):
        lines += [
            "**Partial run** (`--partial`): the report covers the held-out prompts whose candidates were sampled when "
            "it was written (counts below), not every held-out prompt.",
            "",
        ]
    lines += [
        f"Candidates: {POLICY[settings['models']]}, {settings['pool_size']} per prompt at temperature 1, a budget "
        f"of {settings['max_new_tokens']} tokens, sampled once without any reader's message and shared by every "
        "reader. Each reward picks the best of n per prompt and reader (`MiCRoReward.rerank`); the reader's gold "
        "judges the pick against a random candidate of the same prompt (ties count 1/2; 0.5 at n = 1 by "
        "construction). Best of n below the pool size is averaged exactly over the pool's n-subsets. MiCRo and "
        f"SingleReward: mean ± std over {len(settings['seeds'])} training seeds; the gold is one set of heads.",
        "",
        f"![win rate against n per reader]({plot_name})",
        "",
        *caveat_lines(results),
        "## Candidates",
        "",
    ]
    rows = []
    for scenario, result in results["scenarios"].items():
        rows.append(
            [
                scenario,
                f"{result['prompts']} of {result['held_out_prompts']}",
                result["pool_size"],
                f"{result['pool_tokens']['mean']:.0f}",
                f"{result['cut_share']:.2f}",
                f"{result['sampling_seconds'] / 60:.0f}",
            ]
        )
    lines += markdown_table(
        ["scenario", "prompts sampled", "candidates each", "mean tokens", "share cut at the budget", "sampling (min)"],
        rows,
    )
    lines += ["", f"## Gold win rate of the best of {n_max} over a random candidate", ""]
    readers = [(scenario, reader) for scenario, result in results["scenarios"].items() for reader in result["readers"]]
    rows = []
    for method in METHOD_NAMES:
        row = [METHOD_NAMES[method]]
        for scenario, reader in readers:
            row.append(cell(results["scenarios"][scenario]["methods"][method]["win_rate"][reader][str(n_max)]))
        rows.append(row)
    lines += markdown_table(["method", *[f"{s}: {r}" for s, r in readers]], rows)
    lines += ["", "## Win rate against n", ""]
    rows = []
    for scenario, reader in readers:
        for method in METHOD_NAMES:
            curve = results["scenarios"][scenario]["methods"][method]["win_rate"][reader]
            rows.append([f"{scenario}: {reader}", METHOD_NAMES[method], *[cell(curve[str(n)]) for n in ns]])
    lines += markdown_table(["reader", "method", *[f"n = {n}" for n in ns]], rows)
    for scenario, result in results["scenarios"].items():
        lines += [
            "",
            f"## Cross-reader matrix ({scenario}, best of {n_max})",
            "",
            "Rows: the reader the picks were made for; columns: the reader whose gold judges them (win rate over a "
            "random candidate). A reward that personalizes has each column's maximum on the diagonal.",
        ]
        for method in ("micro", "single", "gold"):
            matrix = result["methods"][method]["cross_reader"]
            lines += ["", f"{METHOD_NAMES[method]}:", ""]
            rows = [
                [reader, *[cell(matrix[reader][judge]) for judge in result["readers"]]] for reader in result["readers"]
            ]
            lines += markdown_table(["picks for \\ judged by", *result["readers"]], rows)
    lines += ["", f"## Length of the picks (tokens, best of {n_max})", ""]
    rows = []
    for scenario, result in results["scenarios"].items():
        for reader in result["readers"]:
            rows.append(
                [
                    f"{scenario}: {reader}",
                    f"{result['pool_tokens']['mean']:.0f}",
                    *[cell(result["methods"][method]["pick_tokens"][reader], 0) for method in METHOD_NAMES],
                ]
            )
    lines += markdown_table(["reader", "pool mean", *[METHOD_NAMES[m] for m in METHOD_NAMES]], rows)
    lines += ["", "## Goals", ""]
    found = checks(results["scenarios"], n_max)
    rows = [
        [f"{c['scenario']}: {c['reader']}", c["goal"], c["value"], "met" if c["met"] else "**missed**"] for c in found
    ]
    lines += markdown_table(["reader", "goal", "value", "result"], rows)
    taste = ", ".join(
        f"{reader} {value:.2f}"
        for result in results["scenarios"].values()
        for reader, value in result["taste_correlation"].items()
    )
    lines += [
        "",
        f"A reader's taste differs from the average when its gold correlates below {DIFFERENT_TASTE} with the mean of "
        f"the other readers' golds (standardized per prompt) over the candidates: {taste}.",
    ]
    timing = results.get("timing")
    if timing:
        lines += [
            "",
            "## Cost across users",
            "",
            f"Reranking {timing['candidates']} candidates of one prompt with MiCRo (backbone run every time, no "
            f"feature store), alternated {len(timing['1 user']['all'])} times on this machine: 1 user "
            f"{timing['1 user']['min']:.2f} s (median {timing['1 user']['median']:.2f}), 4 users "
            f"{timing['4 users']['min']:.2f} s (median {timing['4 users']['median']:.2f}): ratio "
            f"{timing['ratio_min']:.2f} on the minima, {timing['ratio_median']:.2f} on the medians (goal: at most "
            f"1.2; {'met' if timing['ratio_min'] <= 1.2 else 'missed'}).",
        ]
    lines += ["", "## Settings", "", "```", *[f"{k}: {v}" for k, v in settings.items()], "```"]
    return lines


def write_report(results: dict, output_dir: Path, name: str = "best_of_n") -> Path:
    """Write `<name>.md`, `<name>.json` and `<name>.png` in `output_dir`; returns the Markdown path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    plot(results, output_dir / f"{name}.png")
    results = {**results, "checks": checks(results["scenarios"], max(results["settings"]["ns"]))}
    _, markdown = write_files(results, output_dir / name, report_lines(results, f"{name}.png"))
    return markdown


if __name__ == "__main__":
    import sys

    print(rewrite(sys.argv[1]).read_text())
