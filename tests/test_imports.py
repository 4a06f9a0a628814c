"""What `import trl_micro` loads: the Auto registration only; the rest on first use."""

import subprocess
import sys


def loaded_modules(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(output.split())


def test_importing_the_package_loads_no_trainer_and_registers_the_model_type():
    modules = loaded_modules("import trl_micro\nfrom transformers import AutoConfig\nAutoConfig.for_model('micro')")
    assert not any(name.startswith("trl_micro.trainer") for name in modules)
    assert "trl_micro.rewards" not in modules and "trl_micro.personalization" not in modules


def test_public_names_resolve_on_first_use():
    modules = loaded_modules("from trl_micro import MiCRoReward, OnlineRouter")
    assert "trl_micro.rewards" in modules and "trl_micro.personalization.online_router" in modules
    assert not any(name.startswith("trl_micro.trainer") for name in modules)
    import trl_micro

    assert set(trl_micro.__all__) <= set(dir(trl_micro))
    for name in trl_micro.__all__:
        assert getattr(trl_micro, name) is not None
