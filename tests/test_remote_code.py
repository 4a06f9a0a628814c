"""
Self-contained checkpoints: a saved MiCRo model loads where trl_micro cannot be imported (transformers' custom code,
`trust_remote_code=True`), and TRL's own `trl grpo` / `trl rloo` train with it; the bad inputs around that.
"""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trl_micro
from trl_micro import MiCRoRewardModel

from .conftest import CONTEXTS
from .rl_fixtures import CPU_FLAGS, TINY_GRPO_FLAGS, policy_path, prompt_dataset, reward_checkpoint  # noqa: F401

TRL = str(Path(sys.executable).parent / "trl")
CODE_FILES = ("configuration_micro.py", "modeling_micro.py")
PROMPTS = [
    [{"role": "system", "content": CONTEXTS[taste]}, {"role": "user", "content": "Question number 3?"}]
    for taste in ("short", "long")
]
COMPLETIONS = ["Sure.", "Here is a detailed answer that walks through every step carefully."]

# Scores the GRPO way (prompt + completion rendered by the chat template, right-padded, no prompt boundary given) and
# with explicit prompt lengths, in a process where importing trl_micro fails.
SCORE_WITHOUT_TRL_MICRO = """
import json, sys
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

path, prompts, completions = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
try:
    AutoModelForSequenceClassification.from_pretrained(path)
    refused = None
except ValueError as error:
    refused = str(error)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(path)
texts = [tokenizer.apply_chat_template(p + [{"role": "assistant", "content": c}], tokenize=False)
         for p in prompts for c in completions]
inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
prompt_lengths = torch.tensor([len(tokenizer.apply_chat_template(p, add_generation_prompt=True, return_dict=True)
                                   ["input_ids"]) for p in prompts for _ in completions])
with torch.no_grad():
    by_text = model(**inputs)
    by_lengths = model(**inputs, prompt_lengths=prompt_lengths)
auto_model = type(AutoModel.from_pretrained(path, trust_remote_code=True)).__name__
print("RESULT", json.dumps({
    "class": type(model).__module__ + "." + type(model).__name__, "auto_model": auto_model, "refused": refused,
    "trl_micro_loaded": any(name.split(".")[0] == "trl_micro" for name in sys.modules),
    "input_ids": inputs["input_ids"].tolist(), "attention_mask": inputs["attention_mask"].tolist(),
    "prompt_lengths": prompt_lengths.tolist(),
    "by_text": {key: getattr(by_text, key).tolist() for key in ("logits", "head_rewards", "mixture_weights")},
    "by_lengths": {key: getattr(by_lengths, key).tolist() for key in ("logits", "head_rewards", "mixture_weights")},
}))
"""


def run_checked(command, env, cwd, timeout=600):
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def assert_scored_alike(model, remote: dict) -> dict:
    """`model` scores the rows `SCORE_WITHOUT_TRL_MICRO` scored (`remote`, its RESULT) as that process did, both ways;
    returns the local outputs."""
    input_ids, attention_mask = torch.tensor(remote["input_ids"]), torch.tensor(remote["attention_mask"])
    with torch.no_grad():
        local = {
            "by_text": model(input_ids=input_ids, attention_mask=attention_mask),
            "by_lengths": model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                prompt_lengths=torch.tensor(remote["prompt_lengths"]),
            ),
        }
    for way, output in local.items():
        for key in ("logits", "head_rewards", "mixture_weights"):
            torch.testing.assert_close(torch.tensor(remote[way][key]), getattr(output, key), rtol=0, atol=1e-6)
    return local


def test_modeling_files_import_only_each_other():
    """What a checkpoint carries must run without trl_micro: torch, transformers and each other, relative imports."""
    package = Path(trl_micro.__file__).parent
    for name in CODE_FILES:
        for node in ast.walk(ast.parse((package / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                assert f"{node.module}.py" in CODE_FILES, (name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                assert all(
                    module.split(".")[0]
                    in {
                        "__future__",
                        "json",
                        "os",
                        "warnings",
                        "dataclasses",
                        "typing",
                        "torch",
                        "transformers",
                        "huggingface_hub",
                        "peft",  # imported only where a LoRA run's folder is loaded (it holds a PEFT adapter)
                    }
                    for module in modules
                ), (name, modules)


def test_checkpoint_loads_without_trl_micro_and_scores_the_same(
    reward_checkpoint,
    no_trl_micro,
    tmp_path,  # noqa: F811
):
    saved = json.loads((Path(reward_checkpoint) / "config.json").read_text())
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_micro.MiCRoConfig",
        "AutoModel": "modeling_micro.MiCRoRewardModel",
        "AutoModelForSequenceClassification": "modeling_micro.MiCRoRewardModel",
    }
    assert all((Path(reward_checkpoint) / name).exists() for name in CODE_FILES)

    result = run_checked(
        [
            sys.executable,
            "-c",
            SCORE_WITHOUT_TRL_MICRO,
            reward_checkpoint,
            json.dumps(PROMPTS),
            json.dumps(COMPLETIONS),
        ],
        no_trl_micro,
        tmp_path,
    )
    remote = json.loads(result.stdout.split("RESULT", 1)[1])  # after transformers' (unanswered) question
    assert remote["class"].startswith("transformers_modules.") and remote["class"].endswith(".MiCRoRewardModel")
    assert remote["auto_model"] == "MiCRoRewardModel" and not remote["trl_micro_loaded"]
    assert "trust_remote_code=True" in remote["refused"]

    assert_scored_alike(MiCRoRewardModel.from_pretrained(reward_checkpoint).eval(), remote)
    # Routed on the prompt: the two contexts (system messages) weight the heads differently.
    weights = torch.tensor(remote["by_text"]["mixture_weights"])
    assert (weights[0] - weights[len(COMPLETIONS)]).abs().max() > 1e-3


def test_an_older_checkpoint_without_code_loads_in_trl_micro_and_says_how_to_add_it(
    reward_checkpoint,
    tmp_path,  # noqa: F811
):
    old = tmp_path / "old"
    shutil.copytree(reward_checkpoint, old)
    config = json.loads((old / "config.json").read_text())
    del config["auto_map"]
    (old / "config.json").write_text(json.dumps(config))
    for name in CODE_FILES:
        (old / name).unlink()
    advice = r"saved without its modeling code.*save_pretrained\(new_path\).*--trust_remote_code"
    with pytest.warns(UserWarning, match=advice):
        model = MiCRoRewardModel.from_pretrained(old)
    model.save_pretrained(tmp_path / "new")
    assert "auto_map" in json.loads((tmp_path / "new" / "config.json").read_text())
    assert all((tmp_path / "new" / name).exists() for name in CODE_FILES)


def test_another_architecture_is_refused_by_the_micro_loaders(tokenizer, tmp_path):
    from trl_micro.scripts.cli import main as cli_main
    from trl_micro.testing_utils import save_tiny_backbone

    from .conftest import make_conflicting_pairs

    backbone = save_tiny_backbone(str(tmp_path / "backbone"), tokenizer)
    with pytest.raises(ValueError, match=r"not a MiCRo checkpoint \(model_type='llama'\).*from_backbone"):
        MiCRoRewardModel.from_pretrained(backbone)
    make_conflicting_pairs(4).to_json(tmp_path / "pairs.jsonl")
    with pytest.raises(ValueError, match=r"not a MiCRo checkpoint \(model_type='llama'\)"):
        cli_main(
            [
                "eval",
                "--model_name_or_path",
                backbone,
                "--dataset_name",
                str(tmp_path / "pairs.jsonl"),
                "--output_dir",
                str(tmp_path / "eval"),
            ]
        )


@pytest.fixture(scope="module")
def prompts_folder(tmp_path_factory):
    """A local dataset (a folder with train.jsonl, as `datasets.load_dataset` reads it): contexts as system messages."""
    folder = tmp_path_factory.mktemp("prompts")
    with open(folder / "train.jsonl", "w") as file:
        for row in prompt_dataset(4):
            file.write(json.dumps({"prompt": [{"role": "system", "content": row["context"]}, *row["prompt"]]}) + "\n")
    return str(folder)


def trl_command(trainer, policy, reward, prompts, output_dir, *extra):
    return [
        TRL,
        trainer,
        "--model_name_or_path",
        policy,
        "--reward_model_name_or_path",
        reward,
        "--dataset_name",
        prompts,
        "--output_dir",
        str(output_dir),
        *TINY_GRPO_FLAGS,
        *CPU_FLAGS,
        *extra,
    ]


@pytest.mark.parametrize("trainer", ["grpo", "rloo"])
def test_trl_cli_trains_with_the_checkpoint_as_reward_model(
    trainer,
    reward_checkpoint,
    policy_path,
    prompts_folder,
    no_trl_micro,
    tmp_path,  # noqa: F811
):
    command = trl_command(
        trainer, policy_path, reward_checkpoint, prompts_folder, tmp_path / "out", "--trust_remote_code"
    )
    result = run_checked(command, no_trl_micro, tmp_path)
    name = Path(reward_checkpoint).name
    steps = [line for line in result.stdout.splitlines() if f"'rewards/{name}/mean'" in line]
    assert len(steps) == 2, result.stdout[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_trl_cli_without_trust_remote_code_says_what_to_pass(
    reward_checkpoint,
    policy_path,
    prompts_folder,
    no_trl_micro,
    tmp_path,  # noqa: F811
):
    command = trl_command("grpo", policy_path, reward_checkpoint, prompts_folder, tmp_path / "out")
    result = subprocess.run(
        command, capture_output=True, text=True, env=no_trl_micro, cwd=tmp_path, timeout=600, stdin=subprocess.DEVNULL
    )
    assert result.returncode != 0
    assert "contains custom code" in result.stderr and "trust_remote_code=True" in result.stderr
    assert "ImportError" not in result.stderr  # trl_micro was never needed
