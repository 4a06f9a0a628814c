"""The MiCRo trainers' side: measuring the heads at each save and writing the card."""

from __future__ import annotations

import logging
from itertools import islice
from pathlib import Path

import torch
from datasets import Dataset
from huggingface_hub import ModelCard

from ..bundled.catalog import is_hub_dataset_name
from ..evaluation_reports import plot_head_usage_heatmap
from ..scoring import score_preference_pairs
from .head_measurements import measure_heads
from .hub_names import CARD_FILE, card_base_model, data_name, polish_trl_card
from .sections import micro_section_lines, write_card_section

logger = logging.getLogger(__name__)

USAGE_PLOT = "head_usage.png"
TRAINING_SETTINGS = (
    "loss_type",
    "router_balance_coef",
    "router_entropy_coef",
    "adaptation_likelihood",
    "router_anchor_coef",
    "freeze_backbone",
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "context_column",
    "prompt_marker",
    "seed",
)


def sample_pairs(dataset, num_pairs: int, seed: int) -> Dataset | None:
    """Up to `num_pairs` rows of `dataset` (a seeded sample of a `Dataset`, the first rows of an iterable one)."""
    if dataset is None or num_pairs <= 0:
        return None
    if isinstance(dataset, dict):
        dataset = next(iter(dataset.values()), None)
    if isinstance(dataset, Dataset):
        if len(dataset) > num_pairs:
            dataset = dataset.shuffle(seed=seed).select(range(num_pairs))
        return dataset.flatten_indices() if len(dataset) else None
    rows = list(islice(iter(dataset), num_pairs))
    return Dataset.from_list(rows) if rows else None


class MiCRoModelCardMixin:
    """
    The MiCRo trainers' card: every `save_model` measures the heads on `args.model_card_pairs` pairs (of the
    evaluation set when there is one, else of the training set; all processes take part, as DeepSpeed ZeRO-3 needs),
    and the main process writes TRL's card plus the MiCRo section (module docstring) and the head-usage plot into the
    saved folder. `create_model_card(dataset_name=...)` rewrites it naming the data, as TRL's scripts do on push.
    """

    _card_measurements: dict | None = None
    _card_dataset_name: str | None = None

    def _keep_card_pairs(self, train_dataset, eval_dataset) -> None:
        """Called before the datasets are tokenized: keep the raw pairs the card is measured on."""
        self._card_source = ("evaluation", eval_dataset) if eval_dataset is not None else ("training", train_dataset)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        self._card_measurements = self._measure_heads()
        if self.args.should_save:
            self.create_model_card(output_dir=output_dir or self.args.output_dir)

    @torch.no_grad()
    def _measure_heads(self) -> dict | None:
        source, dataset = getattr(self, "_card_source", ("training", None))
        pairs = sample_pairs(dataset, self.args.model_card_pairs, self.args.seed)
        if pairs is None:
            return None
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            scores = score_preference_pairs(
                model,
                pairs,
                self.processing_class,
                context_column=self.args.context_column,
                prompt_marker=self.args.prompt_marker,
                batch_size=self.args.per_device_eval_batch_size,
            )
        finally:
            model.train(was_training)
        return {**measure_heads(scores, pairs, self.args.context_column), "source": source}

    def _card_settings(self) -> dict:
        settings = {name: getattr(self.args, name) for name in TRAINING_SETTINGS if hasattr(self.args, name)}
        settings["processes"] = self.accelerator.num_processes
        peft_config = getattr(self.accelerator.unwrap_model(self.model), "peft_config", None)
        if peft_config:
            adapter = next(iter(peft_config.values()))
            targets = adapter.target_modules
            targets = targets if isinstance(targets, str) or targets is None else sorted(targets)
            settings["lora"] = {"r": adapter.r, "alpha": adapter.lora_alpha, "target_modules": targets}
        return settings

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, output_dir=None):
        """TRL's card (`args.output_dir/README.md`) plus the MiCRo section; also written to `output_dir` if given."""
        self._card_dataset_name = dataset_name or self._card_dataset_name
        if model_name is None:  # as TRL names it when it saves a checkpoint
            hub_model_id = self.args.hub_model_id
            model_name = hub_model_id.split("/")[-1] if hub_model_id else Path(self.args.output_dir).name
        hub_dataset = self._card_dataset_name if is_hub_dataset_name(self._card_dataset_name) else None
        super().create_model_card(model_name=model_name, dataset_name=hub_dataset, tags=tags)
        if not self.is_world_process_zero():
            return
        trl_card = Path(self.args.output_dir) / CARD_FILE
        model = self.accelerator.unwrap_model(self.model)
        conversational = bool(getattr(self.processing_class, "chat_template", None))
        card = polish_trl_card(
            ModelCard.load(trl_card),
            card_base_model(model.config._name_or_path),
            self.args.hub_model_id or Path(self.args.output_dir).name,
            conversational,
        )
        card.save(trl_card)
        folders = list(dict.fromkeys([Path(self.args.output_dir), Path(output_dir or self.args.output_dir)]))
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            self._write_micro_section(folder)

    def _write_micro_section(self, folder: Path) -> None:
        config = self.accelerator.unwrap_model(self.model).config
        measurements = self._card_measurements
        plot = None
        if measurements is not None:
            usage = measurements["usage"]
            try:
                plot_head_usage_heatmap(
                    usage["usage"],
                    usage["contexts"],
                    folder / USAGE_PLOT,
                    title="Mean router weight per head and context",
                )
                plot = USAGE_PLOT
            except ImportError as error:
                logger.warning(f"Model card without the head-usage plot: {error}")
        model_id = self.args.hub_model_id or folder.name
        num_pairs = len(self.train_dataset) if hasattr(self.train_dataset, "__len__") else None
        data = ", ".join(
            filter(None, [data_name(self._card_dataset_name), num_pairs and f"{num_pairs} training pairs"])
        )
        settings = self._card_settings()
        lines = micro_section_lines(config, model_id, data or None, settings, measurements, plot, "lora" in settings)
        path = folder / CARD_FILE
        if folder != Path(self.args.output_dir):
            path.write_text((Path(self.args.output_dir) / CARD_FILE).read_text(encoding="utf-8"), encoding="utf-8")
        write_card_section(folder, "micro", lines)
