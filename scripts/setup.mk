# Environment: a virtualenv with pinned torch, made on first use.
# SKIP_SETUP=1 uses $(PYTHON) as it is (tests and CI images that already have the packages).
# docs/setup.md: what the first command downloads, the CPU build, reusing a virtualenv.

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

# Where pip finds torch (TORCH_SPEC). Empty (the default): pip's own configuration, which on Linux
# x86_64 is PyPI's CUDA build (about 2.7 GB with its nvidia-* wheels). cpu, cu126, cu128, ...: PyTorch's
# index for that build (https://download.pytorch.org/whl/<name>; cpu is about 190 MB), PyPI serving
# torch's own dependencies; or a full index URL. Only the torch install uses it.
TORCH_INDEX ?=
PYPI_INDEX ?= https://pypi.org/simple
TORCH_INDEX_URL = $(if $(findstring ://,$(TORCH_INDEX)),$(TORCH_INDEX),https://download.pytorch.org/whl/$(TORCH_INDEX))
TORCH_PIP_OPTIONS = $(if $(strip $(TORCH_INDEX)),--index-url $(TORCH_INDEX_URL) --extra-index-url $(PYPI_INDEX))
# The pip that installs into $(VENV) (tests point it at a recorder).
PIP ?= $(VENV)/bin/pip
# Exit 0 when $(VENV) already has an extra's packages (and the given requirements): a virtualenv made
# elsewhere (VENV=/path/to/env) is reused, only its stamp file written. Offline, installs nothing.
VENV_COMPLETE = $(VENV)/bin/python scripts/venv_complete.py

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-core: pyproject.toml | $(VENV)/bin/python
	@if $(VENV_COMPLETE) core "$(TORCH_SPEC)"; then \
		echo "$(VENV) already has $(TORCH_SPEC) and the core packages: nothing to install"; \
	else set -ex; \
		$(PIP) install --quiet $(TORCH_PIP_OPTIONS) "$(TORCH_SPEC)"; \
		$(PIP) install --quiet ".[core]"; \
	fi
	@touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed-core
	@if $(VENV_COMPLETE) dev; then echo "$(VENV) already has the dev packages: nothing to install"; \
	else set -ex; $(PIP) install --quiet ".[dev]"; fi
	@touch $@

$(VENV)/.installed-eval: pyproject.toml $(VENV)/.installed-core
	@if $(VENV_COMPLETE) eval; then echo "$(VENV) already has the eval packages: nothing to install"; \
	else set -ex; $(PIP) install --quiet ".[eval]"; fi
	@touch $@

.PHONY: setup setup-eval distclean clean
## setup: create the virtualenv (VENV; a complete existing one is reused) with torch (TORCH_SPEC, TORCH_INDEX) and core packages
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
