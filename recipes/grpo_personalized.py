"""
GRPO (or RLOO: `--trainer rloo`) on a MiCRo personalized reward: each completion is rewarded as its row's context
(or user) would. The code is `trl_micro/scripts/grpo.py`, installed as `trl-micro grpo` / `trl-micro rloo`.

    python recipes/grpo_personalized.py --reward_model_path outputs/micro-rm --output_dir outputs/grpo-personalized

    accelerate launch --config_file recipes/accelerate_configs/zero3.yaml \
        recipes/grpo_personalized.py --reward_model_path outputs/micro-rm --output_dir outputs/grpo-personalized
"""

from trl_micro.scripts.grpo import main, parse

if __name__ == "__main__":
    main(*parse())
