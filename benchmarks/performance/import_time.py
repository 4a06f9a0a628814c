"""
How long `import trl_micro` takes, and what it loads, against an earlier revision of the package, in one run.

Each repetition imports the package in a fresh Python process, once from this checkout and once from `--baseline`
(a git revision checked out into a temporary worktree), in alternating order (A B, B A, ...) so that load on the
machine hits both alike; the report gives the median wall time of each and their ratio, and whether the import
loaded any trainer module or transformers' modeling stack.

    python -m benchmarks.performance.import_time [--baseline fde8427] [--repetitions 9] \
        [--output benchmarks/performance/results/import_time.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import command_line

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
# Run with the package's folder first on PYTHONPATH (the installed trl_micro would otherwise win for the baseline).
PROBE = """
import json, sys, time
start = time.perf_counter()
import trl_micro
seconds = time.perf_counter() - start
print(json.dumps({
    "seconds": seconds,
    "file": trl_micro.__file__,
    "trainer": any(name.startswith("trl_micro.trainer") for name in sys.modules),
    "modeling": "transformers.modeling_utils" in sys.modules,
}))
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="fde8427", help="Git revision to compare with (issue 43's 'today').")
    parser.add_argument("--repetitions", type=int, default=9, help="Imports of each, alternating.")
    parser.add_argument("--output", default=str(RESULTS / "import_time.md"), help="Markdown report (.json beside).")
    return parser.parse_args(argv)


def import_once(root: Path) -> dict:
    environment = {**os.environ, "PYTHONPATH": str(root)}
    output = subprocess.run(
        [sys.executable, "-c", PROBE], check=True, capture_output=True, text=True, cwd=root, env=environment
    ).stdout
    measured = json.loads(output.strip().splitlines()[-1])
    if not measured.pop("file").startswith(str(root)):
        raise RuntimeError(f"Imported trl_micro from elsewhere than {root}.")
    return measured


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="trl-micro-import-") as folder:
        baseline_root = Path(folder) / "baseline"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(baseline_root), args.baseline],
            check=True,
            cwd=REPO_ROOT,
            capture_output=True,
        )
        try:
            roots = {"this checkout": REPO_ROOT, f"baseline ({args.baseline})": baseline_root}
            runs = {name: [] for name in roots}
            for repetition in range(args.repetitions):
                order = list(roots) if repetition % 2 == 0 else list(reversed(roots))
                for name in order:
                    runs[name].append(import_once(roots[name]))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline_root)], cwd=REPO_ROOT, check=False)
    medians = {name: statistics.median(run["seconds"] for run in measured) for name, measured in runs.items()}
    current, baseline = medians.values()
    lines = [
        "# `import trl_micro`: time and what it loads",
        "",
        f"Command: `{command_line('benchmarks.performance.import_time', argv if argv is not None else sys.argv[1:])}`",
        "",
        f"Machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}; "
        f"{args.repetitions} fresh processes each, alternating. The machine's load is not controlled: compare the "
        "ratio, measured in one run, rather than the seconds.",
        "",
        "| package | median seconds | loads a trainer module | loads transformers' modeling stack |",
        "|---|---|---|---|",
    ]
    for name, measured in runs.items():
        lines.append(
            f"| {name} | {medians[name]:.2f} | {'yes' if any(r['trainer'] for r in measured) else 'no'} | "
            f"{'yes' if any(r['modeling'] for r in measured) else 'no'} |"
        )
    lines += ["", f"This checkout takes {current / baseline:.2f}x the baseline's time."]
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")
    output.with_suffix(".json").write_text(
        json.dumps({"medians": medians, "ratio": current / baseline, "runs": runs}, indent=2) + "\n"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
