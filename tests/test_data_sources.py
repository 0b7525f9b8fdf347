"""Data sources (JSONL, Parquet, Hugging Face), documents and end-of-sequence tokens,
SentencePiece, the tokenizer SHA check, and bad inputs: each fails with a named DataError."""

from __future__ import annotations

import errno
import os
import gzip
import json
import sys
import types

import numpy as np
import pytest

from conftest import config_of
from data import stream
from data.corpus import local_source
from data.dataset import source_for
from data.errors import DataError
from data.prepare import prepare
from data.sources import ReadOptions
from data.tokenizer import Tokenizer, check_vocab_fits

QUIET = {"log": lambda m: None}


def stories(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "and", "then", "slept"]
    return [" ".join(rng.choice(words, 40)) + "." for _ in range(n)]


def test_jsonl_parquet_and_text_files_are_read_by_extension(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.txt").write_text("plain text file\n")
    (folder / "b.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(["j1", "j2"])))
    with gzip.open(folder / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "gz1"}) + "\n\n")
    pq.write_table(pa.table({"content": ["p1", "p2", None, "p3"]}), folder / "d.parquet")
    src = source_for(config_of(DATA_PATH=str(folder), DATA_JSONL_FIELD="body", DATA_PARQUET_COLUMN="content"), tmp_path)
    assert list(src.documents()) == ["plain text file\n", "j1", "j2", "gz1", "p1", "p2", "p3"]
    with pytest.raises(DataError, match=r"b.jsonl:1: no string field 'text' .*CONFIG_DATA_JSONL_FIELD"):
        list(local_source(folder / "b.jsonl").documents())
    with pytest.raises(DataError, match=r"d.parquet: no column 'text' .*'content'.*CONFIG_DATA_PARQUET_COLUMN"):
        list(local_source(folder / "d.parquet").documents())
    (folder / "e.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"e.jsonl:2: not valid JSON"):
        list(local_source(folder / "e.jsonl").documents())


def test_text_separator_splits_documents(tmp_path):
    (tmp_path / "s.txt").write_text("one\nstory\n<|endoftext|>\ntwo\n<|endoftext|>\nthree")
    src = local_source(tmp_path / "s.txt", ReadOptions(separator="<|endoftext|>"))
    assert list(src.documents()) == ["one\nstory\n", "two\n", "three"]


def test_sentencepiece_ends_every_document_with_eos_and_round_trips(tmp_path):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in stories(400)))
    cfg = config_of(DATA_PATH="docs.jsonl", DATA_CACHE_DIR="cache", TOKENIZER_SENTENCEPIECE=True,
                   SENTENCEPIECE_VOCAB_SIZE=400, VAL_FRACTION="0.1")
    data = prepare(cfg, tmp_path, **QUIET)
    tok, m = data.tokenizer, data.manifest
    assert m["tokenizer"]["kind"] == "sentencepiece" and tok.eos_id == 3 == m["tokenizer"]["eos_id"]
    assert 300 <= tok.vocab_size <= 400 and m["tokenizer"]["vocab_size"] == tok.vocab_size
    ids = np.concatenate([data.tokens("train"), data.tokens("val")])
    assert (ids == tok.eos_id).sum() == 400 == m["source"]["documents"] and ids[-1] == tok.eos_id
    first = ids[:np.argmax(ids == tok.eos_id)]
    assert tok.decode(first) == stories(400)[0]
    # A checkpoint rebuilds the tokenizer from its spec alone (the model travels base64-encoded).
    rebuilt = Tokenizer(json.loads(json.dumps(tok.spec)))
    assert rebuilt.sha256 == tok.sha256 == m["tokenizer"]["sha256"]
    assert rebuilt.encode("the cat sat\n on") == tok.encode("the cat sat\n on")
    assert rebuilt.decode(rebuilt.encode("héllo ✓\n\tx")) == "héllo ✓\n\tx"  # byte fallback
    assert (data.path / "tokenizer.model").exists()
    unigram = prepare(config_of(DATA_PATH="docs.jsonl", DATA_CACHE_DIR="cache", TOKENIZER_SENTENCEPIECE=True,
                               SENTENCEPIECE_UNIGRAM=True, SENTENCEPIECE_VOCAB_SIZE=400), tmp_path, **QUIET)
    assert unigram.tokenizer.spec["model_type"] == "unigram" and unigram.path != data.path


def test_char_and_byte_keep_blank_line_between_documents(tmp_path):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["ab", "cd", "ef"]))
    data = prepare(config_of(DATA_PATH="docs.jsonl", DATA_CACHE_DIR="cache", TOKENIZER_BYTE=True,
                            VAL_FRACTION="0.1"), tmp_path, **QUIET)
    ids = np.concatenate([data.tokens("train"), data.tokens("val")])
    assert data.tokenizer.decode(ids) == "ab\n\ncd\n\nef" and data.manifest["tokenizer"]["eos_id"] is None


def test_split_is_deterministic_and_streaming_matches_whole_text(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "BATCH_CHARS", 1000)  # many batches
    folder = tmp_path / "c"
    folder.mkdir()
    for i, t in enumerate(stories(50)):
        (folder / f"{i:02d}.txt").write_text(t)
    cfg = config_of(DATA_PATH="c", DATA_CACHE_DIR="cache", VAL_FRACTION="0.2")
    data = prepare(cfg, tmp_path, **QUIET)
    text = "\n\n".join(stories(50))
    whole = Tokenizer.fit("char", text).encode_array(text)
    n_val = int(len(whole) * 0.2)
    assert np.array_equal(data.tokens("train"), whole[:-n_val]) and np.array_equal(data.tokens("val"), whole[-n_val:])
    shared = {"DATA_CACHE_DIR": "cache2", "VAL_FRACTION": "0.2", "TOKENIZER_SENTENCEPIECE": "y",
              "SENTENCEPIECE_VOCAB_SIZE": 350}
    a = prepare(config_of(DATA_PATH="c", **shared), tmp_path, **QUIET)
    # Parallel tokenizing (forced) gives the same tokens as one process.
    monkeypatch.setattr(stream, "PARALLEL_MIN_BYTES", 0)
    b = prepare(config_of(DATA_PATH="c", **{**shared, "DATA_CACHE_DIR": "cache3"}), tmp_path, **QUIET)
    assert a.manifest["workers"] == 1 and b.manifest["workers"] == min(8, os.cpu_count() or 1)
    assert a.manifest["sha256"] == b.manifest["sha256"] and a.tokenizer.sha256 == b.tokenizer.sha256


def test_tokenizer_mismatch_is_refused_with_how_to_reprepare(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(stories(200)))
    cfg = config_of(DATA_PATH="c.txt", DATA_CACHE_DIR="cache", TOKENIZER_SENTENCEPIECE=True, SENTENCEPIECE_VOCAB_SIZE=320)
    data = prepare(cfg, tmp_path, **QUIET)
    (stored,) = (tmp_path / "cache" / "tokenizers").glob("*.json")
    other = Tokenizer.fit("char", "xyz")  # the configured tokenizer is replaced (retrained differently, say)
    stored.write_text(json.dumps(other.spec))
    with pytest.raises(DataError, match="SHA-256 .* differs from the recorded .*Delete both"):
        prepare(cfg, tmp_path, **QUIET)
    stored.with_suffix(".sha256").write_text(other.sha256 + "\n")
    with pytest.raises(DataError, match=f"{data.path}: prepared with a different tokenizer .*make data REPREPARE=1.*delete "):
        prepare(cfg, tmp_path, **QUIET)


def test_missing_and_empty_corpus(tmp_path):
    with pytest.raises(DataError, match="CONFIG_DATA_PATH=.*nope.*no such file or folder"):
        prepare(config_of(DATA_PATH="nope", DATA_CACHE_DIR="cache"), tmp_path, **QUIET)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="the corpus is empty"):
        prepare(config_of(DATA_PATH="empty.txt", DATA_CACHE_DIR="cache", TOKENIZER_BYTE=True), tmp_path, **QUIET)


@pytest.mark.parametrize("policy", ["SKIP", "REPLACE"])
def test_non_utf8_policy(tmp_path, policy):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "good.txt").write_text("good text\n")
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (folder / "image.png").write_bytes(b"\x89PNG\0\0" * 100)
    (folder / "r.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "bad \xff"}\n')
    data = prepare(config_of(DATA_PATH="c", DATA_CACHE_DIR="cache", TOKENIZER_BYTE=True, VAL_FRACTION="0.01",
                            **{f"DATA_INVALID_UTF8_{policy}": True}), tmp_path, **QUIET)
    skipped = data.manifest["skipped"]
    text = data.tokenizer.decode(np.concatenate([data.tokens("train"), data.tokens("val")]))
    assert skipped["binary_files"] == 1
    if policy == "SKIP":
        assert text == "good text\n\n\nok" and skipped["non_utf8_files"] == 1 and skipped["non_utf8_records"] == 1
        assert skipped["non_utf8_files_first"][0].endswith("latin1.txt")
    else:
        assert text == "good text\n\n\ncaf\ufffd cr\ufffdme\n\n\nok\n\nbad \ufffd"
        assert skipped["replaced_byte_sequences"] == 3 and skipped["non_utf8_files"] == 0


def test_corpus_shorter_than_a_sequence_names_split_and_tokens(tmp_path):
    from data.loader import Batches
    import torch

    (tmp_path / "c.txt").write_text("a short corpus " * 20)
    data = prepare(config_of(DATA_PATH="c.txt", DATA_CACHE_DIR="cache"), tmp_path, **QUIET)
    with pytest.raises(DataError, match=r"the val split of .* has 30 tokens, too few for CONFIG_BLOCK_SIZE=64"):
        Batches(data, "val", 2, 64, torch.device("cpu"), seed=0)


def test_vocab_larger_than_embedding_is_refused():
    tok = Tokenizer({"kind": "byte"})
    check_vocab_fits(tok, 256, "x")
    with pytest.raises(DataError, match="ckpt.pt: the byte tokenizer has 256 tokens but .* only 128 rows"):
        check_vocab_fits(tok, 128, "ckpt.pt")


def test_disk_full_keeps_previous_data_and_leaves_nothing_complete(tmp_path, monkeypatch):
    (tmp_path / "c.txt").write_text("\n".join(stories(100)))
    cfg = config_of(DATA_PATH="c.txt", DATA_CACHE_DIR="cache", TOKENIZER_BYTE=True)
    old = prepare(cfg, tmp_path, **QUIET)
    before = {p.name: p.read_bytes() for p in old.path.iterdir()}
    with open(tmp_path / "c.txt", "a") as f:
        f.write("more text\n")  # a changed corpus: prepared anew, next to the old copy

    def full(f, arr):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stream, "_write", full)
    with pytest.raises(DataError, match="no space left on the device.*CONFIG_DATA_CACHE_DIR.*earlier prepared data is intact"):
        prepare(cfg, tmp_path, **QUIET)
    assert {p.name: p.read_bytes() for p in old.path.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [old.path.name], "no half-written folder left"


def test_hugging_face_without_datasets_or_offline_names_the_symbol(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(DataError, match="CONFIG_DATA_HF_NAME='someone/corpus': .*'datasets' library is not installed"
                                        ".*DATA_PATH="):
        source_for(config_of(DATA_HF_NAME="someone/corpus", DATA_CACHE_DIR="cache"), tmp_path)
    with pytest.raises(DataError, match="CONFIG_DATASET_TINYSTORIES: .*TinyStoriesV2-GPT4-train.txt.*DATA_PATH="):
        source_for(config_of(DATASET_TINYSTORIES=True, DATA_CACHE_DIR="cache"), tmp_path)
    offline = types.ModuleType("datasets")

    def load_dataset(*a, **kw):
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub (LocalEntryNotFoundError)")

    offline.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", offline)
    with pytest.raises(DataError, match="CONFIG_DATASET_FINEWEB_EDU: could not stream .*Offline\\? .*000_00000.parquet"):
        source_for(config_of(DATASET_FINEWEB_EDU=True, DATA_CACHE_DIR="cache"), tmp_path)
    assert not list((tmp_path / "cache" / "downloads").iterdir()), "no partial download left"


def test_hugging_face_stream_is_saved_once_and_capped(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("datasets")

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter({"story": t, "n": i} for i, t in enumerate(stories(10_000)))

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    cfg = config_of(DATA_HF_NAME="me/stories", DATA_HF_CONFIG="small", DATA_JSONL_FIELD="story", DATA_HF_MAX_MB=1,
                   DATA_CACHE_DIR="cache", TOKENIZER_BYTE=True)
    data = prepare(cfg, tmp_path, **QUIET)
    assert calls == [("me/stories", "small", "train", True)]
    assert 1_000_000 <= data.manifest["source"]["bytes"] < 1_010_000
    assert prepare(cfg, tmp_path, **QUIET).path == data.path and len(calls) == 1, "saved copy reused offline"
