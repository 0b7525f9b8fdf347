"""plan/plots.py, plan/plots_curves.py and plan/seeds.py on synthetic plan directories: the numbers the plots
draw, read back from the Figure objects, the seed groups and their table, reports across plans."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from plan.plots import draw_final, final_figure, group_colors, loss_figure, summary_figure
from plan.plots_curves import BPB_LABEL, LOSS_LABEL, CurveOptions, available, smooth, smoothing_window, val_band
from plan.report import load_rows, write_report
from plan.seeds import baseline_group, difference, group_runs, stat

# token counts 2, 1, 1 of three tokens: the unigram entropy by hand
UNIGRAM = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))


def write_run(plan_dir: Path, name: str, final: float, offset: float = 0.0, steps: int = 40, bpb: bool = False,
              tokens_per_step: int = 1000) -> None:
    """A done run: train loss every 2 steps, val loss every 10 (ending at ``final`` + ``offset``)."""
    run_dir = plan_dir / name
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(0, steps + 1, 2):
        lines.append({"step": step, "tokens": step * tokens_per_step, "train_loss": final + 2 - step / steps + offset,
                      "elapsed_s": step * 0.5})
        if step % 10 == 0:
            val = final + offset + (steps - step) / steps
            lines.append({"step": step, "tokens": step * tokens_per_step, "val_loss": val, "elapsed_s": step * 0.5,
                          **({"val_bpb": val / 2} if bpb else {})})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = {"status": "done", "steps": steps, "final_val_loss": final + offset, "best_val_loss": final + offset,
               "final_val_bpb": (final + offset) / 2, "tokens_per_s": 1000.0, "unigram_entropy_nats": UNIGRAM}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def write_plan(plan_dir: Path, mode: str, runs: list[dict]) -> None:
    plan_dir.mkdir(parents=True, exist_ok=True)
    runs = [{"status": "done", "error": None, "baseline": False, "differences": {}, **r} for r in runs]
    (plan_dir / "plan.json").write_text(json.dumps({"name": plan_dir.name, "mode": mode, "runs": runs}))


@pytest.fixture
def seeded(tmp_path) -> Path:
    """A matrix of 2 LRs x 2 seeds, as CONFIG_MATRIX_LRS and CONFIG_MATRIX_SEEDS=2 make it: no baseline run;
    the base cell (LR and SEED as the base's) records no differences."""
    d = tmp_path / "m"
    runs = [("lr1e-3-seed1", {}, 1.5, 0.0), ("lr1e-3-seed2", {"SEED": 2}, 1.5, 0.1),
            ("lr3e-3-seed1", {"LR": 0.003}, 1.2, 0.0), ("lr3e-3-seed2", {"LR": 0.003, "SEED": 2}, 1.2, 0.3)]
    write_plan(d, "matrix", [{"name": n, "differences": diff} for n, diff, _, _ in runs])
    for name, _, final, offset in runs:
        write_run(d, name, final, offset, bpb=True)
    return d


def groups_of(plan_dir: Path):
    return group_runs(load_rows(plan_dir)[1])


# --------------------------------------------------------------------------- seeds

def test_runs_differing_only_by_seed_are_one_group(seeded):
    groups = groups_of(seeded)
    assert [(g.label, g.n, g.baseline) for g in groups] == [("lr1e-3", 2, True), ("lr3e-3", 2, False)]
    assert groups[0].seeds() == ["base", "2"] and baseline_group(groups) is groups[0]
    final = groups[1].summary_stat("final_val_loss")
    assert final.values == (1.2, 1.5) and final.mean == pytest.approx(1.35)
    assert final.std == pytest.approx(statistics.stdev([1.2, 1.5]))


def test_repeats_and_other_stages_are_not_seeds(tmp_path):
    d = tmp_path / "p"
    write_plan(d, "ablation", [{"name": "base", "baseline": True}, {"name": "noop"},  # equal configs, equal seed
                               {"name": "seed7", "differences": {"SEED": 7}},
                               {"name": "sft", "stage": "sft", "differences": {"SEED": 9}}])
    for name in ("base", "noop", "seed7", "sft"):
        write_run(d, name, 1.0)
    assert [(g.label, g.n) for g in groups_of(d)] == [("base", 1), ("noop", 1), ("seed7", 1), ("sft", 1)]
    write_plan(d, "ablation", [{"name": "base", "baseline": True}, {"name": "seed7", "differences": {"SEED": 7}}])
    (group,) = groups_of(d)
    assert (group.label, group.n, group.baseline, group.seeds()) == ("base", 2, True, ["base", "7"])


def test_stat_and_difference_by_hand():
    a, b = stat([1.0, 2.0, 3.0]), stat([2.0, 4.0])
    assert (a.mean, a.std, a.n) == (2.0, 1.0, 3) and b.std == pytest.approx(math.sqrt(2))
    delta, se = difference(a, b)
    assert delta == -1.0 and se == pytest.approx(math.sqrt(1 / 3 + 2 / 2))
    assert difference(stat([1.0]), b) == (-2.0, None) and stat([None, float("nan")]) is None


# --------------------------------------------------------------------------- curves

def test_seed_band_is_mean_plus_minus_std(seeded):
    groups = groups_of(seeded)
    band = val_band(groups[1], CurveOptions())
    assert band.x == (0, 10000, 20000, 30000, 40000) and band.n == (2,) * 5
    # the two seeds' val losses differ by 0.3 at every step
    first = [1.2 + 1.0, 1.5 + 1.0]
    sd = statistics.stdev(first)
    assert band.mean[0] == pytest.approx(statistics.mean(first))
    assert band.low[0] == pytest.approx(statistics.mean(first) - sd)
    assert band.high[0] == pytest.approx(statistics.mean(first) + sd)


def test_smoothing_is_a_bias_corrected_ema():
    assert smooth([1.0, 3.0, 5.0], 1) == [1.0, 3.0, 5.0]
    # window 3: weight 0.5 on the past; 0.5·1 / 0.5 = 1, (0.25 + 1.5) / 0.75
    assert smooth([1.0, 3.0], 3) == pytest.approx([1.0, 1.75 / 0.75])
    assert (smoothing_window(10), smoothing_window(400), smoothing_window(10**6)) == (1, 20, 50)


def lines(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_loss_figure_axes_units_and_unigram_line(seeded):
    fig = loss_figure(groups_of(seeded), CurveOptions())
    loss_ax, bpb_ax = fig.axes
    assert loss_ax.get_xlabel() == "tokens trained" and loss_ax.get_ylabel() == LOSS_LABEL == "loss (nats/token)"
    assert bpb_ax.get_ylabel() == BPB_LABEL and loss_ax.get_xscale() == "linear"
    unigram = [line for line in loss_ax.get_lines() if list(line.get_xdata()) == [0, 1]]  # axhline's own x
    assert len(unigram) == 1 and unigram[0].get_ydata()[0] == pytest.approx(UNIGRAM, abs=1e-4)
    legend = [t.get_text() for t in loss_ax.get_legend().get_texts()]
    assert legend == ["train", "val", "mean over seeds; band ± 1 std", f"unigram entropy of train tokens, {UNIGRAM:.3f}"]
    figure_legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert figure_legend == ["lr1e-3 (baseline) (n=2)", "lr3e-3 (n=2)"]


def test_log_x_steps_and_wall_time(seeded):
    groups = groups_of(seeded)
    ax = loss_figure(groups, CurveOptions(x="step", logx=True)).axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "step"
    assert min(min(line.get_xdata()) for line in ax.get_lines()
               if list(line.get_xdata()) != [0, 1]) > 0  # step 0 has no place on a log axis
    assert loss_figure(groups, CurveOptions(x="time")).axes[0].get_xlabel() == "wall time (s)"
    rows = load_rows(seeded)[1]
    for row in rows:  # metrics.jsonl from before tokens were logged: steps on x
        row["evals"] = [{k: v for k, v in e.items() if k != "tokens"} for e in row["evals"]]
        row["train"] = [{k: v for k, v in e.items() if k != "tokens"} for e in row["train"]]
    assert available(group_runs(rows), CurveOptions(logx=True)) == CurveOptions("step", True)
    assert available(groups, CurveOptions()) == CurveOptions()
    with pytest.raises(ValueError, match="REPORT_X='epoch'"):
        CurveOptions(x="epoch")


def test_long_runs_smoothed_in_the_legend(tmp_path):
    d = tmp_path / "p"
    write_plan(d, "single", [{"name": "base", "baseline": True}])
    write_run(d, "base", 1.0, steps=400)  # 201 train points: an EMA over 10
    ax = loss_figure(groups_of(d), CurveOptions()).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["train, EMA over 10 logged points", "train, raw"]


# --------------------------------------------------------------------------- final val loss

def test_final_dot_plot_starts_at_zero_and_marks_the_baseline(seeded):
    groups = groups_of(seeded)
    fig = final_figure(groups)
    ax = fig.axes[0]
    assert ax.get_xlim()[0] == 0 and ax.get_xlim()[1] >= 1.6
    assert [t.get_text() for t in ax.get_yticklabels()] == ["lr3e-3 (n=2)", "lr1e-3 (baseline) (n=2)"]  # best on top
    base = statistics.mean([1.5, 1.6])
    assert [line.get_xdata()[0] for line in ax.get_lines() if list(line.get_ydata()) == [0, 1]][0] == \
        pytest.approx(base)  # the dashed baseline line
    texts = [t.get_text() for t in ax.texts]
    se = math.sqrt(statistics.variance([1.2, 1.5]) / 2 + statistics.variance([1.5, 1.6]) / 2)
    assert texts[0] == f"1.3500 ± {statistics.stdev([1.2, 1.5]):.4f}  Δ {1.35 - base:+.4f} ± {se:.4f}"
    assert texts[1].endswith("  baseline") and any(t.startswith("unigram entropy") for t in texts)


def test_summary_figure_side_by_side(seeded, tmp_path):
    fig = summary_figure(groups_of(seeded), CurveOptions(), "plan m")
    assert len(fig.axes) == 2 and fig.get_suptitle() == "plan m"
    assert fig.axes[0].get_ylabel() == LOSS_LABEL and fig.axes[1].get_xlim()[0] == 0
    one = tmp_path / "one"
    write_plan(one, "single", [{"name": "base", "baseline": True}])
    write_run(one, "base", 1.0)
    assert len(summary_figure(groups_of(one), CurveOptions(), "plan one").axes) == 1  # nothing to compare with
    assert group_colors(groups_of(seeded))[0] == "black"


def test_thirty_groups_drawn(tmp_path):
    d = tmp_path / "p"
    write_plan(d, "matrix", [{"name": f"lr{i}", "differences": {"LR": i / 1000}} for i in range(1, 31)])
    for i in range(1, 31):
        write_run(d, f"lr{i}", 1 + i / 100)
    groups = groups_of(d)
    assert len(groups) == 30 and baseline_group(groups) is None
    fig = summary_figure(groups, CurveOptions(), "p")
    assert len(fig.axes[1].get_yticklabels()) == 30 and fig.get_size_inches()[1] > 9
    from matplotlib.figure import Figure
    assert draw_final(Figure().add_subplot(), [], []) is False


# --------------------------------------------------------------------------- the report

def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_seed_table_and_per_run_rows(seeded):
    written = {p.name for p in write_report(seeded)}
    assert {"figure.png", "figure.svg", "loss.png", "final_val_loss.png"} <= written
    assert (seeded / "figure.svg").read_text().lstrip().startswith("<?xml")
    md = (seeded / "report.md").read_text().splitlines()
    start = md.index("## Seeds")
    sd = statistics.stdev([1.2, 1.5])
    assert md[start + 4] == ("| `lr1e-3` (`lr1e-3-seed1`, `lr1e-3-seed2`) | 2 | base, 2 | 1.5500 ± 0.0707 | (baseline) | "
                             "1.5500 ± 0.0707 | 0.7750 ± 0.0354 |")
    se = math.sqrt(sd ** 2 / 2 + statistics.variance([1.5, 1.6]) / 2)
    assert md[start + 5].startswith(f"| `lr3e-3` (`lr3e-3-seed1`, `lr3e-3-seed2`) | 2 | base, 2 | 1.3500 ± {sd:.4f} | "
                                    f"-0.2000 ± {se:.4f} |")
    assert "![figure](figure.png) ([SVG](figure.svg))" in md
    rows = read_csv(seeded / "report.csv")
    assert [r["run"] for r in rows] == ["lr1e-3-seed1", "lr1e-3-seed2", "lr3e-3-seed1", "lr3e-3-seed2"]
    assert [r["seed_group"] for r in rows] == ["lr1e-3", "lr1e-3", "lr3e-3", "lr3e-3"] and rows[0]["plan"] == "m"


def test_no_seed_section_without_seeds(tmp_path):
    d = tmp_path / "p"
    write_plan(d, "ablation", [{"name": "base", "baseline": True}, {"name": "rope", "differences": {"POS_ROPE": True}}])
    write_run(d, "base", 1.0)
    write_run(d, "rope", 0.9)
    write_report(d)
    assert "## Seeds" not in (d / "report.md").read_text()
    assert read_csv(d / "report.csv")[0]["seed_group"] == ""


def test_report_across_plans(seeded, tmp_path):
    a = tmp_path / "a"
    write_plan(a, "single", [{"name": "base", "baseline": True}])
    write_run(a, "base", 1.4)
    summary = json.loads((a / "base" / "summary.json").read_text())
    summary["eval"] = {"checkpoint": "best", "generation": {"file": "eval/samples.txt"}}
    (a / "base" / "summary.json").write_text(json.dumps(summary))
    written = write_report(a, seeded)
    out = tmp_path / "report-a+m"
    assert {p.parent for p in written} == {out} and (out / "figure.png").exists()
    md = (out / "report.md").read_text()
    assert md.startswith("# Report across plans a, m, 5 runs (5 done)")
    assert "vs baseline `a/base` (1.4000)" in md and "`m/lr3e-3` (`m/lr3e-3-seed1`, `m/lr3e-3-seed2`)" in md
    rows = read_csv(out / "report.csv")
    assert [r["plan"] for r in rows] == ["a", "m", "m", "m", "m"] and rows[1]["run"] == "m/lr1e-3-seed1"
    assert rows[0]["samples_file"] == "../a/base/eval/samples.txt"
    assert not (a / "report.md").exists()  # the plans' own reports are theirs
    elsewhere = tmp_path / "cmp"
    assert {p.parent for p in write_report(a, seeded, out=elsewhere)} == {elsewhere}


def test_stale_plots_removed(seeded):
    for name in ("val_loss_vs_step.png", "val_bpb_vs_tokens.png"):  # earlier reports' names
        (seeded / name).write_bytes(b"old")
    write_report(seeded)
    assert not (seeded / "val_loss_vs_step.png").exists() and not (seeded / "val_bpb_vs_tokens.png").exists()
    plan = json.loads((seeded / "plan.json").read_text())
    for run in plan["runs"]:
        (seeded / run["name"] / "metrics.jsonl").unlink()
        (seeded / run["name"] / "summary.json").unlink()
        run["status"] = "pending"
    (seeded / "plan.json").write_text(json.dumps(plan))
    assert {p.name for p in write_report(seeded)} == {"report.md", "report.csv"}
    assert not any((seeded / n).exists() for n in ("figure.png", "figure.svg", "loss.png", "final_val_loss.png"))


def test_make_report_command(seeded, tmp_path, monkeypatch, capsys):
    from kbuild.__main__ import main

    for name in ("PLAN", "PLANS", "REPORT_X", "REPORT_LOGX", "REPORT_DIR"):
        monkeypatch.delenv(name, raising=False)
    a = tmp_path / "a"
    write_plan(a, "single", [{"name": "base", "baseline": True}])
    write_run(a, "base", 1.4)
    assert main(["report", "--plans", f"{a} {seeded}", "--x", "step", "--logx", "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "figure.svg").exists() and str(tmp_path / "r" / "report.md") in capsys.readouterr().out
    monkeypatch.setenv("PLAN", str(tmp_path / "nowhere"))
    assert main(["report"]) == 1 and "no plan.json in" in capsys.readouterr().err


def _with_unigram(plan_dir: Path, entropy: float) -> None:
    for summary in plan_dir.glob("*/summary.json"):
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "unigram_entropy_nats": entropy}))


def test_loss_axis_tops_out_above_the_unigram_line_unless_a_run_ends_above_it(tmp_path):
    """Curves start near log(vocab) (here 3.5) and end far below the unigram line (2.0): the axis stops a little
    above the line; a run that ends above it (diverged) keeps the whole range on the chart."""
    d = tmp_path / "p"
    write_plan(d, "ablation", [{"name": "a", "baseline": True}, {"name": "b", "differences": {"LR": 0.01}}])
    write_run(d, "a", 0.5)
    write_run(d, "b", 0.6)
    _with_unigram(d, 2.0)
    ax = loss_figure(group_runs(load_rows(d)[1]), CurveOptions()).axes[0]
    low, high = ax.get_ylim()
    assert high == pytest.approx(2.0 + 0.12 * (2.0 - low)) and 2.0 < high < 2.5  # first train loss 2.5 is cut
    diverged = tmp_path / "q"
    write_plan(diverged, "ablation", [{"name": "a", "baseline": True}, {"name": "b", "differences": {"LR": 0.01}}])
    write_run(diverged, "a", 0.5)
    write_run(diverged, "b", 2.2)  # ends above the line
    _with_unigram(diverged, 2.0)
    ax = loss_figure(group_runs(load_rows(diverged)[1]), CurveOptions()).axes[0]
    assert ax.get_ylim()[1] >= 4.2  # b's first train loss (2.2 + 2) is on the chart
