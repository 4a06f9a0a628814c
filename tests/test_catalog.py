"""Dataset and model names the TRL way: local folders with configs, Hub ids, and what is read from where."""

from trl_micro.bundled.catalog import is_hub_dataset_name, load_named_dataset, resolve_model_path

README = """---
configs:
- config_name: short
  data_files: short.jsonl
- config_name: long
  data_files: long.jsonl
---
"""


def test_a_folder_standing_in_for_a_hub_id_is_loaded_with_its_config(tmp_path, monkeypatch):
    """`load_named_dataset(name, config)` is `datasets.load_dataset(name, config)` for a folder as for the Hub."""
    folder = tmp_path / "someone" / "prefs"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text(README)
    for taste in ("short", "long"):
        (folder / f"{taste}.jsonl").write_text(f'{{"prompt": "Q?", "chosen": "{taste}", "rejected": "x"}}\n' * 3)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_dataset_name("someone/prefs") and is_hub_dataset_name("someone/elsewhere")
    assert not is_hub_dataset_name("trl-micro/synthetic")
    for taste in ("short", "long"):
        assert load_named_dataset("someone/prefs", taste)["train"]["chosen"] == [taste] * 3


def test_local_and_embedded_model_names(tmp_path):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path(str(tmp_path), download=True) == str(tmp_path)
