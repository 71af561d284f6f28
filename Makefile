# Two commands for a fresh machine: `make repro` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: repro test test-isa install bench clean-venv plots-template docs docs-serve

# Re-install only when the dependency list changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@echo "Installing torch, DVC and the other dependencies into $(VENV) (about 5.7 GB with CUDA libraries; a few minutes from a local wheel cache, longer over the network)..."
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# dvc.yaml's commands call `python`: put the venv first on PATH so they find its packages.
repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

# The tests whose assertions rest on trained weights or computed scores, under the kernels and thread counts of
# users' CPUs: torch's plain (no-SIMD) kernels, its AVX2 kernels (what an AVX2-only laptop runs), and 1 thread.
# Other CPUs round floats differently; a test that passes only on this CPU is a red suite for a user. CI runs it.
ISA_TESTS := tests/test_train.py tests/test_small_data.py tests/test_model.py tests/test_evaluate.py \
	tests/test_explain_methods.py tests/test_explain_scores.py tests/test_pipeline.py
test-isa: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q $(ISA_TESTS)
	PATH="$(CURDIR)/$(BIN):$$PATH" ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -q $(ISA_TESTS)
	PATH="$(CURDIR)/$(BIN):$$PATH" OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(ISA_TESTS)

bench: $(STAMP)
	$(BIN)/python bench/prepare.py
	$(BIN)/python bench/prepare.py --scale 5000 20000
	$(BIN)/python bench/train.py

# Re-inline vega, vega-lite and vega-embed into .dvc/offline_plots/ (needs npm); only when DVC's versions change.
plots-template: $(STAMP)
	$(BIN)/python tools/make_offline_plots.py

# The documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link or anchor fails.
# NO_MKDOCS_2_WARNING: Material prints a banner about its successor on every build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# Preview at http://127.0.0.1:8000, rebuilt on every save.
docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

clean-venv:
	rm -rf $(VENV)
