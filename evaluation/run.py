"""``make eval``: a run's checkpoint on EVAL_TASKS (lm-evaluation-harness), bits per byte and generation quality.

Results go to <run>/eval/results.json (with lm-eval's task configurations and versions) and into the
run's summary.json under "eval", both written atomically; ``make report`` shows them. The Evaluation
symbols come from the configuration 'make eval' is given (.config and SET), the model and its data
from the run's checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from evaluation.errors import EvalError
from evaluation.tasks import build_tasks, task_names, task_specs
from kconfig.atomic import atomic_write, write_text_if_changed

RESULTS = Path("eval") / "results.json"


@dataclass(frozen=True)
class EvalConfig:
    """The Evaluation menu; the defaults are Kconfig's."""

    tasks: tuple[str, ...] = ("python_next_line",)
    tasks_dir: Path = Path("evaluation/tasks")
    fewshot: int = 0
    limit: int = 0  # 0 = every document
    batch_size: int = 16
    bpb_tokens: int = 1_000_000  # 0 = the whole split

    @classmethod
    def from_config(cls, cfg, root: Path) -> EvalConfig:
        tasks_dir = Path(cfg.EVAL_TASKS_DIR).expanduser()
        return cls(tasks=tuple(task_names(cfg.EVAL_TASKS)), tasks_dir=tasks_dir if tasks_dir.is_absolute() else
                   root / tasks_dir, fewshot=cfg.EVAL_FEWSHOT, limit=cfg.EVAL_LIMIT,
                   batch_size=cfg.EVAL_BATCH_SIZE, bpb_tokens=cfg.EVAL_BPB_TOKENS)


def quiet_libraries() -> None:
    """lm-eval and datasets log every step (and warn that EVAL_FEWSHOT overrides a task's own few-shot
    count); 'make eval' prints its own lines. Errors still show."""
    for name in ("lm-eval", "lm_eval", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets

    datasets.utils.logging.disable_progress_bar()


def run_tasks(lm, config: EvalConfig, log=print) -> tuple[dict, dict]:
    """({task: {metric: value, ..., "num_fewshot", "samples"}}, lm-eval's raw output without samples)."""
    from lm_eval import simple_evaluate

    quiet_libraries()
    specs, manager = task_specs(list(config.tasks), config.tasks_dir)
    build_tasks(specs, manager)  # each task's dataset loads here, or the error names it
    log(f"eval: {', '.join(config.tasks)} ({config.fewshot}-shot"
        + (f", first {config.limit} documents" if config.limit else "") + ")")
    raw = simple_evaluate(model=lm, tasks=specs, task_manager=manager, num_fewshot=config.fewshot,
                          limit=config.limit or None, batch_size=config.batch_size, log_samples=False,
                          bootstrap_iters=1000, random_seed=0, numpy_random_seed=1234, torch_random_seed=1234,
                          fewshot_random_seed=1234)
    return task_metrics(raw), {k: raw[k] for k in ("results", "configs", "versions", "n-shot", "n-samples")
                               if k in raw}


def task_metrics(raw: dict) -> dict:
    """lm-eval's "metric,filter" results as {task: {metric: value}} ("none" filters dropped from the name)."""
    out = {}
    for task, values in raw["results"].items():
        metrics = {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            metrics[metric if filt == "none" else f"{metric}_{filt}"] = value if math.isfinite(value) else None
        metrics["num_fewshot"] = raw.get("n-shot", {}).get(task)
        metrics["samples"] = raw.get("n-samples", {}).get(task, {}).get("effective")
        out[task] = metrics
    return out


def evaluate_run(run_dir: Path, config: EvalConfig, gen_config, root: Path, which: str = "best",
                 log=print) -> dict:
    """Evaluate one run's checkpoint; returns the "eval" entry written to its summary.json."""
    from data.prepare import prepare
    from evaluation.adapter import OurLM
    from evaluation.bits_per_byte import validation_bpb
    from evaluation.load import load_checkpoint

    run_dir = Path(run_dir)
    started = time.time()
    model, tokenizer, info = load_checkpoint(run_dir, which)
    log(f"eval: {run_dir}: {which} checkpoint, step {info['step']}")
    result = {"checkpoint": which, "step": info["step"]}
    data = prepare(info["config"], root, log)  # the run's own data, found in the cache
    bpb = validation_bpb(model, data, config.bpb_tokens, config.batch_size)
    result["val_bpb"] = {name: r["bpb"] for name, r in bpb.items()}
    for name, r in bpb.items():
        log(f"eval: {name}: {r['bpb']:.4f} bits per byte over {r['tokens']:,} tokens ({r['bytes']:,} bytes)")
    raw = {}
    if config.tasks:
        result["tasks"], raw = run_tasks(OurLM(model, tokenizer, config.batch_size), config, log)
        for task, metrics in result["tasks"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                              if isinstance(v, float) and not k.endswith("_stderr"))
            log(f"eval: {task}: {shown} ({metrics['samples']} documents)")
    if gen_config.samples:
        from evaluation.generation import generation_eval

        val_text = tokenizer.decode(first_val_tokens(data, 200_000))
        result["generation"] = generation_eval(model, tokenizer, gen_config, val_text, run_dir / "eval", root,
                                               "cpu")
        g = result["generation"]
        log(f"eval: generation: distinct-2 {g['distinct_2']:.3f}, repeated 4-grams {g['repeated_ngram_rate']:.3f}, "
            f"samples in {run_dir / g['file']}")
    result["seconds"] = round(time.time() - started, 1)
    write_results(run_dir, result, raw)
    return result


def first_val_tokens(data, count: int):
    from evaluation.bits_per_byte import validation_sets

    return next(iter(validation_sets(data).values())).tokens("val")[:count].tolist()


def write_results(run_dir: Path, result: dict, raw: dict) -> None:
    """<run>/eval/results.json, and summary.json's "eval" entry (the rest of the summary kept as it is)."""
    text = json.dumps({**result, "lm_eval": raw}, indent=2, default=str) + "\n"
    atomic_write(run_dir / RESULTS, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise EvalError(f"{summary_path}: no summary (the run has not finished); the results are in "
                        f"{run_dir / RESULTS}")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    summary["eval"] = result
    write_text_if_changed(summary_path, json.dumps(summary, indent=2) + "\n")

