# `make demo` and `make test` each set up .venv (pinned dependencies) on first use, then run.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lcr demo

test: $(STAMP)
	RAY_AUTH_MODE=disabled $(VENV)/bin/pytest -q --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check lcr_core components pipeline tests benchmarks

clean:
	rm -rf $(VENV) data runs mlflow.db mlartifacts reports
