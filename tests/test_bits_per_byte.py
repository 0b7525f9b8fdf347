"""Bits per byte: val loss in nats per token times the split's tokens per UTF-8 byte, over ln 2."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import config_of
from data.cache import PreparedData, split_bytes
from data.mix import as_mix
from data.prepare import prepare
from train.trainer import Trainer

SETTINGS = ("DATA_PATH=corpus.txt DATA_CACHE_DIR=cache MODEL_SIZE_CUSTOM=y N_LAYER=1 N_HEAD=2 N_EMBD=32 "
            "BLOCK_SIZE=16 MICRO_BATCH=4 MAX_ITERS=4 WARMUP_ITERS=1 EVAL_INTERVAL=2 EVAL_BATCHES=2 "
            "LOG_INTERVAL=2 DEVICE_CPU=y DTYPE_FP32=y SAMPLE_TOKENS=4 SEED=3")
QUIET = {"log": lambda message: None}


def write_corpus(folder):
    # Multi-byte characters (2, 3 and 4 bytes in UTF-8): a char token is not a byte.
    lines = [f"{a} café — {b} 🦊." for a in ("cat", "dög", "fox") for b in ("one", "twö")]
    (folder / "corpus.txt").write_text("\n".join(lines * 60) + "\n", encoding="utf-8")


def train(tmp_path, extra=""):
    write_corpus(tmp_path)
    cfg = config_of(SETTINGS, extra)
    data = prepare(cfg, tmp_path, **QUIET)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    logs = []
    summary = Trainer(cfg, data, run_dir, log=logs.append).run()
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return data, summary, [e for e in evals if "val_loss" in e], logs


def test_char_run_bits_per_byte_is_loss_over_ln2_times_tokens_per_byte(tmp_path):
    data, summary, evals, logs = train(tmp_path)
    val = data.tokens("val")
    by_hand = len(data.tokenizer.decode(val).encode("utf-8"))  # the val split's text, in bytes
    assert data.manifest["val_bytes"] == by_hand > len(val)  # recorded at preparation
    ratio = len(val) / by_hand
    for e in evals:
        assert e["val_bpb"] == pytest.approx(e["val_loss"] / math.log(2) * ratio, rel=1e-12)
        assert e["val_bpbs"] == {"val": e["val_bpb"]}
    assert summary["final_val_bpb"] == pytest.approx(summary["final_val_loss"] / math.log(2) * ratio, rel=1e-12)
    assert summary["best_val_bpb"] == pytest.approx(summary["best_val_loss"] / math.log(2) * ratio, rel=1e-12)
    assert summary["final_val_bpbs"] == {"val": summary["final_val_bpb"]}
    assert any(f"val bpb {summary['final_val_bpb']:.4f}" in m for m in logs)


def test_byte_run_has_as_many_tokens_as_bytes(tmp_path):
    data, summary, evals, _ = train(tmp_path, "TOKENIZER_BYTE=y")
    assert data.manifest["val_bytes"] == data.manifest["val_tokens"]
    assert summary["final_val_bpb"] == pytest.approx(summary["final_val_loss"] / math.log(2), rel=1e-12)


def test_data_prepared_before_the_count_is_counted_from_its_split_and_reused(tmp_path):
    write_corpus(tmp_path)
    cfg = config_of(SETTINGS)
    data = prepare(cfg, tmp_path, **QUIET)
    manifest = dict(data.manifest)
    recorded = manifest.pop("val_bytes")
    (data.path / "manifest.json").write_text(json.dumps(manifest))  # as an older version wrote it
    again = prepare(cfg, tmp_path, log=lambda message: pytest.fail(f"prepared again: {message}"))
    assert again.path == data.path and "val_bytes" not in again.manifest  # the same cache, not re-prepared
    assert again.val_bytes == recorded
    assert as_mix(again).val_tokens_per_byte() == {"val": manifest["val_tokens"] / recorded}


def test_sentencepiece_piece_lengths_sum_to_the_decoded_text(tmp_path):
    write_corpus(tmp_path)
    cfg = config_of(SETTINGS, "TOKENIZER_SENTENCEPIECE=y SENTENCEPIECE_VOCAB_SIZE=300")
    data = prepare(cfg, tmp_path, **QUIET)
    tok, ids = data.tokenizer, np.concatenate([data.tokens("train"), data.tokens("val")])
    assert split_bytes(ids, tok, chunk=1000) == len(tok.decode(ids).encode("utf-8"))
    assert data.manifest["val_bytes"] == len(tok.decode(data.tokens("val")).encode("utf-8"))


def test_bpe_token_lengths_sum_to_the_decoded_text(tmp_path):
    write_corpus(tmp_path)
    data = prepare(config_of(SETTINGS, "TOKENIZER_BPE=y BPE_VOCAB_SIZE=300"), tmp_path, **QUIET)
    tok, val = data.tokenizer, data.tokens("val")
    assert data.manifest["val_bytes"] == len(tok.decode(val).encode("utf-8")) == split_bytes(val, tok, chunk=100)


def test_every_validation_set_has_its_ratio(tmp_path):
    write_corpus(tmp_path)
    (tmp_path / "held.txt").write_text("plain ascii text only\n" * 50)
    data = prepare(config_of(SETTINGS, "DATA_VAL_EXTRA=held=held.txt"), tmp_path, **QUIET)
    ratios = data.val_tokens_per_byte()
    held = dict(data.extras)["held"]
    assert ratios["held"] == 1.0 == held.manifest["val_tokens"] / held.val_bytes  # ASCII: a char is a byte
    assert ratios["val"] < 1.0  # the multi-byte characters


def test_split_without_text_has_no_ratio(tmp_path):
    write_corpus(tmp_path)
    data = prepare(config_of(SETTINGS), tmp_path, **QUIET)
    empty = PreparedData(data.path, {**data.manifest, "val_bytes": 0})
    assert as_mix(empty).val_tokens_per_byte() == {"val": None}
