"""What `import trl_micro` loads: the Auto registration only; the rest on first use."""

import subprocess
import sys

import pytest


def loaded_modules(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(output.split())


def test_importing_the_package_loads_no_trainer_and_registers_the_model_type():
    modules = loaded_modules("import trl_micro")
    assert "trl_micro.modeling_micro" not in modules and "transformers.modeling_utils" not in modules
    modules = loaded_modules("import trl_micro\nfrom transformers import AutoConfig\nAutoConfig.for_model('micro')")
    assert not any(name.startswith("trl_micro.trainer") for name in modules)
    assert "trl_micro.rewards" not in modules and "trl_micro.personalization" not in modules


def test_auto_classes_build_the_model_from_the_first_config(tmp_path):
    """The model classes register when the first MiCRo config is built: a fresh process's Auto load finds them."""
    from trl_micro.testing_utils import build_tiny_micro_model, build_tiny_tokenizer

    build_tiny_micro_model(build_tiny_tokenizer(["a tiny corpus"])).save_pretrained(tmp_path)
    code = (
        "import trl_micro, sys\n"
        "from transformers import AutoModel, AutoModelForSequenceClassification\n"
        f"model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path)!r})\n"
        "assert type(model).__name__ == 'MiCRoRewardModel' and type(model).__module__ == 'trl_micro.modeling_micro'\n"
        "assert type(AutoModel.from_config(model.config)) is type(model)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names_resolve_on_first_use():
    modules = loaded_modules("from trl_micro import MiCRoReward, OnlineRouter")
    assert "trl_micro.rewards" in modules and "trl_micro.personalization.online_router" in modules
    assert not any(name.startswith("trl_micro.trainer") for name in modules)
    import trl_micro

    assert set(trl_micro.__all__) <= set(dir(trl_micro))
    for name in trl_micro.__all__:
        assert getattr(trl_micro, name) is not None


@pytest.mark.parametrize(
    "name, new_module",
    [
        ("split_by_context", "trl_micro.splits"),
        ("take_per_context", "trl_micro.splits"),
        ("GroupedBatchSampler", "trl_micro.trainer.data_collator"),
        ("latent_groups", "trl_micro.trainer.data_collator"),
    ],
)
def test_names_moved_out_of_data_utils_resolve_with_a_warning(name, new_module):
    import importlib

    from trl_micro import data_utils

    with pytest.warns(FutureWarning, match=f"{new_module}.{name}"):
        value = getattr(data_utils, name)
    assert value is getattr(importlib.import_module(new_module), name)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        data_utils.not_a_name
