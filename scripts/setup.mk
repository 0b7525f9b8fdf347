# Environment: a virtualenv with pinned torch, made on first use.
# SKIP_SETUP=1 uses $(PYTHON) as it is (tests and CI images that already have the packages).

ifeq ($(SKIP_SETUP),1)
PY := $(PYTHON)
CORE :=
DEV :=
EVAL :=
else
PY := $(VENV)/bin/python
CORE := $(VENV)/.installed-core
DEV := $(VENV)/.installed-dev
EVAL := $(VENV)/.installed-eval
endif

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-core: pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/pip install --quiet ".[core]"
	@touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed-core
	$(VENV)/bin/pip install --quiet ".[dev]"
	@touch $@

$(VENV)/.installed-eval: pyproject.toml $(VENV)/.installed-core
	$(VENV)/bin/pip install --quiet ".[eval]"
	@touch $@

.PHONY: setup setup-eval distclean clean
## setup: create the virtualenv (VENV, default .venv) with pinned torch (TORCH_SPEC) and core packages
setup: $(CORE)

## setup-eval: add lm-evaluation-harness to the virtualenv ('make eval' does it on first use; EVAL_EVERY needs it)
setup-eval: $(EVAL)

## clean: remove Python caches and prepared data (.cache/); runs/ is kept
clean:
	rm -rf .cache build *.egg-info
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

## distclean: clean, and remove .config, config.py and the virtualenv
distclean: clean
	rm -rf .config .config.old config.py $(VENV)
