"""DATA_MIX (weighted training sources) and named validation sets (DATA_VAL_EXTRA)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import config_of
from data.errors import DataError
from data.loader import Batches
from data.mix import PreparedMix, as_mix, parse_mix, parse_val_extra
from data.prepare import prepare
from train import checkpoint
from train.trainer import Trainer, write_summary

CPU = torch.device("cpu")
MODEL = ("MODEL_SIZE_CUSTOM=y N_LAYER=1 N_HEAD=2 N_EMBD=32 BLOCK_SIZE=16 MICRO_BATCH=8 WARMUP_ITERS=2 "
         "LR=3e-3 MIN_LR=3e-4 EVAL_BATCHES=2 LOG_INTERVAL=5 DEVICE_CPU=y DTYPE_FP32=y SAMPLE_TOKENS=5 "
         "CPU_THREADS=1 SEED=3")
MIX = "0.7:prose=prose.txt 0.3:code=code"


def write_sources(root):
    """prose: lowercase words; code: a folder of digits and symbols (disjoint characters); held: capitals."""
    root.mkdir(parents=True, exist_ok=True)
    words = [f"{a} {b} {a}{b}." for a in ("cat", "dog", "fox") for b in ("ran", "sat")]
    (root / "prose.txt").write_text("\n".join(words * 40) + "\n")
    (root / "code").mkdir(exist_ok=True)
    for i in range(2):
        (root / "code" / f"f{i}.txt").write_text("\n".join(f"{n}+{n}={2 * n};" for n in range(120 * i, 120 * i + 120)))
    (root / "held.txt").write_text("THE CAT SAT. " * 60)


def config(root, extra=""):
    write_sources(root)
    return config_of(f"{MODEL} DATA_CACHE_DIR=cache", extra)


def quiet(m):
    pass


@pytest.mark.parametrize("text, message", [
    ("x:prose=a.txt", "weight 'x' is not a number"),
    ("0:prose=a.txt", "weight '0' must be a positive number"),
    ("-1:prose=a.txt", "must be a positive number"),
    ("prose=a.txt", "no WEIGHT: before NAME=PATH"),
    ("0.5:a.txt", "no NAME= before the path"),
    ("0.5:=a.txt", "no NAME= before the path"),
    ("1:prose=a.txt 2:prose=b.txt", "name 'prose' is used twice"),
    ("1:prose=", "no PATH after prose="),
    ("1:pro se=a", "no NAME= before the path"),
    ("1:pro/se=a", "may only hold letters"),
])
def test_mix_entries_are_checked_with_named_errors(text, message):
    with pytest.raises(DataError, match="CONFIG_DATA_MIX: entry .*" + message + ".*WEIGHT:NAME=PATH"):
        parse_mix(text)


def test_mix_parsing_and_val_extra_names():
    assert parse_mix("0.7:prose=/data/books 0.3:code=/data/src") == [(0.7, "prose", "/data/books"),
                                                                  (0.3, "code", "/data/src")]
    assert parse_mix('2:a="/my data/x.txt"') == [(2.0, "a", "/my data/x.txt")]
    assert parse_val_extra("wiki=w.txt", {"val"}) == [("wiki", "w.txt")]
    with pytest.raises(DataError, match="CONFIG_DATA_VAL_EXTRA: entry 'val=w.txt': name 'val' is used twice"):
        parse_val_extra("val=w.txt", {"val"})
    with pytest.raises(DataError, match="CONFIG_DATA_VAL_EXTRA: entry 'w.txt': no NAME="):
        parse_val_extra("w.txt", set())


def test_a_missing_mix_path_names_the_symbol_and_entry(tmp_path):
    cfg = config(tmp_path, 'DATA_MIX="1:prose=prose.txt 1:gone=nowhere"')
    with pytest.raises(DataError, match="CONFIG_DATA_MIX: entry gone=nowhere: no such file or folder"):
        prepare(cfg, tmp_path, log=quiet)


def test_char_vocabulary_covers_every_source_and_extra_set(tmp_path):
    cfg = config(tmp_path, f'DATA_MIX="{MIX}" DATA_VAL_EXTRA="held=held.txt"')
    mix = prepare(cfg, tmp_path, log=quiet)
    assert isinstance(mix, PreparedMix) and mix.names == ["prose", "code"]
    assert mix.weights == pytest.approx([0.7, 0.3])
    tok = mix.tokenizer
    for text in ((tmp_path / "prose.txt").read_text(), (tmp_path / "code" / "f1.txt").read_text(),
                 (tmp_path / "held.txt").read_text()):
        assert tok.decode(tok.encode(text)) == text
    assert all(m.data.manifest["tokenizer"]["sha256"] == tok.sha256 for m in mix.members)
    (name, held), = mix.extras
    assert name == "held" and held.manifest["train_tokens"] == 0 and held.manifest["val_tokens"] == 13 * 60
    again = prepare(cfg, tmp_path, log=quiet)  # cached: the same folders, nothing rebuilt
    assert [m.data.path for m in again.members] == [m.data.path for m in mix.members]
    byte = prepare(config(tmp_path, f'DATA_MIX="{MIX}" TOKENIZER_BYTE=y'), tmp_path, log=quiet)
    assert byte.tokenizer.vocab_size == 256 and byte.manifest["train_tokens"] > 0


def test_sources_are_drawn_by_weight_deterministically(tmp_path):
    mix = prepare(config(tmp_path, f'DATA_MIX="{MIX}"'), tmp_path, log=quiet)
    prose_ids = set(mix.tokenizer.encode((tmp_path / "prose.txt").read_text()))
    code_ids = set(mix.tokenizer.encode("\n".join(p.read_text() for p in (tmp_path / "code").iterdir())))
    a, b = (mix.train_batches("train", 4, 16, CPU, seed=11) for _ in range(2))
    seen = np.zeros(2, dtype=int)
    for _ in range(500):  # 2000 sequences
        x, y = a.next()
        assert torch.equal(x, b.next()[0]), "the same seed gives the same sequences"
        for row in x.tolist():  # every sequence comes whole from one source (their characters are disjoint)
            from_prose = set(row) <= prose_ids
            assert from_prose or set(row) <= code_ids
            seen[0 if from_prose else 1] += 1
    shares = a.shares(mix.names)
    assert a.counts.tolist() == seen.tolist() and sum(shares.values()) == pytest.approx(1.0)
    assert abs(shares["prose"] - 0.7) < 0.04 and abs(shares["code"] - 0.3) < 0.04  # 4 standard deviations
    other = mix.train_batches("train", 4, 16, CPU, seed=12)
    assert not torch.equal(other.next()[0], mix.train_batches("train", 4, 16, CPU, seed=11).next()[0])


def test_a_single_source_draws_exactly_what_plain_batches_draw(tmp_path):
    cfg = config(tmp_path, "DATA_PATH=prose.txt")
    data = prepare(cfg, tmp_path, log=quiet)
    mix = as_mix(data)
    mixed, plain = mix.train_batches("train", 4, 16, CPU, seed=7), Batches(data, "train", 4, 16, CPU, seed=7)
    for _ in range(20):
        assert all(torch.equal(p, q) for p, q in zip(mixed.next(), plain.next()))
    assert torch.equal(mixed.generator.get_state(), plain.generator.get_state())
    assert list(mix.val_batches(4, 16, CPU, 8)) == ["val"] and mix.summary()["path"] == str(data.path)


def run_trainer(root, run_dir, extra, log=quiet):
    cfg = config(root, extra)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, prepare(cfg, root, log=quiet), run_dir, log=log)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_on_a_mix_reports_shares_and_named_validation_losses(tmp_path):
    logs = []
    run_dir = tmp_path / "run"
    summary = run_trainer(tmp_path, run_dir, f'DATA_MIX="{MIX}" DATA_VAL_EXTRA="held=held.txt" MAX_ITERS=20 '
                                             "EVAL_INTERVAL=10", logs.append).run()
    write_summary(run_dir, summary)
    lines = records(run_dir)
    train = [r for r in lines if "train_loss" in r]
    evals = [r for r in lines if "val_loss" in r]
    assert len(train) == 4 and len(evals) == 2
    share = train[-1]["data_share"]
    assert set(share) == {"prose", "code"} and sum(share.values()) == pytest.approx(1.0)
    assert 0.5 < share["prose"] < 0.9  # 160 sequences drawn with weight 0.7
    for e in evals:
        losses = e["val_losses"]
        assert set(losses) == {"prose", "code", "held"} and all(v > 0 for v in losses.values())
        assert e["val_loss"] == pytest.approx(0.7 * losses["prose"] + 0.3 * losses["code"])
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["final_val_losses"] == evals[-1]["val_losses"] and saved["final_val_loss"] == evals[-1]["val_loss"]
    assert saved["data_share"] == share and set(saved["data"]["sources"]) == {"prose", "code"}
    assert set(saved["data"]["val_extra"]) == {"held"}
    assert any("| prose " in m and "| code " in m and "| held " in m for m in logs if m.startswith("eval step"))


def test_single_source_runs_report_the_val_set_as_before(tmp_path):
    run_dir = tmp_path / "run"
    summary = run_trainer(tmp_path, run_dir, "DATA_PATH=prose.txt MAX_ITERS=10 EVAL_INTERVAL=10").run()
    assert summary["final_val_losses"] == {"val": summary["final_val_loss"]}
    assert summary["data_share"] == {"prose": 1.0} and set(summary["data"]) == {"path", "sha256", "tokenizer_sha256"}
    assert records(run_dir)[-1]["val_losses"] == {"val": summary["final_val_loss"]}


def test_resume_with_a_mix_is_exact(tmp_path):
    extra = f'DATA_MIX="{MIX}" MAX_ITERS=20 EVAL_INTERVAL=10 CHECKPOINT_INTERVAL=10 CHECKPOINT_KEEP=3 DROPOUT="0.1"'
    whole = run_trainer(tmp_path, tmp_path / "whole", extra).run()
    parts_dir = tmp_path / "parts"
    run_trainer(tmp_path, parts_dir, extra).run()
    (parts_dir / "checkpoints" / "step-00000020.pt").unlink()  # as if stopped right after step 10
    t = run_trainer(tmp_path, parts_dir, extra)
    t.resume()
    assert t.start_step == 10 and checkpoint.latest(parts_dir)[1]["step"] == 10
    parts = t.run()
    assert parts["final_val_losses"] == whole["final_val_losses"]
    assert parts["final_train_loss"] == whole["final_train_loss"] and parts["data_share"] == whole["data_share"]
    assert records(parts_dir)[-2]["train_loss"] == records(tmp_path / "whole")[-2]["train_loss"]


def test_sentencepiece_mix_trains_on_every_source(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(f"the big cat sat on the mat number {i}" for i in range(2000)))
    (tmp_path / "b.txt").write_text("\n".join(f"def f{i}(x): return x + {i}" for i in range(2000)))
    cfg = config(tmp_path, 'TOKENIZER_SENTENCEPIECE=y SENTENCEPIECE_VOCAB_SIZE=400 DATA_MIX="0.5:a=a.txt 0.5:b=b.txt"')
    mix = prepare(cfg, tmp_path, log=quiet)
    for m, name in zip(mix.members, ("a.txt", "b.txt")):  # both sources' words became pieces
        text = (tmp_path / name).read_text()
        assert m.data.manifest["train_tokens"] + m.data.manifest["val_tokens"] < 0.7 * len(text)
