"""
Markdown tables of the RL runs' `personalized_rewards.json` (written by the recipes): the logged reward per step (per
context where the trainer logs it) and the held-out probe before and after training.

    python -m benchmarks.rl.short_runs.summarize outputs/grpo outputs/rloo outputs/ppo
"""

import json
import sys
from pathlib import Path

STEP_KEYS = ("rewards/micro_reward/mean", "objective/scores")


def summarize(run_dir: Path) -> str:
    logged = json.loads((run_dir / "personalized_rewards.json").read_text())
    steps = [entry for entry in logged["log_history"] if any(key in entry for key in STEP_KEYS)]
    columns = sorted({key for entry in steps for key in entry if key.startswith("micro/reward/")})
    overall = next(key for key in STEP_KEYS if key in steps[0])
    weights = sorted({key for entry in steps for key in entry if key.startswith("micro/head_weight/")})
    header = ["step", overall, *columns, *weights]
    lines = [f"### {run_dir.name}", "", "| " + " | ".join(header) + " |", "|" + " ---: |" * len(header)]
    for entry in steps:
        values = [entry.get(key) for key in header[1:]]
        cells = [str(entry.get("step", ""))] + ["" if v is None else f"{v:.3f}" for v in values]
        lines.append("| " + " | ".join(cells) + " |")
    probe = logged.get("probe") or {}
    if probe:
        lines += [
            "",
            "Held-out probe, mean reward per context:",
            "",
            "| context | before | after | change |",
            "| --- | ---: | ---: | ---: |",
        ]
        for group in probe["before"]:
            before, after = probe["before"][group], probe.get("after", {}).get(group)
            change = "" if after is None else f"{after - before:+.3f}"
            lines.append(f"| {group} | {before:.3f} | {'' if after is None else f'{after:.3f}'} | {change} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print("\n".join(summarize(Path(path)) for path in sys.argv[1:]))
