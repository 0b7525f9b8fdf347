"""``make eval``: a run's checkpoint on EVAL_TASKS (lm-evaluation-harness), bits per byte and generation quality.

Results go to <run>/eval/results.json (with lm-eval's task configurations and versions) and into the
run's summary.json under "eval", both written atomically; ``make report`` shows them. The Evaluation
symbols come from the configuration 'make eval' is given (.config and SET), the model and its data
from the run's checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from harness.errors import EvalError
from harness.evaluate import EvalConfig, run_tasks
from kconfig.atomic import atomic_write, write_text_if_changed

RESULTS = Path("eval") / "results.json"


def evaluate_run(run_dir: Path, config: EvalConfig, gen_config, root: Path, which: str = "best",
                 log=print) -> dict:
    """Evaluate one run's checkpoint; returns the "eval" entry written to its summary.json."""
    from data.prepare import prepare
    from harness.adapter import OurLM
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

