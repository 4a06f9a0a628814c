"""The `trl-micro` command: launching the package's scripts through accelerate, and an installed wheel's commands."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trl_micro.scripts.cli import launch_arguments, main, resolve_accelerate_config, shipped_accelerate_config
from trl_micro.scripts.grpo import parse as parse_grpo
from trl_micro.testing_utils import save_tiny_backbone

from .conftest import REPO_ROOT, make_conflicting_pairs


def test_accelerate_config_names_resolve_to_the_shipped_files():
    zero3 = shipped_accelerate_config("zero3")
    assert zero3.parent.name == "accelerate_configs" and "zero_stage: 3" in zero3.read_text()
    assert resolve_accelerate_config(["--num_processes", "2", "--accelerate_config", "zero3"]) == [
        "--config_file",
        str(zero3),
        "--num_processes",
        "2",
    ]
    fsdp = resolve_accelerate_config(["--accelerate_config", "fsdp2"])  # one of TRL's
    assert fsdp[0] == "--config_file" and Path(fsdp[1]).parts[-3:] == ("trl", "accelerate_configs", "fsdp2.yaml")
    with pytest.raises(ValueError, match="nope is neither a file"):
        resolve_accelerate_config(["--accelerate_config", "nope"])


def test_arguments_are_split_between_the_script_and_accelerate_like_trl():
    script = ["--reward_model_path", "rm", "--max_steps", "2", "--output_dir", "out", "--use_cpu", "--bf16", "false"]
    command = launch_arguments("rloo", [*script, "--num_processes", "2", "--accelerate_config", "ddp"])
    module = command.index("--module")
    assert command[:module] == ["--config_file", str(shipped_accelerate_config("ddp")), "--num_processes", "2"]
    assert command[module + 1 :] == ["trl_micro.scripts.grpo", "--trainer", "rloo", *script]
    script_args, training_args, _ = parse_grpo(command[module + 2 :])
    assert script_args.trainer == "rloo" and type(training_args).__name__ == "RLOOConfig"
    assert training_args.max_steps == 2


def test_a_deepspeed_setting_without_deepspeed_names_the_extra(monkeypatch, tmp_path):
    """DeepSpeed is an extra: a ZeRO accelerate config or `--deepspeed` is refused early, naming what to install."""
    from trl_micro.trainer import base_config
    from trl_micro.trainer.micro_config import MiCRoRewardConfig

    monkeypatch.setattr(base_config, "is_deepspeed_available", lambda: False)
    script = ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", str(tmp_path), "--use_cpu"]
    with pytest.raises(
        ImportError, match=r"zero3.yaml \(distributed_type: DEEPSPEED\) needs DeepSpeed.*trl-micro\[deepspeed\]"
    ):
        launch_arguments("train", [*script, "--accelerate_config", "zero3"])
    with pytest.raises(ImportError, match=r"`--deepspeed` needs DeepSpeed.*trl-micro\[deepspeed\]"):
        launch_arguments("grpo", ["--reward_model_path", "rm", "--output_dir", "out", "--deepspeed", "ds.json"])
    with pytest.raises(ImportError, match=r"`deepspeed` \('ds.json'\) needs DeepSpeed"):
        MiCRoRewardConfig(output_dir=str(tmp_path), deepspeed="ds.json", use_cpu=True)
    assert launch_arguments("train", [*script, "--accelerate_config", "ddp"])[0] == "--config_file"  # no DeepSpeed


def test_usage_lists_every_command(capsys):
    assert main([]) == 2
    usage = capsys.readouterr().err
    assert all(command in usage for command in ("train", "adapt", "eval", "grpo", "rloo", "ppo", "demo"))


@pytest.mark.slow
def test_an_installed_wheel_runs_its_commands_outside_the_repository(tokenizer, tmp_path):
    """`pip wheel` (not editable) + install into a folder: `trl-micro train` and `eval` run from elsewhere."""
    source = tmp_path / "source"  # what the package is built from, copied so that no build folder is left behind
    shutil.copytree(REPO_ROOT / "trl_micro", source / "trl_micro", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = (tmp_path / "dist").glob("trl_micro-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    assert {p.name for p in (site / "trl_micro" / "accelerate_configs").iterdir()} >= {
        "ddp.yaml",
        "zero2.yaml",
        "zero3.yaml",
    }
    assert (
        site / "trl_micro" / "model_card" / "templates" / "quick_start.md"
    ).is_file()  # the model card's quick start
    assert not (site / "recipes").exists()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_tiny_backbone(str(elsewhere / "backbone"), tokenizer)  # the commands below name it by its folder
    make_conflicting_pairs(16).to_json(elsewhere / "pairs.jsonl")
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    env.pop("TRL_MICRO_DATA_DIR", None)

    def run(*argv):
        result = subprocess.run(
            [str(site / "bin" / "trl-micro"), *argv],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
        return result

    where = subprocess.run(
        [sys.executable, "-c", "import trl_micro.scripts.train as m; print(m.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert where.stdout.strip().startswith(str(site))
    run(
        "train",
        "--model_name_or_path",
        "backbone",
        "--dataset_name",
        "pairs.jsonl",
        "--num_heads",
        "2",
        "--output_dir",
        "micro-rm",
        "--per_device_train_batch_size",
        "8",
        "--num_train_epochs",
        "1",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--use_cpu",
        "--num_processes",
        "1",
        "--mixed_precision",
        "no",
    )
    checkpoint = elsewhere / "micro-rm"
    assert (checkpoint / "modeling_micro.py").read_text() == (site / "trl_micro" / "modeling_micro.py").read_text()
    assert "#### Head 1" in (checkpoint / "README.md").read_text()
    run(
        "eval",
        "--model_name_or_path",
        "micro-rm",
        "--dataset_name",
        "pairs.jsonl",
        "--context_id_column",
        "taste",
        "--output_dir",
        "eval",
    )
    assert set(json.loads((elsewhere / "eval" / "eval_report.json").read_text())["head_usage"]) == {
        "routed (checkpoint router)"
    }


def test_script_arguments_are_the_command_line_without_accelerates():
    from trl_micro.scripts.cli import without_subsequence

    argv = ["--output_dir", "out", "--num_processes", "2", "--num_heads", "2", "--mixed_precision", "no"]
    accelerate = ["--num_processes", "2", "--mixed_precision", "no"]
    assert without_subsequence(argv, accelerate) == ["--output_dir", "out", "--num_heads", "2"]
    assert without_subsequence(["2", "--x", "2"], ["2"]) == ["--x", "2"]
    with pytest.raises(ValueError, match="not a subsequence"):
        without_subsequence(["--a", "1"], ["--b"])
