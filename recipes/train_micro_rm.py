"""
Stage 1: train a MiCRo reward model (K Bradley-Terry heads + router) on preference pairs. The code is
`trl_micro/scripts/train.py`, installed as `trl-micro train` (which launches it through accelerate itself).

    accelerate launch recipes/train_micro_rm.py \
        --model_name_or_path embedded --dataset_name trl-micro/synthetic \
        --num_heads 4 --freeze_backbone --output_dir outputs/micro-rm

    # LoRA on the backbone, DeepSpeed ZeRO-3 (GPU config as is; on CPU add --mixed_precision no --num_processes 2
    # to accelerate and --ddp_backend gloo to the script):
    accelerate launch --config_file recipes/accelerate_configs/zero3.yaml recipes/train_micro_rm.py \
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name data/prefs.jsonl \
        --use_peft --lora_r 16 --output_dir outputs/micro-rm-lora

In a checkout, the built-in real datasets read the checkout's ../shared/data unless TRL_MICRO_DATA_DIR says otherwise.
"""

import os
from pathlib import Path

CHECKOUT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if CHECKOUT_DATA.is_dir():
    os.environ.setdefault("TRL_MICRO_DATA_DIR", str(CHECKOUT_DATA))

from trl_micro.scripts.train import main, make_parser  # noqa: E402

if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
