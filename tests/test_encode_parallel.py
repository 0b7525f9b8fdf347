"""Batch encoding for data preparation (data/batch_encode.py, data/stream.py): the ids of encoding
each document alone with Tokenizer.encode_array, for every tokenizer kind, on the embedded corpus
and on generated text with the characters each word rule is about; prepared files byte for byte
those of the document-by-document path, in one process and in several."""

from __future__ import annotations

import base64
import io
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import config_of
from data import stream
from data.batch_encode import BatchEncoder, WordMemo, bpe_cuts_hold, bpe_words, sentencepiece_cuts_hold, \
    sentencepiece_words
from data.bpe_tokenizer import END_OF_TEXT, train_bpe
from data.corpus import embedded_source
from data.dataset import source_for
from data.prepare import prepare
from data.sentencepiece_tokenizer import sample_lines, train_sentencepiece
from data.sources import Stats
from data.tokenizer import Tokenizer

QUIET = {"log": lambda m: None}
# Spaces in runs and alone, tabs, CRLF and the other line ends str.splitlines knows (\r alone, \v,
# \f, \x1c-\x1e, U+0085, U+2028/9), U+2581 (a space to SentencePiece), the characters on which
# Python's and Rust's whitespace differ (\x1c-\x1f, U+00A0, U+180E, U+3000...), accents, CJK, an
# emoji sequence, a right-to-left script, digits, and <|endoftext|> spelt out.
TRICKY = ("def f(x):\n    return x  \n\n\n  y = 'it's'\r\n\tz\n \nend  \n\r\rq\x0bw\x0ce\x1cr\x1dt\x1eu\x85i"
          "\u2028o\u2029p \u2581\u2581a\u2581 b \u2581 c  café naïve 東京 👍🏽 e\u0301 שלום \x1f a\xa0b c\u3000d "
          "e\u180e f\u2003g  \n 1234567 x\n\n" + f"a{END_OF_TEXT}b {END_OF_TEXT} " + "\t\t  x\n")
ALPHABET = " \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u180e\u2028\u2581\u3000abcxyz_.():'éé東👍"


def corpus_text(size: int) -> str:
    return "".join(p.text for p in embedded_source(size).pieces(Stats()))


@pytest.fixture(scope="module")
def tokenizers():
    """One tokenizer of each kind, trained on the embedded corpus with the tricky text mixed in."""
    sample = corpus_text(400_000) + TRICKY * 30
    bpe_sp = train_sentencepiece(sample_lines([sample]), 800, "bpe")
    unigram = train_sentencepiece(sample_lines([sample]), 800, "unigram")
    return {"char": Tokenizer.fit("char", sample + ALPHABET), "byte": Tokenizer({"kind": "byte"}),
            "sentencepiece": Tokenizer(bpe_sp), "unigram": Tokenizer(unigram),
            "bpe": Tokenizer(train_bpe([sample], 800))}


def assert_same_ids(tok: Tokenizer, encoder: BatchEncoder, texts: list[str]) -> None:
    ids, lengths = encoder.encode_texts(texts)
    expected = [tok.encode_array(t) for t in texts]
    assert lengths.tolist() == [len(e) for e in expected]
    assert np.array_equal(ids, np.concatenate(expected) if expected else np.zeros(0)), tok.kind


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["char", "byte", "sentencepiece", "unigram", "bpe"])
def test_batch_encoding_gives_each_documents_own_ids_on_the_embedded_corpus(tokenizers, kind):
    tok = tokenizers[kind]
    encoder = BatchEncoder(tok)
    assert encoder.unit == {"sentencepiece": "word", "unigram": "line", "bpe": "word"}.get(kind)
    docs = corpus_text(1_500_000).split("\n\n")
    assert_same_ids(tok, encoder, docs)
    assert_same_ids(tok, encoder, docs[::-1])  # again, from the memo
    if encoder.unit == "word":
        assert encoder.memo.encoded < encoder.memo.words / 4, "each distinct word encoded once"


@pytest.mark.parametrize("kind", ["char", "byte", "sentencepiece", "unigram", "bpe"])
def test_unicode_empty_and_very_long_documents_and_every_word_rule(tokenizers, kind):
    tok = tokenizers[kind]
    texts = [TRICKY, "", " ", "\n", "\n\n", "  ", "\u2581", END_OF_TEXT, "x", TRICKY * 50,  # about 9,000 characters
             "word " * 20_000, "a" * 30_000, ("\t" + "b" * 300 + "\r\n") * 100, "東京" * 5_000, TRICKY[::-1],
             "".join(TRICKY.split()), " " * 1000 + "x" + " " * 1000]
    assert_same_ids(tok, BatchEncoder(tok), texts)
    assert_same_ids(tok, BatchEncoder(tok), [])
    if kind == "char":
        with pytest.raises(ValueError, match="characters not in the char vocabulary: \\['\u4e1c'\\]"):
            BatchEncoder(tok).encode_texts(["ok", "\u4e1c"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=ALPHABET, max_size=60), max_size=8))
def test_any_text_over_the_characters_the_cuts_depend_on(tokenizers, texts):
    for kind in ("sentencepiece", "unigram", "bpe"):
        tok = tokenizers[kind]
        assert_same_ids(tok, BatchEncoder(tok), texts)


def test_words_put_together_are_the_text():
    for text in (TRICKY, TRICKY * 3, "", " ", "\r", "a\u2028b"):
        assert "".join(sentencepiece_words(text)) == text and "".join(bpe_words(text)) == text
    assert sentencepiece_words("  a  bc\n d") == ["  a", "  bc", "\n", " d"]
    assert bpe_words("x = 1\n    return x") == ["x", " =", " 1", "\n    return", " x"]
    assert bpe_words("a\xa0 b c") == ["a\xa0 b", " c"], "no cut after a space the Rust regex may read differently"
    # every character Python's regex takes for whitespace is ASCII whitespace or listed as unsure
    unsure = [chr(c) for c in range(0x110000) if chr(c).isspace() and chr(c) not in "\t\n\v\f\r "]
    assert all(bpe_words(f"a{c} b") == [f"a{c} b"] for c in unsure)


def test_the_memo_starts_over_when_full_and_keeps_the_ids(tokenizers):
    tok = tokenizers["sentencepiece"]
    encoder = BatchEncoder(tok)
    encoder.memo = WordMemo(encoder.memo._encode_new, capacity=50, longest=8)
    docs = corpus_text(60_000).split("\n\n")
    for start in range(0, len(docs), 7):
        assert_same_ids(tok, encoder, docs[start:start + 7])
    assert len(encoder.memo._row) <= max(50, max(len(set(sentencepiece_words(d))) for d in docs) * 7)


def test_a_tokenizer_whose_words_do_not_encode_apart_remembers_lines_or_encodes_text_by_text(tokenizers):
    import sentencepiece as spm

    sample = corpus_text(200_000)
    for extra in ({"split_by_whitespace": False}, {"normalization_rule_name": "nmt_nfkc"}, {"add_dummy_prefix": True}):
        settings = dict(vocab_size=500, model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                        add_dummy_prefix=False, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                        user_defined_symbols=["\n"], minloglevel=2, pad_id=0, unk_id=1, bos_id=2, eos_id=3)
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sample_lines([sample])), model_writer=model,
                                       **{**settings, **extra})
        tok = Tokenizer({"kind": "sentencepiece", "model": base64.b64encode(model.getvalue()).decode()})
        encoder = BatchEncoder(tok)
        assert encoder.unit == "line" and not sentencepiece_cuts_hold(encoder._sp), extra
        assert_same_ids(tok, encoder, [TRICKY, sample[:20_000]])
    spec = json.loads(json.dumps(tokenizers["bpe"].spec))
    assert bpe_cuts_hold(spec)
    spec["tokenizer"]["pre_tokenizer"]["add_prefix_space"] = True
    assert not bpe_cuts_hold(spec) and BatchEncoder(Tokenizer(spec)).unit is None


@pytest.mark.parametrize("kind", ["char", "byte", "sentencepiece", "bpe"])
def test_prepared_files_equal_the_document_by_document_path_in_one_process_and_several(tmp_path, monkeypatch, kind):
    # JSONL documents (each ends with an end of text where the tokenizer has one), empty ones, a long
    # one cut across batches, and a text file; small batches so documents straddle them
    docs = corpus_text(300_000).split("\n\n")[:150] + ["", TRICKY, "x" * 20_000 + " y" * 5_000, ""]
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (folder / "b.txt").write_text(TRICKY * 40)
    monkeypatch.setattr(stream, "BATCH_CHARS", 7_000)
    symbol = {"char": {}, "byte": {"TOKENIZER_BYTE": True}, "bpe": {"TOKENIZER_BPE": True, "BPE_VOCAB_SIZE": 600},
              "sentencepiece": {"TOKENIZER_SENTENCEPIECE": True, "SENTENCEPIECE_VOCAB_SIZE": 600}}[kind]
    cfg = config_of(DATA_PATH="c", DATA_CACHE_DIR="cache", VAL_FRACTION="0.1", **symbol)
    data = prepare(cfg, tmp_path, **QUIET)
    tok, m = data.tokenizer, data.manifest
    for parallel, reference in ((False, True), (True, False), (True, True)):
        for threshold in ("PARALLEL_MIN_BYTES", "REFERENCE_PARALLEL_MIN_BYTES"):
            monkeypatch.setattr(stream, threshold, 0 if parallel else 1 << 40)
        out = tmp_path / f"out-{parallel}-{reference}"
        out.mkdir()
        other = stream.tokenize_to(source_for(cfg, tmp_path), tok, 0.1, out, QUIET["log"], reference=reference)
        assert other["sha256"] == m["sha256"] and other["train_tokens"] == m["train_tokens"], (parallel, reference)
        assert other["workers"] == stream.workers_for(tok, 1 << 40 if parallel else 0, reference)
        assert other["workers"] > 1 or not parallel or kind == "byte" or (kind == "char" and not reference)
    if tok.eos_id is not None:
        ids = np.concatenate([data.tokens("train"), data.tokens("val")])
        assert (ids == tok.eos_id).sum() == m["source"]["documents"]


@pytest.mark.slow
def test_the_benchmark_prints_both_paths_side_by_side_with_the_same_ids(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    (tmp_path / "c.txt").write_text(corpus_text(200_000))
    env = dict(os.environ, DATA_BENCH_SOURCE=str(tmp_path / "c.txt"), DATA_BENCH_TOKENIZER="char,sentencepiece",
               DATA_BENCH_REPEATS="1", DATA_BENCH_VOCAB="500")
    out = subprocess.run([sys.executable, "-m", "data.bench"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("| char", "| sentencepiece"))]
    assert [r[0] for r in rows] == ["| char", "| sentencepiece"] and all(r[-1] == "yes |" for r in rows), out
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows), out


def test_a_capped_source_counts_only_the_bytes_it_will_read(tmp_path):
    """The embedded corpus is the whole standard library cut at EMBEDDED_CORPUS_MB: its size for progress
    totals and the worker rule is the cap, so a 4 MB corpus is not tokenized by worker processes."""
    from data.corpus import Source
    from data.stream import PARALLEL_MIN_BYTES, workers_for

    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_bytes(b"x" * (4 << 20))
    whole, capped = Source("t", tuple(files), "three files"), Source("t", tuple(files), "capped", byte_cap=4 << 20)
    assert whole.size_bytes == 12 << 20 and capped.size_bytes == 4 << 20 < PARALLEL_MIN_BYTES
    tok = SimpleNamespace(kind="sentencepiece")
    assert workers_for(tok, capped.size_bytes) == 1
    assert workers_for(tok, whole.size_bytes) == min(8, os.cpu_count() or 1)
