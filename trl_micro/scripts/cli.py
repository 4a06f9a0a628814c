"""`trl-micro` command line: `trl-micro demo|eval [--options]` (the other entry points are the recipes)."""

from __future__ import annotations

import sys

from transformers import HfArgumentParser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": run_demo_command, "eval": run_eval_command}
    if not argv or argv[0] not in commands:
        print(f"usage: trl-micro {{{','.join(commands)}}} [--help]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


def run_demo_command(argv: list[str]) -> int:
    from .demo import DemoArguments, format_results, run_demo

    (args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv)
    print(format_results(run_demo(args)))
    return 0


def run_eval_command(argv: list[str]) -> int:
    from .eval import main as eval_main

    return eval_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
