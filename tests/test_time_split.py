"""train/time_split.py: where an attempt's wall time goes, on a fake clock and in a real (tiny) run."""

from __future__ import annotations

import pytest

from test_trainer import run
from train.time_split import PARTS, TimeSplit


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_parts_nest_without_counting_twice_and_the_rest_is_other():
    clock = FakeClock()
    times = TimeSplit(clock)
    with times.part("train"):
        clock.now += 3.0
    with times.part("eval"):
        clock.now += 1.0
        with times.part("checkpoint"):  # best.pt written inside an evaluation
            clock.now += 0.5
        clock.now += 0.25
    clock.now += 0.25  # the loop's own bookkeeping
    split = times.summary()
    assert split == {"total_s": 5.0, "train_s": 3.0, "eval_s": 1.25, "checkpoint_s": 0.5, "log_s": 0.0,
                     "sample_s": 0.0, "other_s": 0.25}
    assert times.describe() == ("time: train 60.0% (3.0s) | eval 25.0% (1.2s) | checkpoint 10.0% (0.5s) | "
                                "log 0.0% (0.0s) | sample 0.0% (0.0s) | other 5.0% (0.2s)")
    with pytest.raises(ValueError, match="unknown time part 'evaluation'"):
        with times.part("evaluation"):
            pass
    times.start()
    assert times.summary()["total_s"] == 0.0 and all(v == 0.0 for v in times.seconds.values())


def test_an_exception_inside_a_part_still_counts_its_time():
    clock = FakeClock()
    times = TimeSplit(clock)
    with pytest.raises(RuntimeError):
        with times.part("train"):
            clock.now += 2.0
            raise RuntimeError("out of memory")
    assert times.summary()["train_s"] == 2.0 and times._open == []


@pytest.mark.slow
def test_a_run_records_its_time_split(tmp_path):
    summary, _, logs = run(tmp_path, "MAX_ITERS=20 EVAL_INTERVAL=10 CHECKPOINT_INTERVAL=10")
    split = summary["time_split"]
    assert set(split) == {"total_s", "other_s", *(f"{p}_s" for p in PARTS)}
    parts = sum(v for k, v in split.items() if k != "total_s")
    assert parts == pytest.approx(split["total_s"], rel=1e-6)
    # every part that happened took some time; the attempt's total is the run's wall time up to the summary
    assert all(split[f"{p}_s"] > 0 for p in PARTS) and split["total_s"] <= summary["wall_time_s"]
    assert split["train_s"] > split["log_s"]
    assert any(m.startswith("time: train ") and "| other " in m for m in logs)
