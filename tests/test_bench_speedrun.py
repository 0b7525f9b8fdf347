"""scripts/bench_speedrun.py end to end on a corpus the preset was not tuned on: the Python reference
documentation's English prose (pydoc_data/topics.py, which the embedded corpus leaves out), through DATA_PATH.
It trains both presets in full (about 2-3 minutes on 2 cores). Wall-time ratios are printed, never asserted."""

from __future__ import annotations

import json
import sys

import pytest

import pydoc_data.topics

sys.path.insert(0, "scripts")
import bench_speedrun  # noqa: E402


@pytest.mark.slow
def test_speedrun_reaches_the_baseline_on_english_prose(tmp_path, capsys):
    corpus = tmp_path / "python-docs.txt"
    corpus.write_text("\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)))
    assert corpus.stat().st_size > 400_000
    out = tmp_path / "speedrun.json"
    assert bench_speedrun.main(["--data-path", str(corpus), "--json", str(out), "--keep", str(tmp_path / "w")]) == 0
    result = json.loads(out.read_text())
    base, fast = result["runs"]
    assert (base["preset"], fast["preset"]) == ("nanogpt-shakespeare-char-cpu", "speedrun-cpu")
    # The same evaluation for both: the whole val split, every token scored once
    assert base["eval"]["tokens"] == fast["eval"]["tokens"] > 10_000
    assert result["reached"] and fast["eval"]["nats_per_token"] <= base["eval"]["nats_per_token"]
    assert fast["tokens"] < base["tokens"] / 3  # it gets there on far fewer tokens
    assert result["train_wall_ratio"] == pytest.approx(fast["wall_time_s"] / base["wall_time_s"])
    printed = capsys.readouterr().out
    assert "speedrun / baseline wall time:" in printed and "reaches the baseline's val loss" in printed
