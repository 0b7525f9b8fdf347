"""Running EVAL_TASKS through lm-evaluation-harness on a model of ours, as {task: {metric: value}}.

``make eval`` (evaluation/run.py) and training's EVAL_EVERY both call ``run_tasks``; lm-eval's own
output (task configurations, versions, counts) comes back beside the metrics.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from harness.tasks import build_tasks, task_names, task_specs


@dataclass(frozen=True)
class EvalConfig:
    """The Evaluation menu's task settings; the defaults are Kconfig's."""

    tasks: tuple[str, ...] = ("python_next_line",)
    tasks_dir: Path = Path("evaluation/tasks")
    fewshot: int = 0
    limit: int = 0  # 0 = every document
    batch_size: int = 16
    bpb_tokens: int = 1_000_000  # 0 = the whole split
    every: int = 0  # training steps between task evaluations; 0 = only 'make eval'

    @classmethod
    def from_config(cls, cfg, root: Path) -> EvalConfig:
        tasks_dir = Path(cfg.EVAL_TASKS_DIR).expanduser()
        return cls(tasks=tuple(task_names(cfg.EVAL_TASKS)), tasks_dir=tasks_dir if tasks_dir.is_absolute() else
                   root / tasks_dir, fewshot=cfg.EVAL_FEWSHOT, limit=cfg.EVAL_LIMIT,
                   batch_size=cfg.EVAL_BATCH_SIZE, bpb_tokens=cfg.EVAL_BPB_TOKENS, every=cfg.EVAL_EVERY)


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
