"""The report's figures, written into the report's folder:

- ``loss.png``: train and val loss against tokens (steps, wall time), val bits per byte beside it when logged
  (plan/plots_curves.py draws the curves);
- ``final_val_loss.png``: a dot plot of each seed group's final val loss on an axis from 0, the seeds as
  small dots, mean ± std, the baseline marked and each group's difference from it written beside it;
- ``tokens_per_s.png``: throughput per run, bars from 0;
- ``eval.png``: ``make eval``'s task scores between 0 and 1, grouped bars with ± one standard error;
- ``figure.png`` and ``figure.svg``: the loss curves and the final val loss side by side, for a paper or a chat.

Figures are bare ``Figure`` objects with the Agg canvas, never pyplot: no global backend is switched and no
figure is left open. Each drawing function returns its Figure (None when no run has the data) so tests read
its axes back; ``write_plots`` saves them atomically and removes a stale file whose plot has no data now.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure

from kconfig.atomic import atomic_write
from plan.plots_curves import LOSS_LABEL, CurveOptions, available, draw_bpb, draw_loss, unigram_entropies
from plan.seeds import SeedGroup, baseline_group, difference

LOSS_PLOT, FINAL_PLOT, SPEED_PLOT, EVAL_PLOT = "loss.png", "final_val_loss.png", "tokens_per_s.png", "eval.png"
FIGURE, FIGURE_SVG = "figure.png", "figure.svg"
PLOTS = (FIGURE, LOSS_PLOT, FINAL_PLOT, SPEED_PLOT, EVAL_PLOT)
# Names earlier reports wrote: removed so a rewritten report leaves no outdated plot beside it.
RETIRED = ("val_loss_vs_step.png", "val_loss_vs_time.png", "val_bpb_vs_tokens.png")
FINAL_KEY = "final_val_loss"
FINAL_TITLE = "final val loss (axis from 0; ● mean, ○ each seed, bars ± 1 std)"
BASE_COLOR = "black"


@dataclass(frozen=True)
class RunBar:
    """One run's bar in a per-run chart: its label, value, whether it is the baseline."""
    label: str
    value: float
    baseline: bool


@dataclass(frozen=True)
class EvalScores:
    """One evaluated run's task scores, {(task, metric): (value, stderr or None)}."""
    label: str
    baseline: bool
    scores: dict


def group_colors(groups: list[SeedGroup]) -> list:
    """The baseline black; the others qualitative up to 20 groups, beyond that an evenly sampled map."""
    others = [g for g in groups if not g.baseline]
    n = len(others)
    palette = ([colormaps["tab10" if n <= 10 else "tab20"](i) for i in range(n)] if n <= 20
               else [colormaps["turbo"](0.05 + 0.9 * i / (n - 1)) for i in range(n)])
    it = iter(palette)
    return [BASE_COLOR if g.baseline else next(it) for g in groups]


def short(label: str, limit: int = 40) -> str:
    """A label shortened in the middle (names' ends usually differ: values, seeds)."""
    return label if len(label) <= limit else label[:limit // 2 - 1] + "…" + label[-(limit - limit // 2):]


def save(fig: Figure, path: Path) -> None:
    """Render to a temporary file next to ``path``, then rename: never a half-written image. PNG or SVG by
    the name's suffix."""
    svg = path.suffix == ".svg"
    (FigureCanvasSVG if svg else FigureCanvasAgg)(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="svg" if svg else "png", dpi=150,
                                                bbox_inches="tight"))


# --------------------------------------------------------------------------- loss curves

def loss_figure(groups: list[SeedGroup], options: CurveOptions) -> Figure | None:
    """Train and val loss (left), val bits per byte (right) when some run logged it."""
    colors = group_colors(groups)
    bpb = any(e.get("val_bpb") is not None for g in groups for row in g.rows for e in row["evals"])
    fig = Figure(figsize=(13 if bpb else 8.5, 5.2), layout="constrained")
    ax = fig.add_subplot(1, 2 if bpb else 1, 1)
    if not draw_loss(ax, groups, colors, options, legend_groups=False):
        return None
    ax.set_title("train and val loss")
    if bpb:
        right = fig.add_subplot(1, 2, 2)
        draw_bpb(right, groups, colors, options)
        right.set_title("val bits per byte")
    group_legend(fig, groups, colors)
    return fig


def group_legend(fig: Figure, groups: list[SeedGroup], colors: list, fontsize: float = 9) -> None:
    """The groups' colors, in one legend right of the figure (two columns past 18 groups)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, lw=2.2 if g.baseline else 1.6,
                      label=short(g.label) + (" (baseline)" if g.baseline else "")
                      + (f" (n={g.n})" if g.n > 1 else "")) for g, c in zip(groups, colors)]
    fig.legend(handles=handles, loc="outside right upper", fontsize=fontsize if len(groups) <= 15 else 7.5,
               ncols=1 if len(groups) <= 18 else 2, frameon=False)


# --------------------------------------------------------------------------- final val loss

def comparison_rows(groups: list[SeedGroup], key: str = FINAL_KEY) -> list[tuple[SeedGroup, object, str]]:
    """(group, its Stat, the text written beside it) for each group with ``key``, best first: the mean
    (± std over seeds) and the difference from the baseline group (± the standard error of the difference
    when both have seeds)."""
    base = baseline_group(groups)
    base_stat = base.summary_stat(key) if base else None
    out = []
    for g in groups:
        s = g.summary_stat(key)
        if s is None:
            continue
        text = f"{s.mean:.4f}" + (f" ± {s.std:.4f}" if s.std is not None else "")
        if g is base:
            text += "  baseline"
        elif base_stat is not None:
            delta, se = difference(s, base_stat)
            text += f"  Δ {delta:+.4f}" + (f" ± {se:.4f}" if se is not None else "")
        out.append((g, s, text))
    return sorted(out, key=lambda item: item[1].mean)


def draw_final(ax, groups: list[SeedGroup], colors: list, key: str = FINAL_KEY) -> bool:
    """Dot plot of ``key`` per group, best on top, on an x axis from 0 (reaching the unigram entropy when
    known): the differences are read from the numbers right of the axes, not from an axis cut to make
    them look large."""
    rows = comparison_rows(groups, key)
    if not rows:
        return False
    color_of = {id(g): c for g, c in zip(groups, colors)}
    entropies = unigram_entropies(groups)[:1]
    top = max([max(s.values) for _, s, _ in rows] + entropies)
    small = 8 if len(rows) <= 20 else 7
    for y, (g, s, text) in enumerate(rows):
        color = color_of[id(g)]
        if s.n > 1:
            ax.scatter(s.values, [y] * s.n, s=22, facecolors="none", edgecolors=color, lw=1, zorder=3)
        ax.errorbar([s.mean], [y], xerr=[[s.std], [s.std]] if s.std else None, fmt="o", ms=7,
                    color=color, capsize=3, zorder=4)
        ax.annotate(text, (1.02, y), xycoords=("axes fraction", "data"), va="center", fontsize=small,
                    fontweight="bold" if g.baseline else None, annotation_clip=False)
    base = baseline_group(groups)
    base_stat = base.summary_stat(key) if base else None
    if base_stat is not None:
        ax.axvline(base_stat.mean, color=BASE_COLOR, ls="--", lw=0.9, zorder=1)
    for h in entropies:
        ax.axvline(h, color="0.45", ls=":", lw=1, zorder=1)
        ax.annotate(f"unigram entropy {h:.3f}", (h, 0.99), xycoords=("data", "axes fraction"), fontsize=7,
                    color="0.35", ha="right", va="top", rotation=90, xytext=(-2, 0), textcoords="offset points")
    ax.set_yticks(range(len(rows)), [short(g.label) + (" (baseline)" if g.baseline else "")
                                     + (f" (n={g.n})" if g.n > 1 else "") for g, _, _ in rows],
                  fontsize=9 if len(rows) <= 15 else 7.5)
    if len(rows) <= 10:  # qualitative colors read as text; a continuous map's light ones do not
        for tick, (g, _, _) in zip(ax.get_yticklabels(), rows):
            tick.set_color(color_of[id(g)])
    ax.set_ylim(len(rows) - 0.5, -0.5)  # best on top
    ax.set_xlim(0, top * 1.04)
    ax.set_xlabel("final " + LOSS_LABEL.replace("loss", "val loss"))
    ax.grid(axis="x", alpha=0.3)
    return True


def final_figure(groups: list[SeedGroup]) -> Figure | None:
    n = sum(1 for g in groups if g.summary_stat(FINAL_KEY))
    fig = Figure(figsize=(9, 1.4 + 0.3 * max(n, 2)), layout="constrained")
    ax = fig.add_subplot()
    if not draw_final(ax, groups, group_colors(groups)):
        return None
    ax.set_title(FINAL_TITLE + ("; dashed: baseline" if baseline_group(groups) else ""), fontsize=10)
    return fig


# --------------------------------------------------------------------------- the one figure

def summary_figure(groups: list[SeedGroup], options: CurveOptions, title: str) -> Figure | None:
    """Loss curves (left) and final val loss (right), sharing the groups' colors; the curves carry a color
    legend only when the right panel cannot stand for one (no final values, or a handful of groups)."""
    colors = group_colors(groups)
    n_final = sum(1 for g in groups if g.summary_stat(FINAL_KEY))
    n_final = n_final if n_final > 1 else 0  # one value compares with nothing: the curves alone
    height = max(4.8, 1.6 + 0.28 * n_final)
    fig = Figure(figsize=(15 if n_final else 8.5, height), layout="constrained")
    grid = fig.add_gridspec(1, 2, width_ratios=(3, 2)) if n_final else fig.add_gridspec(1, 1)
    left = fig.add_subplot(grid[0, 0])
    curves = draw_loss(left, groups, colors, options, raw=len(groups) <= 8, legend_groups=False)
    if n_final:
        right = fig.add_subplot(grid[0, 1])
        draw_final(right, groups, colors)
        right.set_title("final val loss (axis from 0)", fontsize=11)
    if not curves and not n_final:
        return None
    if curves:
        left.set_title("train and val loss", fontsize=11)
        if not n_final:
            group_legend(fig, groups, colors)
    else:
        left.set_axis_off()
        left.text(0.5, 0.5, "no loss curves logged", ha="center", va="center", transform=left.transAxes)
    fig.suptitle(title, fontsize=12)
    return fig


# --------------------------------------------------------------------------- per-run bars, eval

def bars_figure(bars: list[RunBar], xlabel: str, title: str) -> Figure | None:
    """Horizontal bars from 0, one per run in the order given (first on top); the baseline hatched."""
    if not bars:
        return None
    fig = Figure(figsize=(8, 1.2 + 0.32 * len(bars)), layout="constrained")
    ax = fig.add_subplot()
    drawn = ax.barh(range(len(bars)), [b.value for b in bars],
                    color=["0.35" if b.baseline else "tab:blue" for b in bars])
    for bar, b in zip(drawn, bars):
        if b.baseline:
            bar.set(hatch="//", edgecolor="white")
    ax.set_yticks(range(len(bars)), [short(b.label, 50) for b in bars], fontsize=8 if len(bars) <= 20 else 7)
    ax.set_ylim(len(bars) - 0.4, -0.6)
    ax.set_xlim(0, max(b.value for b in bars) * 1.18 or 1.0)
    ax.bar_label(drawn, [f"{b.value:,.0f}" for b in bars], padding=3, fontsize=7)
    ax.set(xlabel=xlabel, title=title)
    ax.grid(axis="x", alpha=0.3)
    return fig


def eval_figure(runs: list[EvalScores], metrics: list[tuple[str, str]]) -> Figure | None:
    """Grouped bars of task metrics scored between 0 and 1: one group per task metric, one bar per evaluated
    run (the baseline grey and hatched), error bars ± one standard error."""
    runs = [r for r in runs if any(m in r.scores for m in metrics)]
    if not runs:
        return None
    width = 0.8 / len(runs)
    fig = Figure(figsize=(max(6.0, 1.5 + len(metrics) * (0.5 + 0.22 * len(runs))), 5), layout="constrained")
    ax = fig.add_subplot()
    palette = [colormaps["tab10" if len(runs) <= 10 else "tab20"](i % 20) for i in range(len(runs))]
    for i, (run, color) in enumerate(zip(runs, palette)):
        present = [(j, *run.scores[m]) for j, m in enumerate(metrics) if m in run.scores]
        xs, values, errors = zip(*present)
        bars = ax.bar([x - 0.4 + width * (i + 0.5) for x in xs], values, width,
                      yerr=[e or 0.0 for e in errors], capsize=3,
                      color="0.35" if run.baseline else color, label=short(run.label, 44))
        if run.baseline:
            for bar in bars:
                bar.set(hatch="//", edgecolor="white")
    ax.set_xticks(range(len(metrics)), [f"{t}\n{m}" for t, m in metrics], fontsize=8)
    ax.set_xlim(-0.6, len(metrics) - 0.4)
    ax.set_ylim(0, 1.05)
    ax.set(ylabel="score", title="evaluation tasks (error bars: ± 1 standard error)")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8 if len(runs) <= 15 else 7, frameon=False,
               ncols=1 if len(runs) <= 18 else 2)
    return fig


# --------------------------------------------------------------------------- files

def write_plots(out_dir: Path, groups: list[SeedGroup], options: CurveOptions, title: str,
                speed: list[RunBar], evaluated: list[EvalScores], metrics: list[tuple[str, str]]) -> list[Path]:
    """Draw each figure some run has data for (figure.svg beside figure.png); remove a stale copy of one
    that has none, and the files of retired plot names. Returns the PNGs written, figure first."""
    options = available(groups, options)
    figures = {FIGURE: lambda: summary_figure(groups, options, title),
               LOSS_PLOT: lambda: loss_figure(groups, options),
               FINAL_PLOT: lambda: final_figure(groups),
               SPEED_PLOT: lambda: bars_figure(speed, "tokens/s", "training throughput (plan order, axis from 0)"),
               EVAL_PLOT: lambda: eval_figure(evaluated, metrics)}
    written = []
    for name in PLOTS:
        fig = figures[name]()
        paths = [out_dir / name, *([out_dir / FIGURE_SVG] if name == FIGURE else [])]
        for path in paths:
            if fig is None:
                path.unlink(missing_ok=True)
            else:
                save(fig, path)
        if fig is not None:
            written.append(out_dir / name)
    for name in RETIRED:
        (out_dir / name).unlink(missing_ok=True)
    return written
