"""SentencePiece training sees every document, however the corpus breaks its lines."""

from __future__ import annotations

import json

import numpy as np

from conftest import config_of
from data.prepare import prepare
from data.sentencepiece_tokenizer import MAX_SENTENCE, sample_lines


def test_long_lines_are_cut_not_dropped():
    line = "word " * (MAX_SENTENCE // 2)  # 2.5 x the limit, no newline
    pieces = list(sample_lines([line, "\n\nshort\n"]))
    assert "".join(pieces[:-1]) == line and pieces[-1] == "short"
    assert all(len(p) <= MAX_SENTENCE for p in pieces)


def test_one_line_documents_train_a_tokenizer(tmp_path):
    # 2,000 single-line JSONL documents (~600 KB together, no newline inside any of them): joined
    # without separators they once formed one sentence SentencePiece silently skipped.
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma", "theta"]
    docs = [" ".join(rng.choice(words, 50)) + "." for _ in range(2000)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = config_of("DATA_PATH=docs.jsonl DATA_CACHE_DIR=cache TOKENIZER_SENTENCEPIECE=y SENTENCEPIECE_VOCAB_SIZE=300")
    data = prepare(cfg, tmp_path, log=lambda m: None)
    tok = data.tokenizer
    assert 280 <= tok.vocab_size <= 300
    assert tok.decode(tok.encode(docs[0])) == docs[0]
    assert len(tok.encode(docs[0])) < len(docs[0]) / 2, "merges were learned, not just bytes"
