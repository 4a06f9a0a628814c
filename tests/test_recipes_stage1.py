"""The Stage 1 recipe under `accelerate launch` with 2 CPU processes: plain DDP, ZeRO-2 and ZeRO-3."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import trl_micro
from trl_micro.testing_utils import save_tiny_backbone

from .conftest import REPO_ROOT, make_conflicting_pairs

ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def launch(script, config, num_processes, *script_args, timeout=900):
    command = [ACCELERATE, "launch", "--num_processes", str(num_processes), "--mixed_precision", "no"]
    if config is not None:
        command += ["--config_file", str(REPO_ROOT / "recipes" / "accelerate_configs" / config)]
    command += [str(REPO_ROOT / "recipes" / script), *script_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, (
        f"{' '.join(command)}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"
    )
    return result


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp.yaml", "zero2.yaml", "zero3.yaml"])
def test_recipe_trains_and_saves_a_loadable_model_on_two_processes(tokenizer, tmp_path, config):
    backbone = save_tiny_backbone(str(tmp_path / "backbone"), tokenizer)
    data = tmp_path / "pairs.jsonl"
    make_conflicting_pairs(32).to_json(str(data))
    output_dir = tmp_path / "micro"
    distributed = ["--ddp_backend", "gloo", "--use_cpu"]
    launch(
        "train_micro_rm.py",
        config,
        2,
        "--model_name_or_path",
        backbone,
        "--dataset_name",
        str(data),
        "--num_heads",
        "3",
        "--output_dir",
        str(output_dir),
        "--per_device_train_batch_size",
        "4",
        "--num_train_epochs",
        "1",
        "--learning_rate",
        "1e-2",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        *distributed,
    )
    model = AutoModelForSequenceClassification.from_pretrained(output_dir)
    assert isinstance(model, trl_micro.MiCRoRewardModel) and model.config.num_heads == 3
    ids = torch.tensor([tokenizer("Question number 3: how do I cook rice?\nSure.<|im_end|>")["input_ids"]])
    out = model(input_ids=ids, prompt_lengths=torch.tensor([ids.shape[1] - 3]))
    assert torch.isfinite(out.logits).all() and out.head_rewards.shape == (1, 3)
    untrained = trl_micro.MiCRoRewardModel.from_backbone(backbone, num_heads=3)
    assert not torch.allclose(model.backbone.norm.weight, untrained.backbone.norm.weight)
