"""The report of a plan (or of several): report.md, report.csv and the figures of plan/plots.py.

Inputs are what the runner leaves behind: plan.json (runs, status, differences from the base),
each run's summary.json (with ``make eval``'s results under ``eval`` once it has run), metrics.jsonl
and provenance.json. Any of the per-run files may be missing
or partial (pending, rejected, failed or interrupted runs, plans from before provenance.json), so
every reader tolerates that. A run stopped by its time limit (CONFIG_MAX_TIME) is marked as such
wherever it appears, never shown as a finished run; the Provenance section flags runs (or attempts
of one run) that ran on a different commit, tree, package versions, device or host.

Runs that differ only by seed (plan/seeds.py) are one curve in the plots and one row of the Seeds
section (mean ± std over seeds); report.csv keeps one row per run. A report across several plans
(``write_report(a, b, out=...)``) names each run ``<plan>/<run>`` and compares with the first plan's
baseline. Every file is written atomically (temporary name in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from pathlib import Path

from kconfig.atomic import write_text_if_changed
from plan.plots import FIGURE_SVG, EvalScores, RunBar, write_plots
from plan.plots_curves import CurveOptions
from plan.provenance import load_attempts
from plan.report_provenance import describe_device, format_provenance
from plan.seeds import SeedGroup, baseline_group, difference, finite, group_runs

COLUMNS = ("run", "status", "baseline", "differs_from_base", "stage", "parent", "params", "tokens_per_s", "mfu",
           "final_val_loss", "best_val_loss", "best_val_step", "final_val_bpb", "best_val_bpb", "steps",
           "planned_steps", "final_lr", "wall_time_s", "init_from", "commit", "dirty", "hostname", "device", "error",
           "plan", "seed_group")
NUMERIC = ("params", "tokens_per_s", "mfu", "final_val_loss", "best_val_loss", "best_val_step", "final_val_bpb",
           "best_val_bpb", "steps", "planned_steps", "final_lr", "wall_time_s")
DASH = "–"
TIME_LIMIT = "time_limit"
MARK = "†"  # footnote mark of a time-limited run
# Entries of an eval task's results that describe the evaluation rather than score it.
TASK_INFO = ("num_fewshot", "samples")
GENERATION_COLUMNS = ("distinct_1", "distinct_2", "repeated_ngram_rate", "mean_length")
_num = finite


# --------------------------------------------------------------------------- reading

def _parse(text: str) -> dict:
    """A JSON object, or {} for torn or non-object text."""
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def _read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """The evaluation lines and the training-step lines of metrics.jsonl; a torn last line (run killed
    mid-write) is skipped."""
    lines = list(map(_parse, _read(path).splitlines()))
    return ([e for e in lines if _num(e.get("val_loss")) is not None],
            [e for e in lines if _num(e.get("train_loss")) is not None])


def load_rows(plan_dir: Path, out_dir: Path | None = None, prefix: str = "") -> tuple[dict, list[dict]]:
    """plan.json and one row per run in plan order: the plan record merged with its summary. ``prefix``
    (``<plan>/``) goes before each run's name in a report across plans; ``href`` is the run's folder
    relative to the report's (``out_dir``, the plan's own by default)."""
    record = json.loads((plan_dir / "plan.json").read_text(encoding="utf-8"))
    rows = []
    for run in record.get("runs", []):
        run_dir = plan_dir / run["name"]
        summary = _parse(_read(run_dir / "summary.json"))
        evals, train = _read_metrics(run_dir / "metrics.jsonl")
        status = run.get("status", "pending")
        if status == "done" and summary.get("status") == TIME_LIMIT:  # a runner that predates the status
            status = TIME_LIMIT
        href = run["name"] if out_dir is None else os.path.relpath(run_dir, out_dir)
        rows.append({"name": prefix + run["name"], "plan": record.get("name", plan_dir.name), "href": href,
                     "status": status, "stage": run.get("stage"), "parent": run.get("parent"),
                     "eval_status": run.get("eval"), "eval_error": run.get("eval_error"),
                     "baseline": bool(run.get("baseline")), "differences": run.get("differences") or {},
                     "error": run.get("error") or summary.get("error"),
                     "summary": summary, "evals": evals, "train": train,
                     "provenance": load_attempts(run_dir) or None})
    return record, rows


# --------------------------------------------------------------------------- tables

def format_differences(row: dict) -> str:
    """``LR=0.0003, POS_ROPE=y``; bools as y/n, like a .config; "(baseline)" for the baseline."""
    if row["baseline"]:
        return "(baseline)"
    return ", ".join(f"{sym}={'y' if v is True else 'n' if v is False else v}"
                     for sym, v in row["differences"].items())


def _values(row: dict) -> dict:
    """The report's fields of one run, numbers raw (None when the run has no such value)."""
    s = row["summary"]
    latest = row["provenance"][-1] if row["provenance"] else {}
    git = latest.get("git") or {}
    return {"run": row["name"], "status": row["status"], "baseline": row["baseline"],
            "differs_from_base": format_differences(row), "stage": row["stage"], "parent": row["parent"],
            "error": row["error"],
            **{k: _num(s.get(k)) for k in NUMERIC}, "init_from": format_parent(s.get("init_from")),
            "commit": git.get("commit"), "dirty": git.get("dirty"), "hostname": latest.get("hostname"),
            "device": describe_device(latest.get("device")) if latest else None,
            "plan": row["plan"], "seed_group": row.get("seed_group")}


def format_parent(parent) -> str | None:
    """A warm-started run's parent (summary.json's init_from) as ``PATH@step N``, or ``PATH (Hugging Face
    folder)``; None for a fresh run."""
    if not isinstance(parent, dict) or not parent.get("path"):
        return None
    if parent.get("kind") == "hf":
        return f"{parent['path']} (Hugging Face folder)"
    return f"{parent['path']}@step {parent.get('step', '?')}"


def lineage_lines(rows: list[dict]) -> list[str]:
    """One line per warm-started run: which checkpoint it started from, at which step, the weights' digest."""
    lines = []
    for row in rows:
        parent = row["summary"].get("init_from")
        if format_parent(parent) is None:
            continue
        loss = _num(parent.get("val_loss"))
        extra = "" if loss is None else f", val loss {loss:.4f} there"
        carried = " with its optimizer state" if parent.get("optimizer") else ""
        where = "Hugging Face folder" if parent.get("kind") == "hf" else f"step {parent.get('step', '?')}"
        lines.append(f"- `{row['name']}` started from `{parent['path']}` ({where}{extra}, "
                     f"weights sha256 {str(parent.get('weights_sha256'))[:12]}){carried}")
    return ["Lineage (CONFIG_INIT_FROM):", "", *lines] if lines else []


def format_csv(rows: list[dict]) -> str:
    """Machine-readable rows: numbers unformatted, missing values empty. The eval columns follow COLUMNS
    when some run has ``make eval`` results (``eval_values``)."""
    evaluated = any(eval_of(row) for row in rows)
    metrics, sets = task_metrics(rows), bpb_sets(rows)

    def values(row):
        return {**_values(row), **(eval_values(row, metrics, sets) if evaluated else {})}

    out = io.StringIO()
    fields = [*COLUMNS, *(eval_values(rows[0], metrics, sets) if evaluated else ())]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in values(row).items()})
    return out.getvalue()


# --------------------------------------------------------------------------- evaluation results (make eval)

def eval_of(row: dict) -> dict:
    """The run's ``make eval`` results (summary.json's ``eval``); {} when it has none."""
    result = row["summary"].get("eval")
    return result if isinstance(result, dict) else {}


def _part(row: dict, key: str) -> dict:
    part = eval_of(row).get(key)
    return part if isinstance(part, dict) else {}


def _task(row: dict, task: str) -> dict:
    metrics = _part(row, "tasks").get(task)
    return metrics if isinstance(metrics, dict) else {}


def task_metrics(rows: list[dict]) -> list[tuple[str, str]]:
    """Every (task, metric) some run's eval scored, first seen first: its numbers other than TASK_INFO and
    the ``<metric>_stderr`` entries."""
    found: dict = {}
    for row in rows:
        for task in _part(row, "tasks"):
            for metric, value in _task(row, task).items():
                if metric not in TASK_INFO and not metric.endswith("_stderr") and _num(value) is not None:
                    found[(task, metric)] = None
    return list(found)


def bpb_sets(rows: list[dict]) -> list[str]:
    """The validation sets some run's eval measured bits per byte on, first seen first."""
    return list(dict.fromkeys(name for row in rows for name in _part(row, "val_bpb")))


def eval_values(row: dict, metrics: list[tuple[str, str]], sets: list[str]) -> dict:
    """The eval fields of one run, numbers raw (None where it lacks one): checkpoint and step evaluated,
    ``<task> <metric>`` and ``<task> <metric>_stderr`` per task metric, ``eval_bpb_<set>`` per validation set,
    the generation metrics and ``samples_file`` (relative to the plan directory)."""
    e, generation = eval_of(row), _part(row, "generation")
    values = {"eval_checkpoint": e.get("checkpoint") if isinstance(e.get("checkpoint"), str) else None,
              "eval_step": _num(e.get("step"))}
    for task, metric in metrics:
        scores = _task(row, task)
        values[f"{task} {metric}"] = _num(scores.get(metric))
        values[f"{task} {metric}_stderr"] = _num(scores.get(f"{metric}_stderr"))
    values.update({f"eval_bpb_{name}": _num(_part(row, "val_bpb").get(name)) for name in sets})
    values.update({key: _num(generation.get(key)) for key in GENERATION_COLUMNS})
    file = generation.get("file")
    values["samples_file"] = f"{row['href']}/{file}" if isinstance(file, str) and file else None
    return values


def _score(value, stderr) -> str:
    return DASH if value is None else f"{value:.3f}" + ("" if stderr is None else f" ± {stderr:.3f}")


def _task_settings(rows: list[dict], task: str) -> str:
    """``python_next_line (0-shot, 200 documents)``; values that differ between runs joined by '/'."""
    def seen(key):
        return "/".join(f"{v:g}" for v in sorted({_num(_task(r, task).get(key)) for r in rows} - {None}))

    shots, docs = seen("num_fewshot"), seen("samples")
    settings = [text for text in (shots and f"{shots}-shot", docs and f"{docs} documents") if text]
    return f"`{task}`" + (f" ({', '.join(settings)})" if settings else "")


def format_eval(rows: list[dict]) -> list[str]:
    """The Evaluation section (``make eval``): one row per evaluated run; [] when no run was evaluated."""
    evaluated = [row for row in rows if eval_of(row)]
    if not evaluated:
        return []
    metrics, sets = task_metrics(rows), bpb_sets(rows)
    head = ["run", "checkpoint", *(f"{task} {metric}" for task, metric in metrics),
            *("eval bpb" if name == "val" else f"eval bpb {name}" for name in sets),
            "distinct-2", "repeated 4-grams", "mean length", "samples"]
    lines = ["## Evaluation", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in evaluated:
        v = eval_values(row, metrics, sets)
        checkpoint = (v["eval_checkpoint"] or "?") + ("" if v["eval_step"] is None else f" @ step {v['eval_step']:.0f}")
        file = v["samples_file"]
        cells = [f"`{row['name']}`", checkpoint,
                 *(_score(v[f"{t} {m}"], v[f"{t} {m}_stderr"]) for t, m in metrics),
                 *(_fmt(v[f"eval_bpb_{name}"], ".4f") for name in sets),
                 _fmt(v["distinct_2"], ".3f"), _fmt(v["repeated_ngram_rate"], ".3f"),
                 _fmt(v["mean_length"], ".1f") + (" tokens" if v["mean_length"] is not None else ""),
                 f"[{file.rsplit('/', 1)[-1]}]({file})" if file else DASH]
        lines.append("| " + " | ".join(cells) + " |")
    tasks = list(dict.fromkeys(task for task, _ in metrics))
    lines += ["", ("Tasks " + ", ".join(_task_settings(rows, t) for t in tasks) + ": lm-evaluation-harness scores "
                   "± one standard error. " if tasks else "")
              + "Eval bpb: bits per byte over the whole validation set. Generation on fixed prompts: distinct-2 is "
              "the share of distinct token bigrams among all, repeated 4-grams the share of a sample's 4-gram "
              "positions that repeat an earlier 4-gram of it (averaged over samples)."]
    missing = [row["name"] for row in rows if not eval_of(row) and row["status"] in ("done", TIME_LIMIT)]
    if missing:
        lines.append(f"Not evaluated ('make eval' has not run on them): {', '.join(f'`{n}`' for n in missing)}.")
    return lines


def _fmt(value, spec: str) -> str:
    return DASH if value is None else format(value, spec)


def _short(text, limit: int = 80) -> str:
    text = " ".join(str(text or "").split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _steps_done(row: dict) -> str:
    """``31/60 steps``: steps done of those planned (``31 steps`` when the plan is not recorded)."""
    steps, planned = _num(row["summary"].get("steps")), _num(row["summary"].get("planned_steps"))
    return f"{_fmt(steps, '.0f')}{'' if planned is None else f'/{planned:.0f}'} steps"


def format_status(row: dict) -> str:
    """The status cell: ``time limit (31/60 steps) †`` for a run its time limit stopped."""
    return f"time limit ({_steps_done(row)}) {MARK}" if row["status"] == TIME_LIMIT else row["status"]


def time_limit_note(rows: list[dict]) -> str | None:
    """The footnote under the table naming each time-limited run, or None when there is none."""
    runs = [r for r in rows if r["status"] == TIME_LIMIT]
    if not runs:
        return None
    parts = []
    for r in runs:
        s = r["summary"]
        steps, planned, lr = _num(s.get("steps")), _num(s.get("planned_steps")), _num(s.get("final_lr"))
        text = f"`{r['name']}` after {_fmt(steps, '.0f')} of {_fmt(planned, '.0f')} steps"
        parts.append(text + (f" (LR {lr:.3g} when stopped)" if lr is not None else ""))
    return (f"{MARK} Stopped by its wall-clock limit (CONFIG_MAX_TIME) before its planned steps: "
            f"{'; '.join(parts)}. Such a run's losses are those of a shorter run whose LR schedule was cut off, "
            f"not of a finished run; the best run is chosen among finished runs when there are any.")


def format_table(rows: list[dict]) -> str:
    """The markdown table: one row per run, in plan order."""
    head = ["run", "status", "differs from base", "params", "tokens/s", "MFU", "final val loss",
            "best val loss", "val bpb", "wall time", "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        v = _values(row)
        mfu = DASH if v["mfu"] is None else f"{100 * v['mfu']:.1f}%"
        cells = [f"`{row['name']}`", format_status(row), _short(v["differs_from_base"], 120) or DASH,
                 _fmt(v["params"], ",.0f"), _fmt(v["tokens_per_s"], ",.0f"), mfu,
                 _fmt(v["final_val_loss"], ".4f"), _fmt(v["best_val_loss"], ".4f"), _fmt(v["final_val_bpb"], ".4f"),
                 _fmt(v["wall_time_s"], ".1f") + ("s" if v["wall_time_s"] is not None else ""),
                 _short(row["error"]) if row["status"] not in ("done", TIME_LIMIT) else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_line(rows: list[dict]) -> str | None:
    """The best done run by final val loss, and its delta vs the baseline when one finished.

    Time-limited runs are candidates only when no run finished (a plan that trains each run for a
    fixed time); then the line says so."""
    def with_loss(status):
        return [r for r in rows if r["status"] == status and _num(r["summary"].get("final_val_loss")) is not None]

    done, label = with_loss("done"), "Best run by final val loss"
    if not done:
        done, label = with_loss(TIME_LIMIT), "Best run by final val loss, all runs stopped by their time limit"
    if not done:
        return None
    best = min(done, key=lambda r: r["summary"]["final_val_loss"])
    loss = best["summary"]["final_val_loss"]
    text = f"{label}: `{best['name']}` ({loss:.4f})"
    base = next((r for r in rows if r["baseline"]), None)
    if base is best:
        return text + ", the baseline."
    if base is None:
        return text + "."
    if base not in done and base["status"] == TIME_LIMIT and _num(base["summary"].get("final_val_loss")) is not None:
        return text + (f"; baseline `{base['name']}` was stopped by its time limit "
                       f"({_steps_done(base)}, "
                       f"{base['summary']['final_val_loss']:.4f}), not compared.")
    if base not in done:
        return text + f"; baseline `{base['name']}` has no final val loss ({base['status']})."
    ref = base["summary"]["final_val_loss"]
    delta = f"{loss - ref:+.4f} ({100 * (loss - ref) / ref:+.2f}%)"
    return text + f", {delta} vs baseline `{base['name']}` ({ref:.4f})."


def format_chain(rows: list[dict]) -> list[str]:
    """The Chain section: each stage's run, the run it started from, its val loss and evaluation, in plan
    order (every parent before its children); [] for a plan that is not a chain."""
    if not any(row["stage"] for row in rows):
        return []
    metrics, sets = task_metrics(rows), bpb_sets(rows)
    head = ["stage", "run", "parent", "status", "best val loss", "final val loss",
            *("eval bpb" if name == "val" else f"eval bpb {name}" for name in sets),
            *(f"{task} {metric}" for task, metric in metrics), "evaluation"]
    lines = ["## Chain", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        v, e = _values(row), eval_values(row, metrics, sets)
        evaluation = {"done": "done", "failed": f"failed: {_short(row['eval_error'])}"}.get(row["eval_status"], DASH)
        cells = [row["stage"] or DASH, f"`{row['name']}`", f"`{row['parent']}`" if row["parent"] else "(first stage)",
                 format_status(row), _fmt(v["best_val_loss"], ".4f"), _fmt(v["final_val_loss"], ".4f"),
                 *(_fmt(e[f"eval_bpb_{name}"], ".4f") for name in sets),
                 *(_score(e[f"{t} {m}"], e[f"{t} {m}_stderr"]) for t, m in metrics), evaluation]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "Each stage starts from its parent's run (CONFIG_INIT_FROM, the checkpoint "
                    "CONFIG_CHAIN_PARENT_CHECKPOINT names); val losses are on each stage's own validation data."]


def _mean_std(stat) -> str:
    if stat is None:
        return DASH
    return f"{stat.mean:.4f}" + (f" ± {stat.std:.4f}" if stat.std is not None else "")


def format_seeds(groups: list[SeedGroup]) -> list[str]:
    """The Seeds section: one row per group of runs that differ only by seed (when some group has two or
    more), with n, the seeds, mean ± std of the final metrics and the difference from the baseline group;
    [] when no run has a sibling seed."""
    if not any(g.n > 1 for g in groups):
        return []
    base = baseline_group(groups)
    base_stat = base.summary_stat("final_val_loss") if base else None
    head = ["runs", "n", "seeds", "final val loss", "Δ vs baseline", "best val loss", "final val bpb"]
    lines = ["## Seeds", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        final = g.summary_stat("final_val_loss")
        if g is base:
            delta = "(baseline)"
        elif final is None or base_stat is None:
            delta = DASH
        else:
            d, se = difference(final, base_stat)
            delta = f"{d:+.4f}" + (f" ± {se:.4f}" if se is not None else "")
        n = f"{final.n}" + (f" of {g.n}" if final.n < g.n else "") if final else f"0 of {g.n}"
        runs = f"`{g.label}`" + (" (" + ", ".join(f"`{r['name']}`" for r in g.rows) + ")" if g.n > 1 else "")
        lines.append("| " + " | ".join([runs, n, ", ".join(g.seeds()), _mean_std(final), delta,
                                         _mean_std(g.summary_stat("best_val_loss")),
                                         _mean_std(g.summary_stat("final_val_bpb"))]) + " |")
    return lines + ["", "Mean ± sample standard deviation (n − 1) over the runs of a group that differ only by "
                    "CONFIG_SEED; n counts those with a final val loss. Δ: the group's mean less the baseline "
                    "group's, ± the standard error of that difference, √(s²/n + s_b²/n_b), when both have two "
                    "or more seeds. \"base\" is the run that keeps the base configuration's SEED."]


def format_markdown(record: dict, rows: list[dict], plots: list[str], groups: list[SeedGroup] | None = None) -> str:
    """Headline (plan, mode, runs per status), the table, the best run, the seeds, then the plots."""
    counts = Counter(row["status"] for row in rows)
    status = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items())
    title = (f"# Report across plans {', '.join(record['plans'])}" if record.get("plans")
             else f"# Plan {record.get('name', '?')}: {record.get('mode', '?')}")
    parts = [f"{title}, {len(rows)} runs ({status})", "", format_table(rows), ""]
    note = time_limit_note(rows)
    if note:
        parts += [note, ""]
    chain = format_chain(rows)
    best = None if chain else best_line(rows)  # a chain's stages train on different data: no ranking
    if best:
        parts += [best, ""]
    seeds = format_seeds(groups if groups is not None else group_runs(rows))
    if seeds:
        parts += [*seeds, ""]
    if chain:
        parts += [*chain, ""]
    lineage = lineage_lines(rows)
    if lineage:
        parts += [*lineage, ""]
    evaluation = format_eval(rows)
    if evaluation:
        parts += [*evaluation, ""]
    parts += [*format_provenance(rows), ""]
    parts += [f"![{p[:-4].replace('_', ' ')}]({p})" + (f" ([SVG]({FIGURE_SVG}))" if p == "figure.png" else "") + "\n"
              for p in plots]
    return "\n".join(parts).rstrip() + "\n"


# --------------------------------------------------------------------------- writing

def combined_dir(plan_dirs: list[Path]) -> Path:
    """Where a report across plans goes by default: ``report-<a>+<b>`` beside the first plan
    (``report-<a>+<n>-more`` when the names would be long)."""
    names = [p.name for p in plan_dirs]
    joined = "+".join(names)
    return plan_dirs[0].parent / ("report-" + (joined if len(joined) <= 150 else f"{names[0]}+{len(names) - 1}-more"))


def _eval_scores(rows: list[dict], metrics: list[tuple[str, str]]) -> list[EvalScores]:
    """The task metrics scored between 0 and 1 (accuracies) of each evaluated run, for eval.png."""
    scores = []
    for row in rows:
        found = {(t, m): (v, _num(_task(row, t).get(f"{m}_stderr"))) for t, m in metrics
                 if (v := _num(_task(row, t).get(m))) is not None}
        if found:
            scores.append(EvalScores(row["name"], row["baseline"], found))
    return scores


def _accuracy_metrics(rows: list[dict]) -> list[tuple[str, str]]:
    """Task metrics every run scored between 0 and 1; metrics on other scales (perplexities) stay in the table."""
    return [(t, m) for t, m in task_metrics(rows)
            if all(0 <= v <= 1 for r in rows if (v := _num(_task(r, t).get(m))) is not None)]


def _speed_bars(rows: list[dict]) -> list[RunBar]:
    return [RunBar(row["name"] + ("" if row["status"] == "done" else f" [{row['status'].replace('_', ' ')}]"),
                   row["summary"]["tokens_per_s"], row["baseline"])
            for row in rows if _num(row["summary"].get("tokens_per_s")) is not None]


def write_report(*plan_dirs: Path, out: Path | None = None, options: CurveOptions | None = None) -> list[Path]:
    """Write report.md, report.csv and the figures for one plan (into its folder) or across several (into
    ``out``, by default ``combined_dir``: runs named ``<plan>/<run>``); return the paths written."""
    plan_dirs = [Path(p) for p in plan_dirs]
    options = options or CurveOptions()
    several = len(plan_dirs) > 1
    out = Path(out) if out else combined_dir(plan_dirs) if several else plan_dirs[0]
    records, rows = [], []
    for plan_dir in plan_dirs:
        record, plan_rows = load_rows(plan_dir, out, f"{plan_dir.name}/" if several else "")
        records.append(record)
        rows += plan_rows
    record = ({"plans": [r.get("name", d.name) for r, d in zip(records, plan_dirs)]} if several else records[0])
    groups = group_runs(rows)
    for g in groups:
        for row in g.rows:
            row["seed_group"] = g.label if g.n > 1 else None
    title = ("plans " + ", ".join(record["plans"]) if several else f"plan {record.get('name', plan_dirs[0].name)}")
    metrics = _accuracy_metrics(rows)
    plots = write_plots(out, groups, options, title, _speed_bars(rows), _eval_scores(rows, metrics), metrics)
    md, csv_path = out / "report.md", out / "report.csv"
    write_text_if_changed(csv_path, format_csv(rows))
    write_text_if_changed(md, format_markdown(record, rows, [p.name for p in plots], groups))
    svg = [out / FIGURE_SVG] if out / "figure.png" in plots else []
    return [md, csv_path, *plots, *svg]
