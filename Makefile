# LM training experiments, configured like the Linux kernel. 'make help' lists every target.
#
#   make defconfig-quickstart && make     configure a preset, run what it describes
#   make test                             the test suite
#
# Variables: SET="SYM=value ..." (one-shot overrides), PYTHON (interpreter that makes
# the venv), VENV (its path), TORCH_SPEC (pip requirement for torch), SKIP_SETUP=1
# (use PYTHON as is, install nothing).
# SET reaches kbuild exactly as the shell passes it (make expands nothing in it): write
# SET='SAMPLE_PROMPT=$HOME' in single quotes and the value is the five characters $HOME.

.DEFAULT_GOAL := run

# make would expand $(...) and $X inside SET (running $(shell ...), dropping $HOME) when it
# exports it to the recipes; $(value ...) is the text as given, on the command line or in the
# environment, and a simply-expanded variable is exported as it is.
ifneq ($(origin SET),undefined)
override SET := $(value SET)
export SET
endif

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
	@echo "SET=\"SYM=value ...\" overrides symbols for one command, passed as written: make expands"
	@echo "no \$$ in it; quote for the shell, e.g. make SET='SAMPLE_PROMPT=\$$HOME' gives the text \$$HOME."
	@echo ""
	@echo "Presets (make defconfig-<name>):"
	@$(PY) -m kbuild list-defconfigs 2>/dev/null || ls defconfigs
