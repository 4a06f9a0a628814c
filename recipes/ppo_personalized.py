"""
PPO on a MiCRo personalized reward (TRL 1.12, the `ppo` extra: PPOTrainer left TRL in 1.13). The code is
`trl_micro/scripts/ppo.py`, installed as `trl-micro ppo`.

    accelerate launch recipes/ppo_personalized.py --reward_model_path outputs/micro-rm --output_dir outputs/ppo
"""

from trl_micro.scripts.ppo import main, make_parser

if __name__ == "__main__":
    main(*make_parser().parse_args_and_config()[:3])
