# Running what .config describes. SET="SYM=value ..." applies to this invocation only.

.PHONY: run check continue report data sample export eval bench bench-check bench-data bench-optim bench-speedrun \
	slurm gpu-check gpu-wheels

## run: (default) run the plan .config describes; results in RUNS_DIR/<plan>/<run>/
run: $(CORE)
	@$(PY) -m kbuild run

## check: CPU dry run of every planned run: build, two steps, gradients, memory fit; preset drift; golden loss curves (UPDATE_GOLDEN=1 rewrites them)
check: $(CORE)
	@UPDATE_GOLDEN="$(UPDATE_GOLDEN)" $(PY) -m kbuild check

## continue: finish the newest unfinished plan (never redoes a done run)
continue: $(CORE)
	@$(PY) -m kbuild continue

## slurm: create the plan like 'make' and write RUNS_DIR/<plan>/slurm.sbatch, one Slurm array task per run
slurm: $(CORE)
	@$(PY) -m kbuild slurm

## report: table (markdown, CSV), plots and figure.png/svg for the newest plan (PLAN=, PLANS="a b" across plans, REPORT_X=, REPORT_LOGX=1, REPORT_DIR=)
report: $(CORE)
	@PLAN="$(PLAN)" PLANS="$(PLANS)" REPORT_X="$(REPORT_X)" REPORT_LOGX="$(REPORT_LOGX)" REPORT_DIR="$(REPORT_DIR)" \
		$(PY) -m kbuild report

## data: prepare the configured data now (REPREPARE=1 rebuilds it); make does it on demand
data: $(CORE)
	@$(PY) -m kbuild data

## sample: generate text from the newest run (RUN_DIR=, PROMPT=, TOKENS=, TOP_P=, STOP= to choose)
sample: $(CORE)
	@$(PY) -m kbuild sample

## export: newest run's checkpoint as a Hugging Face folder <run>/export/hf/ (RUN_DIR=, CHECKPOINT=best|latest)
export: $(CORE)
	@$(PY) -m kbuild export

## eval: evaluate the newest plan's runs (RUN_DIR= one run, PLAN=, CHECKPOINT=): EVAL_TASKS via lm-eval, bits per byte, generation
eval: $(CORE) $(EVAL)
	@$(PY) -m kbuild eval

## bench: training tokens/s, FLOP/s, MFU and peak memory of the configured model on this machine (MoE: vs dense)
bench: $(CORE)
	@$(PY) scripts/bench.py

## bench-check: time 'make check' on the ablation and matrix presets (seconds per run)
bench-check: $(CORE)
	@$(PY) scripts/bench_check.py

## bench-data: tokenizing MB/s per tokenizer, document by document vs in batches, peak memory (DATA_BENCH_SOURCE=embedded|generated|<path>)
bench-data: $(CORE)
	@$(PY) -m data.bench

## bench-optim: optimizer.step() and training-step time, AdamW vs Muon on the quickstart model (ratio), and Muon's old matrix-by-matrix step
bench-optim: $(CORE)
	@$(PY) scripts/bench_optim.py

## bench-speedrun: train nanogpt-shakespeare-char-cpu and speedrun-cpu on the same data, one evaluation: wall-time ratio, losses (DATA_PATH= another corpus)
bench-speedrun: $(CORE)
	@$(PY) scripts/bench_speedrun.py $(if $(DATA_PATH),--data-path "$(DATA_PATH)")

## gpu-check: the prepared GPU check (docs/gpu.md): GPU test tier, memory prediction vs measured, bench figures; gpu_check.json and log in OUT= (GPU_CHECK_ARGS="--dry-run", "--nanogpt PATH")
gpu-check: $(CORE)
	@$(PY) scripts/gpu_check.py "$(or $(OUT),runs/gpu-check)" $(GPU_CHECK_ARGS)

## gpu-wheels: download the wheels the GPU machine lacks (kconfiglib, torchao for its Python 3.12 / torch 2.11) into wheels/
gpu-wheels: $(CORE)
	@$(PY) scripts/gpu_wheels.py
