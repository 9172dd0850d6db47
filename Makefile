# The two commands of the README: `make demo` and `make test`. Everything else is theirs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
TOOLS := .venv-tools
BIN := $(VENV)/bin

.PHONY: demo test venv tools lint test-unit test-tools clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, as the CPU build pinned in pyproject (peft needs torch; no CUDA here).
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev,infra]"
	touch $@

venv: $(BIN)/.installed

# Third-party checkers: checkov pins many packages, so it lives in its own venv.
$(TOOLS)/.installed: .ci/tools.sh
	bash .ci/tools.sh $(TOOLS)
	touch $@

tools: $(TOOLS)/.installed

demo: venv
	$(BIN)/python -m serving demo

lint: venv
	$(BIN)/ruff check .

test: venv tools lint
	PATH="$(CURDIR)/$(TOOLS)/bin:$$PATH" $(BIN)/pytest

clean:
	rm -rf $(VENV) $(TOOLS) .local
