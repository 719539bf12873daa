# Two commands do all setup on a fresh machine (see README):
#   make demo   - creates .venv, installs dlmtrain, trains a tiny MDLM on the embedded corpus (CPU)
#   make test   - same setup, then the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build on our machines; set TORCH="torch" (or a CUDA wheel spec) elsewhere.
TORCH ?= torch==2.13.0

.PHONY: setup demo test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/dlmtrain train configs/demo.yaml $(ARGS)

# Three steps: the suite; the multi-process (gloo) runs of tests/distributed; the SLURM path under a real
# single-node Slurm (skipped unless root with slurm-wlm + munge installed, as .ci/run does). Exit 5: none selected by ARGS.
test: setup
	$(PY) -m pytest -q $(ARGS)
	$(PY) -m pytest -q -m 'distributed and not slow' $(ARGS) || [ $$? -eq 5 ]
	$(PY) -m pytest -q -m 'slurm and not slow' $(ARGS) || [ $$? -eq 5 ]
