"""
`trl-micro eval`: score a saved MiCRo checkpoint on a preference dataset whose pairs name their context or user, and
write a report (`trl_micro.checkpoint_evaluation` says what is scored, adapted and written).

    trl-micro eval --model_name_or_path outputs/micro-rm --dataset_name trl-micro/hh_relabeled \
        --output_dir outputs/eval [--adaptation_pairs 32]
"""

from __future__ import annotations

import sys

from transformers import HfArgumentParser

from ..checkpoint_evaluation import EvalArguments, format_summary, run_eval


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(args=argv)
    print(format_summary(run_eval(args)))
    return 0
