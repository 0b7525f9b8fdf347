"""Loss curves of a report: train loss (smoothed; raw drawn faint) and val loss on one set of axes, against
tokens trained (the default), steps or wall time, log x optional; val bits per byte in a second panel
when runs log ``val_bpb``; the unigram entropy of the training tokens as a reference line.

A seed group (plan/seeds.py) is one curve: at each step, the mean over the group's runs that logged it,
and a band of ± one sample standard deviation where two or more did. Runs are aligned by step (the x of
a point is the runs' mean x there), so seeds line up on the wall-time axis too.

The functions here prepare numbers (``points``, ``smooth``, ``band``, ``unigram_entropies``) and draw
them on given axes; plan/plots.py lays out the figures and writes the files.
"""

from __future__ import annotations

from dataclasses import dataclass

from matplotlib.ticker import EngFormatter

from plan.seeds import SeedGroup, finite, stat

# REPORT_X value -> (metrics.jsonl key, axis label)
X_AXES = {"tokens": ("tokens", "tokens trained"), "step": ("step", "step"), "time": ("elapsed_s", "wall time")}
LOSS_LABEL = "loss (nats/token)"
BPB_LABEL = "val bits per byte"
BAND_TEXT = "band ± 1 std"


@dataclass(frozen=True)
class CurveOptions:
    """How the curves are drawn: x is a key of X_AXES; logx draws x on a log scale (points at x <= 0 left out)."""
    x: str = "tokens"
    logx: bool = False

    def __post_init__(self):
        if self.x not in X_AXES:
            raise ValueError(f"REPORT_X={self.x!r}: use one of {', '.join(X_AXES)}")


def available(groups: list[SeedGroup], options: CurveOptions) -> CurveOptions:
    """``options``, or steps on x when no run logged the x asked for (metrics.jsonl from before tokens were
    logged): a plot against steps beats none."""
    x_key = X_AXES[options.x][0]
    logged = any(finite(r.get(x_key)) is not None for g in groups for row in g.rows for r in row["evals"] + row["train"])
    return options if logged else CurveOptions("step", options.logx)


@dataclass(frozen=True)
class Band:
    """A group's curve: per aligned step, x, the mean, mean ∓ std (the mean itself where one run has it), n."""
    x: tuple[float, ...]
    mean: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    n: tuple[int, ...]


def points(records: list[dict], x_key: str, y_key: str, logx: bool = False) -> dict[float, tuple[float, float]]:
    """{step: (x, y)} of the records that have a finite step, x and y (x > 0 on a log axis)."""
    out = {}
    for r in records:
        step, x, y = finite(r.get("step")), finite(r.get(x_key)), finite(r.get(y_key))
        if step is not None and x is not None and y is not None and not (logx and x <= 0):
            out[step] = (x, y)
    return dict(sorted(out.items()))


def smoothing_window(n: int) -> int:
    """Logged points an EMA of ``n`` points averages over: a twentieth of them, between 1 (none) and 50."""
    return max(1, min(50, n // 20))


def smooth(values: list[float], window: int) -> list[float]:
    """Exponential moving average with weight 1 - 2/(window + 1) on the past, bias-corrected at the start (as
    TensorBoard's smoothing is), so the first point is the first value and a window of 1 returns the values."""
    beta = 1 - 2 / (window + 1)
    out, acc = [], 0.0
    for i, v in enumerate(values, start=1):
        acc = beta * acc + (1 - beta) * v
        out.append(acc / (1 - beta ** i) if beta else v)
    return out


def smoothed(series: dict[float, tuple[float, float]], window: int) -> dict[float, tuple[float, float]]:
    steps = list(series)
    ys = smooth([series[s][1] for s in steps], window)
    return {s: (series[s][0], y) for s, y in zip(steps, ys)}


def band(series: list[dict[float, tuple[float, float]]]) -> Band | None:
    """Mean and ± std of the runs' series per step (each step where at least one run has a point)."""
    steps = sorted({s for one in series for s in one})
    if not steps:
        return None
    xs, mean, low, high, n = [], [], [], [], []
    for s in steps:
        here = [one[s] for one in series if s in one]
        y = stat(p[1] for p in here)
        xs.append(sum(p[0] for p in here) / len(here))
        spread = y.std or 0.0
        mean.append(y.mean), low.append(y.mean - spread), high.append(y.mean + spread), n.append(y.n)
    return Band(tuple(xs), tuple(mean), tuple(low), tuple(high), tuple(n))


def val_band(group: SeedGroup, options: CurveOptions, y_key: str = "val_loss") -> Band | None:
    x_key = X_AXES[options.x][0]
    return band([p for row in group.rows if (p := points(row["evals"], x_key, y_key, options.logx))])


def train_series(group: SeedGroup, options: CurveOptions) -> list[dict[float, tuple[float, float]]]:
    x_key = X_AXES[options.x][0]
    return [p for row in group.rows if (p := points(row["train"], x_key, "train_loss", options.logx))]


def train_window(groups: list[SeedGroup], options: CurveOptions) -> int:
    """One smoothing window for every run (from the longest), so curves compare alike and one legend says it."""
    lengths = [len(p) for g in groups for p in train_series(g, options)]
    return smoothing_window(max(lengths, default=0))


def train_band(group: SeedGroup, options: CurveOptions, window: int) -> Band | None:
    return band([smoothed(p, window) for p in train_series(group, options)])


def unigram_entropies(groups: list[SeedGroup]) -> list[float]:
    """The distinct unigram entropies (nats/token) of the pretraining runs' train tokens, from summary.json's
    ``unigram_entropy_nats`` (data/stream.py counts the train split's tokens); post-training runs are left out
    (their loss is over other data)."""
    found = {round(v, 4) for g in groups for row in g.rows if "post_training" not in row["summary"]
             and (v := finite(row["summary"].get("unigram_entropy_nats"))) is not None}
    return sorted(found)


def x_scale(options: CurveOptions, bands: list[Band]) -> tuple[float, str]:
    """Divisor and axis label for x: wall time in s, min or h by its largest value."""
    label = X_AXES[options.x][1]
    if options.x != "time":
        return 1.0, label
    top = max((max(b.x) for b in bands), default=0.0)
    divisor, unit = (3600.0, "h") if top >= 3 * 3600 else (60.0, "min") if top >= 180 else (1.0, "s")
    return divisor, f"{label} ({unit})"


def format_x_axis(ax, options: CurveOptions, label: str) -> None:
    ax.set_xlabel(label)
    if options.logx:
        ax.set_xscale("log")
    elif options.x == "tokens":
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def draw_band(ax, b: Band, divisor: float, color, *, lw: float, ls: str = "-", marker=None, label=None,
              alpha_band: float = 0.18, zorder: float = 2) -> None:
    xs = [x / divisor for x in b.x]
    ax.plot(xs, b.mean, color=color, lw=lw, ls=ls, marker=marker, ms=4, label=label, zorder=zorder)
    if max(b.n) > 1:
        ax.fill_between(xs, b.low, b.high, color=color, alpha=alpha_band, lw=0, zorder=zorder - 0.5)


def draw_loss(ax, groups: list[SeedGroup], colors: list, options: CurveOptions, *, raw: bool = True,
              legend_groups: bool = True) -> bool:
    """Train (EMA, raw faint) and val loss of every group on ``ax``; False when no run logged a loss."""
    window = train_window(groups, options)
    bands = [(g, c, val_band(g, options), train_band(g, options, window)) for g, c in zip(groups, colors)]
    bands = [item for item in bands if item[2] or item[3]]
    if not bands:
        return False
    divisor, label = x_scale(options, [b for _, _, v, t in bands for b in (v, t) if b])
    for group, color, val, train in bands:
        if raw and train:
            x_key = X_AXES[options.x][0]
            for row in group.rows:
                p = points(row["train"], x_key, "train_loss", options.logx)
                ax.plot([x / divisor for x, _ in p.values()], [y for _, y in p.values()], color=color, lw=0.6,
                        alpha=0.18, zorder=1)
        lw = (2.2 if group.baseline else 1.4) if len(bands) <= 10 else (1.8 if group.baseline else 0.9)
        name = group.label + (" (baseline)" if group.baseline else "") + (f" (n={group.n})" if group.n > 1 else "")
        if train:
            draw_band(ax, train, divisor, color, lw=lw, label=name if legend_groups else None)
        if val:
            draw_band(ax, val, divisor, color, lw=lw, ls="--", marker="o" if len(val.x) <= 30 and len(bands) <= 10 else None,
                      label=None if train or not legend_groups else name, zorder=3)
    entropies = unigram_entropies(groups)
    for i, h in enumerate(entropies[:3]):
        ax.axhline(h, color="0.45", lw=1, ls=(0, (1, 2 + i)), zorder=0)
    clip_above_unigram(ax, [b for _, _, v, t in bands for b in (v, t) if b], entropies[:3])
    format_x_axis(ax, options, label)
    ax.set_ylabel(LOSS_LABEL)
    ax.grid(alpha=0.3)
    style_legend(ax, window, raw, any(max(b.n) > 1 for _, _, v, t in bands for b in (v, t) if b), entropies[:3])
    return True


def clip_above_unigram(ax, bands: list[Band], entropies: list[float]) -> None:
    """Keep the view on where models differ: the y axis tops out a little above the unigram-entropy line (the
    first steps' descent from log(vocab) is cut) when every curve ends below it; a run that ends above it (one
    that diverged or never learned) keeps the full range, so it is never drawn off the chart."""
    if not entropies or any(b.mean[-1] >= max(entropies) for b in bands):
        return
    low, high = ax.get_ylim()
    top = max(entropies) + 0.12 * (max(entropies) - low)
    if high > top:
        ax.set_ylim(low, top)


def style_legend(ax, window: int, raw: bool, seeds: bool, entropies: list[float]) -> None:
    """What the line styles mean, inside the axes (the groups' colors get their own legend)."""
    from matplotlib.lines import Line2D

    smoothing = f"train, EMA over {window} logged points" if window > 1 else "train"
    handles = [Line2D([], [], color="0.2", lw=1.4, label=smoothing)]
    if raw and window > 1:
        handles.append(Line2D([], [], color="0.2", lw=0.6, alpha=0.3, label="train, raw"))
    handles.append(Line2D([], [], color="0.2", lw=1.4, ls="--", marker="o", ms=4, label="val"))
    if seeds:
        handles.append(Line2D([], [], color="0.2", lw=6, alpha=0.18, label="mean over seeds; " + BAND_TEXT))
    for i, h in enumerate(entropies):
        handles.append(Line2D([], [], color="0.45", lw=1, ls=(0, (1, 2 + i)),
                              label=f"unigram entropy of train tokens, {h:.3f}"))
    ax.add_artist(ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.85))


def draw_bpb(ax, groups: list[SeedGroup], colors: list, options: CurveOptions) -> bool:
    """Val bits per byte of every group that logged it; False when none did."""
    bands = [(g, c, b) for g, c in zip(groups, colors) if (b := val_band(g, options, "val_bpb"))]
    if not bands:
        return False
    divisor, label = x_scale(options, [b for _, _, b in bands])
    for group, color, b in bands:
        draw_band(ax, b, divisor, color, lw=(2.2 if group.baseline else 1.4) if len(bands) <= 10 else 0.9, ls="--",
                  marker="o" if len(b.x) <= 30 and len(bands) <= 10 else None)
    format_x_axis(ax, options, label)
    ax.set_ylabel(BPB_LABEL)
    ax.grid(alpha=0.3)
    return True
