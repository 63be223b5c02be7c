# Two commands do all set-up on a fresh machine:
#   make app    creates .venv, installs pinned dependencies, launches the Gradio app
#   make test   creates .venv, installs pinned dependencies (+ Chromium for the browser test), runs every test
#               (the first run also converts the Gemma 3 270M real model, ~2 min, into ~/.cache/transformer-surgery;
#               `make clean` leaves that cache alone)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: app test test-fast bench bench-quick demo-model browser clean

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -r requirements-dev.txt
	touch $(STAMP)

app: $(STAMP)
	$(PY) app.py

browser:
	bash scripts/install_chromium.sh

test: $(STAMP) browser
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
