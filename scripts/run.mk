# Running what .config describes. SET="SYM=value ..." applies to this invocation only.

.PHONY: run check sample bench

## run: (default) run the plan .config describes; results in RUNS_DIR/<plan>/<run>/
run: $(CORE)
	@$(PY) -m kbuild run

## check: CPU dry run: build every planned run's model and take two optimizer steps
check: $(CORE)
	@$(PY) -m kbuild check

## sample: generate text from the newest run (RUN_DIR=, PROMPT=, TOKENS= to choose)
sample: $(CORE)
	@$(PY) -m kbuild sample

## bench: measure training tokens/s and FLOP/s of the configured model on this machine
bench: $(CORE)
	@$(PY) scripts/bench.py
