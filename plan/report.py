"""The report of a plan: report.md, report.csv and PNG plots written into runs/<plan>/.

Inputs are what the runner leaves behind: plan.json (runs, status, differences from the base),
each run's summary.json (with ``make eval``'s results under ``eval`` once it has run), metrics.jsonl
and provenance.json. Any of the per-run files may be missing
or partial (pending, rejected, failed or interrupted runs, plans from before provenance.json), so
every reader tolerates that. A run stopped by its time limit (CONFIG_MAX_TIME) is marked as such
wherever it appears, never shown as a finished run; the Provenance section flags runs (or attempts
of one run) that ran on a different commit, tree, package versions, device or host.

Plots are drawn on a bare ``Figure`` with the Agg canvas, never through pyplot: no global
backend is switched and no figure is left open, so other matplotlib users are unaffected.
Every file is written atomically (temporary name in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kconfig.atomic import atomic_write, write_text_if_changed
from plan.provenance import load_attempts
from plan.report_provenance import describe_device, format_provenance

PLOTS = ("val_loss_vs_step.png", "val_loss_vs_time.png", "final_val_loss.png", "tokens_per_s.png")
# Drawn only when some run has the data: val_bpb in metrics.jsonl, task results from 'make eval'.
BPB_PLOT, EVAL_PLOT = "val_bpb_vs_tokens.png", "eval.png"
COLUMNS = ("run", "status", "baseline", "differs_from_base", "stage", "parent", "params", "tokens_per_s", "mfu",
           "final_val_loss", "best_val_loss", "best_val_step", "final_val_bpb", "best_val_bpb", "steps",
           "planned_steps", "final_lr", "wall_time_s", "init_from", "commit", "dirty", "hostname", "device", "error")
NUMERIC = ("params", "tokens_per_s", "mfu", "final_val_loss", "best_val_loss", "best_val_step", "final_val_bpb",
           "best_val_bpb", "steps", "planned_steps", "final_lr", "wall_time_s")
DASH = "–"
TIME_LIMIT = "time_limit"
MARK = "†"  # footnote mark of a time-limited run
# Entries of an eval task's results that describe the evaluation rather than score it.
TASK_INFO = ("num_fewshot", "samples")
GENERATION_COLUMNS = ("distinct_1", "distinct_2", "repeated_ngram_rate", "mean_length")


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


def _read_evals(path: Path) -> list[dict]:
    """Evaluation lines of metrics.jsonl; a torn last line (run killed mid-write) is skipped."""
    return [e for e in map(_parse, _read(path).splitlines()) if _num(e.get("val_loss")) is not None]


def _num(value) -> float | None:
    """A finite number, or None (missing, null, NaN, bool or text)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


def load_rows(plan_dir: Path) -> tuple[dict, list[dict]]:
    """plan.json and one row per run in plan order: the plan record merged with its summary."""
    record = json.loads((plan_dir / "plan.json").read_text(encoding="utf-8"))
    rows = []
    for run in record.get("runs", []):
        run_dir = plan_dir / run["name"]
        summary = _parse(_read(run_dir / "summary.json"))
        status = run.get("status", "pending")
        if status == "done" and summary.get("status") == TIME_LIMIT:  # a runner that predates the status
            status = TIME_LIMIT
        rows.append({"name": run["name"], "status": status, "stage": run.get("stage"), "parent": run.get("parent"),
                     "eval_status": run.get("eval"), "eval_error": run.get("eval_error"),
                     "baseline": bool(run.get("baseline")), "differences": run.get("differences") or {},
                     "error": run.get("error") or summary.get("error"),
                     "summary": summary, "evals": _read_evals(run_dir / "metrics.jsonl"),
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
            "device": describe_device(latest.get("device")) if latest else None}


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
    values["samples_file"] = f"{row['name']}/{file}" if isinstance(file, str) and file else None
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


def format_markdown(record: dict, rows: list[dict], plots: list[str]) -> str:
    """Headline (plan, mode, runs per status), the table, the best run, then the plots."""
    counts = Counter(row["status"] for row in rows)
    status = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items())
    parts = [f"# Plan {record.get('name', '?')}: {record.get('mode', '?')}, {len(rows)} runs ({status})", "",
             format_table(rows), ""]
    note = time_limit_note(rows)
    if note:
        parts += [note, ""]
    chain = format_chain(rows)
    best = None if chain else best_line(rows)  # a chain's stages train on different data: no ranking
    if best:
        parts += [best, ""]
    if chain:
        parts += [*chain, ""]
    lineage = lineage_lines(rows)
    if lineage:
        parts += [*lineage, ""]
    evaluation = format_eval(rows)
    if evaluation:
        parts += [*evaluation, ""]
    parts += [*format_provenance(rows), ""]
    parts += [f"![{p[:-4].replace('_', ' ')}]({p})\n" for p in plots]
    return "\n".join(parts).rstrip() + "\n"


# --------------------------------------------------------------------------- plots

def _label(row: dict, limit: int = 44) -> str:
    """Run name shortened in the middle (ends usually differ: seeds, values), plus a status mark."""
    name = row["name"]
    if len(name) > limit:
        name = name[:limit // 2 - 1] + "…" + name[-(limit - limit // 2):]
    if row["baseline"]:
        name += " (baseline)"
    if row["status"] == TIME_LIMIT:
        return f"{name} [time limit, {_steps_done(row)}]"
    return name if row["status"] == "done" else f"{name} [{row['status']}]"


def _colors(n: int) -> list:
    """Qualitative colors up to 20 runs; beyond that an evenly sampled continuous map (plus line styles)."""
    if n <= 20:
        return [colormaps["tab10" if n <= 10 else "tab20"](i) for i in range(n)]
    return [colormaps["turbo"](0.05 + 0.9 * i / (n - 1)) for i in range(n)]


def _save(fig: Figure, path: Path) -> None:
    """Render to a temporary file next to ``path``, then rename: never a half-written PNG."""
    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))  # keeps the umask


def _legend(ax, runs: list) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8 if len(runs) <= 15 else 7,
              ncol=1 if len(runs) <= 18 else 2, frameon=False)


def plot_curves(rows: list[dict], x_key: str, xlabel: str, path: Path, y_key: str = "val_loss",
                quantity: str = "loss") -> bool:
    """An evaluation quantity of metrics.jsonl (val loss; val_bpb for ``quantity`` "bits per byte") of every
    run that logged some, against ``x_key``; the baseline drawn thick and black."""
    def points(row):
        return [(e[x_key], e[y_key]) for e in row["evals"] if _num(e.get(x_key)) is not None
                and _num(e.get(y_key)) is not None]

    runs = [r for r in rows if points(r)]
    if not runs:
        return False
    fig = Figure(figsize=(9, 5.5))
    ax = fig.add_subplot()
    styles = ("-", "--", ":", "-.")
    for i, (row, color) in enumerate(zip(runs, _colors(len(runs)))):
        pts = points(row)
        kw = dict(color="black", lw=2.6, zorder=3) if row["baseline"] else \
            dict(color=color, lw=1.4, ls=styles[(i // 10) % 4] if len(runs) > 20 else "-")
        ax.plot(*zip(*pts), marker="o" if len(pts) == 1 else None, label=_label(row), **kw)
    ax.set(xlabel=xlabel, ylabel=y_key.replace("_", " "), title=f"validation {quantity} vs {xlabel.split(' ')[0]}")
    ax.grid(alpha=0.3)
    _legend(ax, runs)
    _save(fig, path)
    return True


def plot_eval(rows: list[dict], path: Path) -> bool:
    """Grouped bars of the eval task metrics scored between 0 and 1 (accuracies): one group per task metric,
    one bar per evaluated run (the baseline grey and hatched), error bars ± one standard error. Metrics on
    other scales (perplexities) are left to the table."""
    metrics = [(t, m) for t, m in task_metrics(rows)
               if all(0 <= v <= 1 for r in rows if (v := _num(_task(r, t).get(m))) is not None)]
    runs = [r for r in rows if any(_num(_task(r, t).get(m)) is not None for t, m in metrics)]
    if not runs:
        return False
    width = 0.8 / len(runs)
    fig = Figure(figsize=(max(6.0, 1.5 + len(metrics) * (0.5 + 0.22 * len(runs))), 5))
    ax = fig.add_subplot()
    for i, (row, color) in enumerate(zip(runs, _colors(len(runs)))):
        present = [(j, _task(row, t)[m], _num(_task(row, t).get(f"{m}_stderr")) or 0.0)
                   for j, (t, m) in enumerate(metrics) if _num(_task(row, t).get(m)) is not None]
        xs, values, errors = zip(*present)
        bars = ax.bar([x - 0.4 + width * (i + 0.5) for x in xs], values, width, yerr=errors, capsize=3,
                      color="0.35" if row["baseline"] else color, label=_label(row))
        if row["baseline"]:
            for bar in bars:
                bar.set(hatch="//", edgecolor="white")
    ax.set_xticks(range(len(metrics)), [f"{t}\n{m}" for t, m in metrics], fontsize=8)
    ax.set_xlim(-0.6, len(metrics) - 0.4)
    ax.set_ylim(0, 1.05)
    ax.set(ylabel="score", title="evaluation tasks (error bars: ± 1 standard error)")
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, runs)
    _save(fig, path)
    return True


def plot_bars(rows: list[dict], key: str, xlabel: str, title: str, path: Path, sort: bool) -> bool:
    """Horizontal bars, one per run (sorted ascending = best on top when ``sort``); baseline hatched."""
    runs = [r for r in rows if _num(r["summary"].get(key)) is not None]
    if not runs:
        return False
    if sort:
        runs.sort(key=lambda r: r["summary"][key])
    runs.reverse()  # barh draws bottom-up; keep the first run at the top
    values = [r["summary"][key] for r in runs]
    fig = Figure(figsize=(8, 1.2 + 0.32 * len(runs)))
    ax = fig.add_subplot()
    bars = ax.barh(range(len(runs)), values, color=["0.35" if r["baseline"] else "tab:blue" for r in runs])
    for bar, row in zip(bars, runs):
        if row["baseline"]:
            bar.set(hatch="//", edgecolor="white")
    ax.set_yticks(range(len(runs)), [_label(r) for r in runs], fontsize=8 if len(runs) <= 20 else 7)
    ax.set_ylim(-0.6, len(runs) - 0.4)
    lo, hi = min(values), max(values)
    if key == "final_val_loss":  # losses sit close together: start the axis near the best one
        span = (hi - lo) or 0.05 * abs(hi) or 1.0
        ax.set_xlim(max(0.0, lo - 0.6 * span), hi + 0.35 * span)
        base = next((r for r in runs if r["baseline"]), None)
        if base:
            ax.axvline(base["summary"][key], color="0.35", ls="--", lw=1, zorder=0)
            title += " (dashed line: baseline)"
    else:
        ax.set_xlim(0, hi * 1.18)
    spec = ".4f" if key == "final_val_loss" else ",.0f"
    ax.bar_label(bars, [format(v, spec) for v in values], padding=3, fontsize=7)
    ax.set(xlabel=xlabel, title=title)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return True


def write_plots(plan_dir: Path, rows: list[dict]) -> list[Path]:
    """Draw each plot that some run has data for; remove a stale copy of one that has none."""
    jobs = (
        lambda p: plot_curves(rows, "step", "step", p),
        lambda p: plot_curves(rows, "elapsed_s", "time (s since start)", p),
        lambda p: plot_bars(rows, "final_val_loss", "final val loss", "final val loss, best on top", p, sort=True),
        lambda p: plot_bars(rows, "tokens_per_s", "tokens/s", "training throughput (plan order)", p, sort=False),
        lambda p: plot_curves(rows, "tokens", "tokens trained", p, y_key="val_bpb", quantity="bits per byte"),
        lambda p: plot_eval(rows, p),
    )
    written = []
    for name, draw in zip((*PLOTS, BPB_PLOT, EVAL_PLOT), jobs, strict=True):
        if draw(plan_dir / name):
            written.append(plan_dir / name)
        else:
            (plan_dir / name).unlink(missing_ok=True)
    return written


def write_report(plan_dir: Path) -> list[Path]:
    """Write report.md, report.csv and the plots into ``plan_dir``; return the paths written."""
    plan_dir = Path(plan_dir)
    record, rows = load_rows(plan_dir)
    plots = write_plots(plan_dir, rows)
    md, csv_path = plan_dir / "report.md", plan_dir / "report.csv"
    write_text_if_changed(csv_path, format_csv(rows))
    write_text_if_changed(md, format_markdown(record, rows, [p.name for p in plots]))
    return [md, csv_path, *plots]
