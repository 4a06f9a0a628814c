"""
The MiCRo reward model of the RL runs in benchmarks/rl/results/short_runs.md: the embedded SmolLM2-135M-Instruct, frozen, with K heads and
a router trained on conversational synthetic preferences (each context as the system message).

    python -m benchmarks.rl.short_runs.train_reward_model outputs/micro-rm-smollm2 [PAIRS_PER_SUBPOPULATION]
"""

import sys

from trl_micro import MiCRoRewardConfig, MiCRoRewardModel, MiCRoRewardTrainer
from trl_micro.bundled.embedded import embedded_model_path
from trl_micro.bundled.synthetic import SyntheticPreferenceConfig, generate_synthetic_preferences


def main(output_dir: str, num_heads: int = 2, pairs_per_subpopulation: int = 160):
    data = generate_synthetic_preferences(
        SyntheticPreferenceConfig(num_pairs_per_subpopulation=pairs_per_subpopulation, conversational=True, seed=1)
    )
    args = MiCRoRewardConfig(
        output_dir=output_dir,
        num_heads=num_heads,
        freeze_backbone=True,
        num_train_epochs=30,
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        logging_steps=20,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    model = MiCRoRewardModel.from_backbone(embedded_model_path(), num_heads=num_heads)
    trainer = MiCRoRewardTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model(output_dir)
    print({key: value for key, value in trainer.state.log_history[-2].items()})


if __name__ == "__main__":
    main(sys.argv[1], pairs_per_subpopulation=int(sys.argv[2]) if len(sys.argv) > 2 else 160)
