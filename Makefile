# LM training experiments, configured like the Linux kernel. 'make help' lists every target.
#
#   make defconfig-quickstart && make     configure a preset, run what it describes
#   make test                             the test suite
#
# Variables: SET="SYM=value ..." (one-shot overrides), PYTHON (interpreter that makes
# the venv), VENV (its path), TORCH_SPEC (pip requirement for torch), TORCH_INDEX=cpu (CPU
# torch, no CUDA wheels), SKIP_SETUP=1
# (use PYTHON as is, install nothing), KCONFIG_CONFIG (the configuration file, default .config).
# 'make help' lists every variable.
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
# The configuration file every target reads and writes (the kernel's variable); kbuild reads it too.
KCONFIG_CONFIG ?= .config
export KCONFIG_CONFIG
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0

include scripts/setup.mk
include scripts/config.mk
include scripts/run.mk
include scripts/test.mk

# Variables 'make help' lists (one '#= NAME: text' line each).
#= SET="SYM=value ...": one-shot overrides for this command (make setconfig writes them into .config)
#= KCONFIG_CONFIG=<file>: the configuration every target reads and writes (default .config)
#= A=<x> B=<y>: make diffconfig's two sides: .config files, run or plan directories
#= PLAN=runs/<plan>: the plan make report and make eval use (default: the newest)
#= PLANS="runs/a runs/b": make report across several plans, into runs/report-<a>+<b>/ (or REPORT_DIR)
#= REPORT_X=tokens|step|time: the loss curves' x axis in make report (default tokens)
#= REPORT_LOGX=1: log-scale x axis in make report's curves
#= REPORT_DIR=<dir>: where make report writes a report across plans
#= RUN_DIR=runs/<plan>/<run>: the run make sample, export and eval use (default: the newest)
#= PROMPT=<text>: make sample's prompt (default: the run's SAMPLE_PROMPT)
#= TOKENS=<n>: how many tokens make sample generates (default: SAMPLE_TOKENS)
#= TOP_P=<p>: make sample's top-p mass within [0, 1], 1 = off (default: SAMPLE_TOP_P)
#= STOP=<a|b>: make sample's stop strings, '|'-separated, \n a newline (default: SAMPLE_STOP)
#= CHECKPOINT=best|latest: the checkpoint make export and make eval read (default best)
#= REPREPARE=1: make data deletes this configuration's prepared data first
#= OUT=<dir>: where make gpu-check writes gpu_check.json and gpu_check.log (default runs/gpu-check)
#= GPU_CHECK_ARGS=<options>: make gpu-check's options: --dry-run (tiny shapes on CPU), --nanogpt PATH, --only STEP,..., --budget STEP=S,...
#= PYTEST_ARGS=<options>: passed to pytest by make test and test-fast, e.g. PYTEST_ARGS="-k kconfig"
#= PYTHON=<interpreter>: the interpreter that creates the virtualenv (default python3)
#= VENV=<dir>: the virtualenv's folder (default .venv); an existing one that has everything is reused, nothing installed
#= TORCH_SPEC=<requirement>: the pip requirement for torch (default torch==2.13.0)
#= TORCH_INDEX=cpu|cu126|<url>: PyTorch's index for the torch install (default empty: pip's own; cpu avoids 2.2 GB of CUDA wheels)
#= PYPI_INDEX=<url>: the index for torch's dependencies when TORCH_INDEX is set (default https://pypi.org/simple)
#= SKIP_SETUP=1: use PYTHON as it is and install nothing
.PHONY: help
## help: list every target, one line each
help:
	@echo "Targets:"
	@sed -n 's/^## \([^:]*\): /  \1\t/p' $(MAKEFILE_LIST) | awk -F'\t' '{printf "  %-26s %s\n", $$1, $$2}'
	@echo ""
	@echo "Variables (make VAR=value target):"
	@sed -n 's/^#= \([^:]*\): /\1\t/p' $(firstword $(MAKEFILE_LIST)) | awk -F'\t' '{printf "  %-26s %s\n", $$1, $$2}'
	@echo ""
	@echo "SET=\"SYM=value ...\" overrides symbols for one command, passed as written: make expands"
	@echo "no \$$ in it; quote for the shell, e.g. make SET='SAMPLE_PROMPT=\$$HOME' gives the text \$$HOME."
	@echo ""
	@echo "Presets (make defconfig-<name>):"
	@$(PY) -m kbuild list-defconfigs 2>/dev/null || ls defconfigs
