r"""
The `trl-micro` command, built like TRL's `trl`: `trl-micro train | adapt | grpo | rloo | ppo` run the package's
scripts (`trl_micro/scripts/<name>.py`, the code of the recipes in `recipes/`) through `accelerate launch`;
`trl-micro eval | demo | serve | users | rerank` run in this process.

    trl-micro train --model_name_or_path embedded --dataset_name trl-micro/synthetic --output_dir outputs/micro-rm
    trl-micro grpo --accelerate_config zero3 --num_processes 8 --reward_model_path outputs/micro-rm ...

As with `trl grpo`, the arguments a script does not know go to `accelerate launch` (`--config_file`, `--num_processes`,
`--mixed_precision`, ...), and `--accelerate_config NAME` picks a config shipped with trl-micro (`ddp`, `zero2`,
`zero3`, in `trl_micro/accelerate_configs/`), one shipped with TRL, or a file.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import yaml
from accelerate.commands.launch import launch_command, launch_command_parser
from transformers import HfArgumentParser
from trl.cli.accelerate_config import resolve_accelerate_config_argument

from ..trainer.base_config import require_deepspeed

# command: (module in trl_micro.scripts, arguments put in front of the user's, keyword arguments of make_parser)
LAUNCHED = {
    "train": ("train", [], {}),
    "adapt": ("adapt", [], {}),
    "grpo": ("grpo", ["--trainer", "grpo"], {"trainer": "grpo"}),
    "rloo": ("grpo", ["--trainer", "rloo"], {"trainer": "rloo"}),
    "ppo": ("ppo", [], {}),
}
HELP = {
    "train": "Stage 1: train a MiCRo reward model",
    "adapt": "Stage 2: adapt the router to contexts from a few labelled pairs",
    "eval": "score a checkpoint per context, adapt online routing, write the report",
    "grpo": "GRPO on the personalized reward",
    "rloo": "RLOO on the personalized reward",
    "ppo": "PPO on the personalized reward (TRL 1.12, the `ppo` extra)",
    "demo": "SingleReward vs MiCRo on synthetic subpopulations",
    "serve": "serve a checkpoint's rewards over HTTP (OpenRLHF, verl, feedback)",
    "users": "the user store: import, export, rebuild, delete, info",
    "rerank": "personalized best-of-n: each user's pick among a prompt's candidates (JSONL)",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    in_process = {
        "demo": run_demo_command,
        "eval": run_eval_command,
        "serve": run_serve_command,
        "users": run_users_command,
        "rerank": run_rerank_command,
    }
    if not argv or argv[0] not in (*LAUNCHED, *in_process):
        usage = "\n".join(f"  {name:<6} {text}" for name, text in HELP.items())
        print(f"usage: trl-micro {{{','.join(HELP)}}} [--help]\n\n{usage}", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    if argv[0] in in_process:
        return in_process[argv[0]](argv[1:])
    try:
        launch_script(argv[0], argv[1:])
    except subprocess.CalledProcessError as error:  # the script's own error is already on stderr
        return error.returncode
    return 0


def shipped_accelerate_config(name: str) -> Path | None:
    """The accelerate config `name` (e.g. `zero3`) shipped with trl-micro, or `None`."""
    path = Path(str(resources.files("trl_micro").joinpath("accelerate_configs", f"{name}.yaml")))
    return path if path.is_file() else None


def resolve_accelerate_config(launch_args: list[str]) -> list[str]:
    """`--accelerate_config NAME` -> `--config_file <path>`: trl-micro's configs first, then TRL's or a file."""
    if "--accelerate_config" in launch_args:
        index = launch_args.index("--accelerate_config")
        name = launch_args[index + 1] if index + 1 < len(launch_args) else None
        shipped = shipped_accelerate_config(name) if name and not Path(name).is_file() else None
        if shipped is not None:
            return ["--config_file", str(shipped), *launch_args[:index], *launch_args[index + 2 :]]
    return resolve_accelerate_config_argument(launch_args)


def launch_arguments(command: str, argv: list[str]) -> list[str]:
    """
    The `accelerate launch` command line of `trl-micro <command> <argv>`: `argv` split into the script's arguments and
    accelerate's, as `trl <command>` splits them (the script's parser takes what it knows, accelerate the rest).
    """
    module_name, leading_args, parser_kwargs = LAUNCHED[command]
    if "--deepspeed" in argv:
        require_deepspeed("`--deepspeed`")
    module = importlib.import_module(f"trl_micro.scripts.{module_name}")
    parser = module.make_parser(prog=f"trl-micro {command}", **parser_kwargs)
    *_, config_remaining, cli_remaining = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    launch_args = resolve_accelerate_config(config_remaining + cli_remaining)
    check_launch_config(launch_args)
    script_args = [*leading_args, *without_subsequence(argv, cli_remaining)]
    return [*launch_args, "--module", f"trl_micro.scripts.{module_name}", *script_args]


def without_subsequence(argv: list[str], subsequence: list[str]) -> list[str]:
    """`argv` without the elements of `subsequence` (which occur in `argv` in that order), the others in order."""
    kept, position = [], 0
    for argument in argv:
        if position < len(subsequence) and argument == subsequence[position]:
            position += 1
        else:
            kept.append(argument)
    if position < len(subsequence):
        raise ValueError(f"{subsequence} is not a subsequence of {argv}.")
    return kept


def check_launch_config(launch_args: list[str]) -> None:
    """A DeepSpeed accelerate config (`distributed_type: DEEPSPEED`) needs DeepSpeed installed: say which extra."""
    if "--config_file" not in launch_args:
        return
    path = Path(launch_args[launch_args.index("--config_file") + 1])
    config = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    if isinstance(config, dict) and str(config.get("distributed_type", "")).upper() == "DEEPSPEED":
        require_deepspeed(f"The accelerate config {path.name} (distributed_type: DEEPSPEED)")


def launch_script(command: str, argv: list[str]) -> None:
    """Run `trl-micro <command> <argv>` through `accelerate launch` (raises `CalledProcessError` if it fails)."""
    launch_command(launch_command_parser().parse_args(launch_arguments(command, argv)))


def run_demo_command(argv: list[str]) -> int:
    from ..evaluation_reports import ensure_writable
    from .demo import DemoArguments, format_results, run_demo

    (args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv)
    if args.output_json:
        ensure_writable(args.output_json)
    results = run_demo(args)
    print(format_results(results))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


def run_serve_command(argv: list[str]) -> int:
    from .serve import main as serve_main

    return serve_main(argv)


def run_users_command(argv: list[str]) -> int:
    from .users import main as users_main

    return users_main(argv)


def run_rerank_command(argv: list[str]) -> int:
    from .rerank import main as rerank_main

    return rerank_main(argv)


def run_eval_command(argv: list[str]) -> int:
    from .eval import main as eval_main

    return eval_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
