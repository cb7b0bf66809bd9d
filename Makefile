# Set-up happens on first use: a .venv, torch (CPU build on this kind of machine unless TORCH_SPEC says
# otherwise; skipped when a torch is already importable), then this package with its test extras.
# It says what it does and how long that usually takes: about 1m45s on the project's 2-core machines.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PIP_INSTALL ?= $(BIN)/pip install --quiet
STAMP := $(VENV)/.mimo-flash-installed

.PHONY: demo test test-all setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "mimo-flash: setting up $(VENV) (first use, or pyproject.toml changed): torch and this package."
	@echo "mimo-flash: this usually takes about 2 minutes (1m45s measured on a 2-core machine; mostly the"
	@echo "mimo-flash: torch download), with no output from pip meanwhile; later runs skip it."
	@start=$$(date +%s); set -e; \
	if [ -x $(BIN)/python ]; then echo "  [1/3] $(VENV) exists"; \
	else echo "  [1/3] creating the virtual environment $(VENV)"; $(PYTHON) -m venv $(VENV); fi; \
	if $(BIN)/python -c "import torch" 2>/dev/null; then echo "  [2/3] torch is already importable: kept"; \
	else echo "  [2/3] installing $(TORCH_SPEC) (the long part)"; $(PIP_INSTALL) "$(TORCH_SPEC)"; fi; \
	echo "  [3/3] installing mimo-flash with its test extras (pytest, transformers, triton)"; \
	$(PIP_INSTALL) -e ".[test]"; \
	touch $(STAMP); \
	echo "mimo-flash: set-up done in $$(( $$(date +%s) - start )) s"

demo: $(STAMP)
	$(BIN)/mimo-flash demo

# two workers (pytest-xdist; each test runs on one thread): 13 minutes on a 2-core machine where one took 21
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist worksteal

test-all: $(STAMP)  # (one process: the GPU tests share one GPU)
	$(BIN)/python -m pytest -m ""

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
