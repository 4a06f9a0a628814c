"""
The trl-micro demo (`make demo`): SingleReward vs MiCRo on synthetic preferences from conflicting subpopulations,
over the embedded SmolLM2-135M-Instruct with a frozen, cached backbone. A few minutes on 2 CPU cores.

    python recipes/demo.py [--num_subpopulations 2 --num_heads 4 ...]     (same as `trl-micro demo ...`)
"""

from trl_micro.scripts.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["demo", *__import__("sys").argv[1:]]))
