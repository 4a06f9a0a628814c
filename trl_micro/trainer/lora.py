r"""
PEFT adapters (LoRA and the other methods that wrap layers) on MiCRo reward models, as TRL's reward trainer takes them.

The heads and the router are MiCRo's reward head (TRL's `score`): they are trained and saved in full beside the
adapter (`modules_to_save`) and never wrapped themselves. `prepare_peft_config` completes a config to that effect
(and infers `target_modules` from the backbone's model type, as PEFT does for the backbone's own classes);
`check_peft_model` checks a `PeftModel` built elsewhere.

A LoRA run's folder (adapter, MiCRo `config.json` and modeling code, tokenizer) loads like a full checkpoint:

    model = MiCRoRewardModel.from_pretrained("micro-rm-lora")  # base model + adapter, merged

and `python -m trl_micro.trainer.lora micro-rm-lora micro-rm` writes that merged model and its tokenizer as a full
checkpoint (`merge_lora_run`), which loads anywhere without peft.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os

from transformers import AutoTokenizer

from ..modeling_micro import MiCRoRewardModel, is_lora_run

logger = logging.getLogger(__name__)

TRAINED_MODULES = ("heads", "router")  # trained in full and saved beside the adapter
TRL_HEAD_NAMES = ("score", "classifier")  # what TRL's documentation and PEFT's SEQ_CLS task call the reward head


def _names(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def prepare_peft_config(peft_config, model: MiCRoRewardModel):
    """
    A copy of `peft_config` ready for `get_peft_model(model, ...)` on a MiCRo model (`peft_config` is left as given):

    - no `target_modules` (PEFT infers them from the model type, which for a MiCRo model is `"micro"`): the targets
      PEFT would pick for the backbone's own model type (`q_proj`, `v_proj` for Llama, Qwen2, ...);
    - `heads` and `router` in `modules_to_save` and in `exclude_modules`: trained in full and saved with the adapter,
      never wrapped. TRL's name for the reward head, `score` (and PEFT's `classifier`), in `modules_to_save` or
      `target_modules`, means them and is dropped.

    Prompt-learning methods (prefix tuning, prompt tuning, ...) are refused: they prepend virtual tokens, which moves
    the prompt boundary the router reads.
    """
    from peft import PeftConfig

    if not isinstance(peft_config, PeftConfig):
        raise TypeError(
            f"`peft_config` must be a `peft.PeftConfig` instance (e.g. `peft.LoraConfig`), got {type(peft_config).__name__}."
        )
    if getattr(peft_config, "is_prompt_learning", False):
        raise ValueError(
            f"`peft_config` is a prompt-learning method ({peft_config.peft_type}), which MiCRoRewardTrainer does not "
            "support: its virtual tokens move the prompt boundary the router reads. Use LoRA (peft.LoraConfig) or "
            "another method that wraps layers."
        )
    if not hasattr(peft_config, "modules_to_save"):
        raise ValueError(
            f"`peft_config` ({peft_config.peft_type}) has no `modules_to_save`, so the heads and router could not train "
            "and be saved beside the adapter. Use LoRA (peft.LoraConfig) or another method with `modules_to_save`."
        )
    config = copy.deepcopy(peft_config)
    modules_to_save = [name for name in _names(config.modules_to_save) if name not in TRL_HEAD_NAMES]
    config.modules_to_save = sorted(set(modules_to_save) | set(TRAINED_MODULES))
    if hasattr(config, "exclude_modules"):
        config.exclude_modules = sorted(set(_names(config.exclude_modules)) | set(TRAINED_MODULES))
    targets = config.target_modules if hasattr(config, "target_modules") else None
    if isinstance(targets, (list, set, tuple)):
        dropped = [name for name in targets if name in TRL_HEAD_NAMES]
        if dropped and len(dropped) == len(targets):
            raise ValueError(
                f"`peft_config.target_modules` names only the reward head ({dropped}), which MiCRo trains in full "
                "(heads and router). To train them alone, pass no `peft_config` and set `freeze_backbone=True`; to "
                "adapt the backbone too, name its modules (or leave `target_modules` unset)."
            )
        if dropped:
            logger.info(f"`peft_config.target_modules`: {dropped} is the reward head, which MiCRo trains in full.")
            config.target_modules = [name for name in targets if name not in TRL_HEAD_NAMES]
    if (
        hasattr(config, "target_modules")
        and not config.target_modules
        and not getattr(config, "target_parameters", None)
    ):
        config.target_modules = backbone_target_modules(config, model)
    return config


def backbone_target_modules(peft_config, model: MiCRoRewardModel) -> list[str]:
    """The modules PEFT targets by default for the backbone's model type (its `target_module_mapping`)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    backbone_type = model.config.text_config.model_type
    tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_config.peft_type)
    mapping = getattr(tuner, "target_module_mapping", None) or {}
    targets = mapping.get(backbone_type)
    if not targets:
        raise ValueError(
            f"`peft_config` has no `target_modules`, and PEFT has no default targets of {peft_config.peft_type} for "
            f"the backbone's model type {backbone_type!r}. Set `target_modules` (e.g. ['q_proj', 'v_proj'] or "
            "'all-linear')."
        )
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    logger.info(f"`peft_config.target_modules` inferred from the backbone ({backbone_type}): {targets}.")
    return targets


def check_peft_model(model) -> MiCRoRewardModel:
    """
    The MiCRo model under a `PeftModel`, after checking that every adapter trains and saves the heads and the router
    in full (`modules_to_save`: without them the adapter would not carry the reward heads it trained) and is not a
    prompt-learning method. Errors say how to build one (`prepare_peft_config`).
    """
    base = model.get_base_model()
    if not isinstance(base, MiCRoRewardModel):
        raise TypeError(
            f"`model` is a PeftModel over {type(base).__name__}, not over a MiCRoRewardModel. Merge the adapter "
            "(`model.merge_and_unload()`), wrap the merged backbone with `MiCRoRewardModel.from_backbone(...)` and "
            "pass that with a `peft_config`."
        )
    fix = (
        "Build it with `get_peft_model(micro_model, prepare_peft_config(LoraConfig(...), micro_model))` "
        "(trl_micro.trainer.prepare_peft_config), or pass the MiCRo model and a `peft_config` to the trainer."
    )
    for name, config in model.peft_config.items():
        if getattr(config, "is_prompt_learning", False):
            raise ValueError(
                f"The PeftModel's adapter {name!r} is a prompt-learning method ({config.peft_type}): its virtual "
                "tokens move the prompt boundary the router reads. Use LoRA or another method that wraps layers."
            )
        missing = [module for module in TRAINED_MODULES if module not in _names(config.modules_to_save)]
        if missing:
            raise ValueError(
                f"The PeftModel's adapter {name!r} does not train and save {missing} (`modules_to_save` is "
                f"{config.modules_to_save}): a MiCRo adapter carries its heads and router. {fix}"
            )
    return base


def merge_lora_run(run_dir: str | os.PathLike, output_dir: str | os.PathLike) -> MiCRoRewardModel:
    """Load a LoRA run's folder (its base model with the adapter merged) and save it, with its tokenizer, as a full
    MiCRo checkpoint in `output_dir`. Returns the merged model."""
    if not is_lora_run(run_dir):
        raise ValueError(
            f"{run_dir} is not a LoRA run's folder (an adapter_config.json beside a MiCRo config.json, no model "
            "weights), as MiCRoRewardTrainer saves with a `peft_config`."
        )
    model = MiCRoRewardModel.from_pretrained(run_dir)
    model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(run_dir).save_pretrained(output_dir)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m trl_micro.trainer.lora",
        description="Merge a MiCRo LoRA run (adapter, heads and router) into a full checkpoint with its tokenizer.",
    )
    parser.add_argument("run_dir", help="the LoRA run's folder, as MiCRoRewardTrainer saved it")
    parser.add_argument("output_dir", help="where to write the merged checkpoint")
    options = parser.parse_args(argv)
    merge_lora_run(options.run_dir, options.output_dir)
    print(f"Merged {options.run_dir} into {options.output_dir}")


if __name__ == "__main__":
    main()
