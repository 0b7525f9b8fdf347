# LM training experiments, configured like the Linux kernel. 'make help' lists every target.
#
#   make defconfig-quickstart && make     configure a preset, run what it describes
#   make test                             the test suite
#
# Variables: SET="SYM=value ..." (one-shot overrides), PYTHON (interpreter that makes
# the venv), VENV (its path), TORCH_SPEC (pip requirement for torch), SKIP_SETUP=1
# (use PYTHON as is, install nothing).

.DEFAULT_GOAL := run

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0

include scripts/setup.mk
include scripts/config.mk
include scripts/run.mk
include scripts/test.mk

.PHONY: help
## help: list every target, one line each
help:
	@echo "Targets:"
	@sed -n 's/^## \([^:]*\): /  \1|/p' $(MAKEFILE_LIST) | awk -F'|' '{printf "  %-26s %s\n", $$1, $$2}'
	@echo ""
	@echo "Presets (make defconfig-<name>):"
	@$(PY) -m kbuild list-defconfigs 2>/dev/null || ls defconfigs
