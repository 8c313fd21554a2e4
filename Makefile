# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 10) else "need Python 3.10+ (3.11 is pinned): make PYTHON=python3.11")'
	@$(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (log: $(VENV)/pip.log)" >&2
	@{ $(BIN)/pip install --quiet --upgrade pip && $(BIN)/pip install --quiet -c constraints.txt -e '.[test]'; } \
		>$(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log >&2; echo "pip install failed (log above, kept in $(VENV)/pip.log)" >&2; exit 1; }
	@touch $(STAMP)

demo: setup
	@mkdir -p out
	@$(BIN)/teleport apply sample_checkpoints/mlp_digits_mid.safetensors \
		--data sample_checkpoints/digits_calibration.safetensors \
		--holdout sample_checkpoints/digits_holdout.safetensors \
		-o out/mlp_digits_mid.teleported.safetensors --force

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
