"""
What MiCRo costs at GPU scale, each figure a ratio measured in the same run: backbones of Llama-3.2-1B and -3B shape
built from configs with random weights (no Hub access is needed), bf16, SDPA attention.

    python -m benchmarks.performance.gpu_performance                    # on a GPU: 1B and 3B shapes (a few minutes)
    python -m benchmarks.performance.gpu_performance --preset tiny      # on a CPU: a tiny shape, to check the script (CI)

Measured, per shape:
- scoring: the routed MiCRo reward (K = 4 and 10) against `AutoModelForSequenceClassification` (one label) on the
  same backbone and batch: forward time and peak memory;
- the feature pass (`MiCRoRewardModel.compute_features`: one backbone pass and the default readouts of its hidden
  states) in tokens/s against the bare backbone forward;
- one LoRA Stage 1 training step (forward, mixture BT loss, backward, AdamW) with K = 4 heads and a router against the
  same step with a single head (plain BT): time and peak memory.

Needs only torch, transformers and peft: the model code is loaded from trl_micro's configuration_micro.py and
modeling_micro.py without importing the rest of trl_micro (or TRL). Writes a Markdown report and its JSON.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForSequenceClassification, LlamaConfig

from benchmarks import command_line

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = REPO_ROOT / "benchmarks" / "performance" / "results" / "gpu_performance.md"

SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
SHAPES = {
    name: dict(zip(SHAPE_FIELDS, values))
    for name, values in {  # Llama-3.2 shapes (config.json of meta-llama/Llama-3.2-1B and -3B)
        "Llama-3.2-1B": (2048, 8192, 16, 32, 8, 64, 128256),
        "Llama-3.2-3B": (3072, 8192, 28, 24, 8, 128, 128256),
        "tiny": (64, 128, 2, 4, 2, 16, 512),
    }.items()
}
PRESETS = {
    "gpu": dict(shapes=["Llama-3.2-1B", "Llama-3.2-3B"], batch=16, length=512, prompt=128, repeats=10),
    "tiny": dict(shapes=["tiny"], batch=4, length=32, prompt=8, repeats=3),
}


def load_micro():
    """trl_micro's configuration_micro and modeling_micro as a package of their own (no TRL, no rest of trl_micro)."""
    package = types.ModuleType("micro_standalone")
    package.__path__ = [str(REPO_ROOT / "trl_micro")]
    sys.modules["micro_standalone"] = package
    return importlib.import_module("micro_standalone.modeling_micro")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device, repeats: int) -> tuple[float, float | None]:
    """Median seconds of `function()` over `repeats` runs after one warm-up, and the peak memory (GiB, GPU only)."""
    function()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(seconds), peak


def build(shape: str, dtype: torch.dtype, device: torch.device):
    """A one-label classifier of the shape with random weights; its `model` is the backbone every measure shares."""
    config = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=4096,
        attn_implementation="sdpa",
        pad_token_id=0,
        tie_word_embeddings=False,
        num_labels=1,
    )
    with torch.device(device):
        classifier = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    return config, classifier.eval()


def measure_shape(shape: str, settings: dict, device: torch.device, dtype: torch.dtype) -> dict:
    modeling = load_micro()
    config, classifier = build(shape, dtype, device)
    backbone = classifier.model
    batch, length, repeats = settings["batch"], settings["length"], settings["repeats"]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, config.vocab_size, (batch, length), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    prompt_lengths = torch.full((batch,), settings["prompt"], device=device)
    results = {"shape": shape, "batch": batch, "length": length}

    with torch.no_grad():
        bare, bare_memory = timed(lambda: backbone(input_ids=input_ids, attention_mask=attention_mask), device, repeats)
        micro4 = modeling.MiCRoRewardModel.from_backbone(backbone, num_heads=4).to(device).eval()
        features, features_memory = timed(
            lambda: micro4.compute_features(input_ids, attention_mask, prompt_lengths), device, repeats
        )
        results["feature_pass"] = {
            "bare_tokens_per_s": batch * length / bare,
            "micro_tokens_per_s": batch * length / features,
            "ratio": features / bare,
            "bare_peak_gib": bare_memory,
            "micro_peak_gib": features_memory,
        }
        plain, plain_memory = timed(
            lambda: classifier(input_ids=input_ids, attention_mask=attention_mask), device, repeats
        )
        results["scoring"] = {"single_head_classifier_s": plain, "single_head_peak_gib": plain_memory}
        for num_heads in (4, 10):
            micro = modeling.MiCRoRewardModel.from_backbone(backbone, num_heads=num_heads).to(device).eval()
            seconds, memory = timed(
                lambda: micro(input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=prompt_lengths),
                device,
                repeats,
            )
            results["scoring"][f"micro_k{num_heads}_s"] = seconds
            results["scoring"][f"micro_k{num_heads}_ratio"] = seconds / plain
            results["scoring"][f"micro_k{num_heads}_peak_gib"] = memory
    results["lora_step"] = lora_step_ratio(
        modeling, backbone, input_ids, attention_mask, prompt_lengths, device, repeats
    )
    return results


def lora_step_ratio(modeling, backbone, input_ids, attention_mask, prompt_lengths, device, repeats) -> dict:
    """One Stage 1 step on pairs (rows 0..B/2-1 chosen, B/2.. rejected) with LoRA on the attention projections."""
    from peft import LoraConfig, get_peft_model

    step = {}
    for num_heads in (1, 4):
        model = modeling.MiCRoRewardModel.from_backbone(backbone, num_heads=num_heads).to(device)
        lora = LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            modules_to_save=["heads", "router"],
        )
        model = get_peft_model(model, lora)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def train_step():
            output = model(input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=prompt_lengths)
            chosen, rejected = output.head_rewards.float().chunk(2)
            router_logits = output.router_logits.float().chunk(2)[0]
            loss = -torch.logsumexp(F.log_softmax(router_logits, -1) + F.logsigmoid(chosen - rejected), -1).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        model.train()
        seconds, memory = timed(train_step, device, repeats)
        step[f"k{num_heads}_s"], step[f"k{num_heads}_peak_gib"] = seconds, memory
        backbone = model.unload()  # LoRA layers out again: the next model wraps the same plain backbone
        backbone = backbone.backbone if hasattr(backbone, "backbone") else backbone
    step["ratio"] = step["k4_s"] / step["k1_s"]
    return step


def render(report: dict) -> str:
    lines = [
        "# MiCRo at GPU scale",
        "",
        f"Generated by `{report['command']}` on {report['date']} ({report['device']}; torch {report['torch']}, "
        f"transformers {report['transformers']}). Backbones built from configs with random weights, {report['dtype']}, "
        "SDPA. Times are medians of repeated runs after a warm-up; every ratio compares two runs of the same process.",
        "",
        "| shape | batch x tokens | MiCRo K=4 / classifier | MiCRo K=10 / classifier | feature pass / bare forward "
        "| feature pass tokens/s | LoRA step K=4 / K=1 | peak GiB: classifier, K=4, K=10 | peak GiB LoRA step: K=1, K=4 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def gib(value):
        return "n/a" if value is None else f"{value:.2f}"

    for result in report["shapes"]:
        scoring, features, step = result["scoring"], result["feature_pass"], result["lora_step"]
        lines.append(
            f"| {result['shape']} | {result['batch']} x {result['length']} | {scoring['micro_k4_ratio']:.3f}x "
            f"| {scoring['micro_k10_ratio']:.3f}x | {features['ratio']:.3f}x | {features['micro_tokens_per_s']:,.0f} "
            f"| {step['ratio']:.3f}x | {gib(scoring['single_head_peak_gib'])}, {gib(scoring['micro_k4_peak_gib'])}, "
            f"{gib(scoring['micro_k10_peak_gib'])} | {gib(step['k1_peak_gib'])}, {gib(step['k4_peak_gib'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="'gpu' (1B and 3B shapes) or 'tiny'; default: gpu with CUDA, tiny without.",
    )
    parser.add_argument("--output", default=str(RESULTS), help="Markdown report; the JSON goes next to it.")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("gpu" if device.type == "cuda" else "tiny")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    settings = PRESETS[preset]
    report = {
        "command": command_line("benchmarks.performance.gpu_performance", argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "preset": preset,
        "shapes": [],
    }
    for shape in settings["shapes"]:
        report["shapes"].append(measure_shape(shape, settings, device, dtype))
        print(json.dumps(report["shapes"][-1]), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the shape's models are gone with measure_shape's frame
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(report), encoding="utf-8")
    output.with_suffix(".json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
