"""Progress that tells the time (train/progress.py, train/sample.py): timed step lines off a terminal,
the ETA arithmetic (MAX_ITERS and MAX_TIME), the bar's postfix, and 'make sample' naming what it sampled
and showing a bar of tokens."""

from __future__ import annotations

import io

import pytest
import torch

from conftest import config_of
from data.tokenizer import Tokenizer
from model.gpt import GPT, ModelConfig
from train.progress import STEP_LINE, TrainProgress, estimate, hms
from train.sample import SampleConfig, generate_text, provenance

# The trainer's step line as log_step writes it (train/trainer.py).
LINE = "step     50/100 | loss 2.1235 | lr 1.00e-03 | grad norm 0.512 | 12,345 tok/s"


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_eta_is_this_attempts_rate_times_the_steps_left():
    t = estimate(steps_done=10, elapsed=20.0, steps_left=90)  # 2 s/step, 90 steps left
    assert (t.elapsed, t.eta, t.time_limited) == (20.0, 180.0, False)
    assert t.text() == "elapsed 0:00:20 | eta 0:03:00"
    assert estimate(0, 0.0, 100).eta is None and estimate(0, 0.0, 100).text() == "elapsed 0:00:00 | eta ?"
    assert estimate(60, 120.0, 0).eta == 0.0  # the last step


def test_eta_with_max_time_is_the_time_left_when_the_limit_comes_first():
    limited = estimate(10, 20.0, 90, max_time=100)  # 80 s to the limit, before the 180 s the steps need
    assert (limited.eta, limited.time_limited) == (80.0, True)
    assert limited.text() == "elapsed 0:00:20 | eta 0:01:20 (time limit)"
    assert estimate(10, 20.0, 90, max_time=1000) == estimate(10, 20.0, 90)  # MAX_ITERS comes first
    assert estimate(10, 150.0, 90, max_time=100).eta == 0.0  # past the limit: the run stops now
    assert estimate(0, 0.0, 90, max_time=60).eta == 60.0  # no rate yet, but the limit is known


def test_hms_rounds_to_the_second_with_unbounded_hours():
    assert [hms(s) for s in (0, 59.4, 59.6, 3723, 180000, -3)] == [
        "0:00:00", "0:00:59", "0:01:00", "1:02:03", "50:00:00", "0:00:00"]


def test_off_a_terminal_step_lines_gain_elapsed_and_eta_and_nothing_else_is_printed():
    plain, lines, clock = io.StringIO(), [], FakeClock()
    p = TrainProgress(total=100, stream=plain, clock=clock)
    log = p.wrap_log(lines.append)
    log("model: 1,234 parameters")
    p.update(20)  # a resumed run: this attempt starts at step 20
    clock.now += 90.0
    p.update(50)
    log(LINE)
    log("eval step 50: val 2.0")
    p.close()
    assert plain.getvalue() == "" and not p.enabled
    # 30 steps in 90 s this attempt: 3 s/step, 50 steps left.
    assert lines == ["model: 1,234 parameters", LINE + " | elapsed 0:01:30 | eta 0:02:30", "eval step 50: val 2.0"]
    found = STEP_LINE.match(lines[1])
    assert found.group("step", "total", "loss", "tokens_per_s", "elapsed", "eta", "limit") == (
        "50", "100", "2.1235", "12,345", "0:01:30", "0:02:30", None)
    assert p.timed(lines[1]) == lines[1], "a timed line is not timed twice"


def test_from_config_bounds_the_eta_by_max_time():
    clock = FakeClock()
    p = TrainProgress.from_config(config_of(MAX_TIME=120), total=100, stream=io.StringIO())
    assert p.max_time == 120 and TrainProgress.from_config(config_of(), 100, io.StringIO()).max_time == 0
    p.clock = clock
    p.update(0)
    clock.now += 100.0
    p.update(10)  # 10 s/step: 900 s to MAX_ITERS, but the limit is 20 s away
    timed = p.timed(LINE.replace("step     50/100", "step     10/100"))
    assert timed.endswith(" | elapsed 0:01:40 | eta 0:00:20 (time limit)")
    assert STEP_LINE.match(timed)["limit"] == " (time limit)"


def test_the_bar_shows_loss_tokens_per_s_and_eta_from_the_step_line():
    tty, lines, clock = FakeTTY(), [], FakeClock()
    p = TrainProgress(total=100, stream=tty, clock=clock)
    log = p.wrap_log(lines.append)
    p.update(0)
    clock.now += 100.0
    p.update(50)
    log(LINE)
    assert p.bar.postfix == "loss=2.1235, tok/s=12,345, eta=0:01:40"
    p.update(51)  # the bar redraws with the new postfix
    p.close()
    out = tty.getvalue()
    assert "51/100" in out and "loss=2.1235, tok/s=12,345, eta=0:01:40" in out
    assert lines == [LINE + " | elapsed 0:01:40 | eta 0:01:40"]


def test_the_step_line_pattern_reads_the_trainers_optional_fields():
    line = LINE + " | MFU 12.5% | mtp 2.5 | skipped 2"
    found = STEP_LINE.match(line)
    assert (found["loss"], found["tokens_per_s"], found["elapsed"]) == ("2.1235", "12,345", None)
    found = STEP_LINE.match("step      3/10 | loss nan | lr 1.00e-03 | grad norm inf | 1,000 tok/s | skipped 1")
    assert found["loss"] == "nan"
    assert STEP_LINE.match("eval step 50: val 2.0") is None


CHARS = Tokenizer.fit("char", "".join(map(chr, range(32, 96))))  # 64 characters, the model's vocab


def tiny_model() -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=16)
    return GPT(config).eval()


@pytest.mark.parametrize("stop", [(), ("Q",)])
def test_a_sampling_bar_counts_tokens_and_draws_the_same_text(stop):
    model, cpu = tiny_model(), torch.device("cpu")
    sample = SampleConfig(prompt="AB", tokens=12, temperature=0.8, stop=stop)
    plain = generate_text(model, CHARS, sample, cpu)
    tty = FakeTTY()
    assert generate_text(model, CHARS, sample, cpu, progress=True, stream=tty) == plain
    out = tty.getvalue()
    assert "sample:" in out and "/12" in out
    piped = io.StringIO()
    assert generate_text(model, CHARS, sample, cpu, progress=None, stream=piped) == plain
    assert piped.getvalue() == "", "nothing extra when piped"


def test_provenance_names_the_run_the_checkpoint_its_step_and_the_best():
    assert provenance("runs/x", "runs/x/checkpoints/step-00000200.pt", 200, 200, 150, 1.23456) == (
        "sample: run runs/x, checkpoint runs/x/checkpoints/step-00000200.pt (step 200 of 200, latest; "
        "the best val loss 1.2346 was at step 150)")
    assert provenance("r", "c", 200, 200, 200, 1.2) == (
        "sample: run r, checkpoint c (step 200 of 200, latest, also the best by val loss)")
    assert provenance("r", "c", 5) == "sample: run r, checkpoint c (step 5, latest)"


@pytest.mark.slow
def test_a_training_run_logs_timed_lines_and_make_sample_names_its_checkpoint(tmp_path, monkeypatch, capsys):
    from test_trainer import run

    import kbuild.__main__ as cli

    summary, run_dir, logs = run(tmp_path, "MAX_ITERS=20")
    steps = [STEP_LINE.match(m) for m in logs if STEP_LINE.match(m)]
    assert [s["step"] for s in steps] == ["10", "20"] and all(s["elapsed"] and s["eta"] != "?" for s in steps)
    assert steps[-1]["eta"] == "0:00:00" and steps[-1]["limit"] is None
    for name in ("PROMPT", "TOKENS", "TOP_P", "STOP"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["sample", "--run", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert out == (run_dir / "samples.txt").read_text(), "the sample text on stdout, unchanged"
    assert f"sample: run {run_dir}, checkpoint {run_dir}/checkpoints/step-00000020.pt (step 20 of 20, latest" in err
