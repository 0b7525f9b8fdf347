"""Corpus sources, tokenizers, preparation (manifest, reuse, atomicity) and batches."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from conftest import config_of
from data.corpus import embedded_source, local_source
from data.dataset import source_for
from data.errors import DataError
from data.loader import Batches
from data.prepare import prepare
from data.stream import unigram_entropy
from data.tokenizer import Tokenizer


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_tokenizers_round_trip(kind):
    text = "héllo wörld — ünïcode ✓\n\tdef f(): pass"
    tok = Tokenizer.fit(kind, text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == (len(set(text)) if kind == "char" else 256)
    assert Tokenizer(json.loads(json.dumps(tok.spec))).sha256 == tok.sha256


def test_char_tokenizer_refuses_unknown_characters():
    with pytest.raises(ValueError, match="not in the char vocabulary: \\['z'\\]"):
        Tokenizer.fit("char", "abc").encode("abz")


def test_unigram_entropy():
    assert unigram_entropy(np.array([0, 1, 2, 3] * 10), 8) == pytest.approx(math.log(4))
    assert unigram_entropy(np.array([5] * 10), 8) == pytest.approx(0.0)


def test_embedded_source_is_deterministic_and_capped():
    a, b = embedded_source(200_000), embedded_source(200_000)
    assert a.files == b.files and a.fingerprint == b.fingerprint
    text = a.read_text()
    assert 190_000 <= len(text.encode()) <= 200_000
    assert "def " in text


def write_corpus(folder, n_files=3):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    for i in range(n_files):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 3000)) + "\n")
    (folder / "image.bin").write_bytes(bytes(range(256)) * 4)  # not text: skipped
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "x.txt").write_text("ignored")
    return folder


def test_data_path_folder_takes_text_files_only_in_sorted_order(tmp_path):
    src = local_source(write_corpus(tmp_path / "corpus"))
    assert [f.name for f in src.files] == ["doc0.txt", "doc1.txt", "doc2.txt"]


def test_bad_data_path_names_the_symbol(tmp_path):
    with pytest.raises(DataError, match="CONFIG_DATA_PATH=.*no such file or folder"):
        source_for(config_of(DATA_PATH=str(tmp_path / "nope")), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no UTF-8 text files"):
        source_for(config_of(DATA_PATH=str(tmp_path / "empty")), tmp_path)


def test_prepare_writes_manifest_and_reuses_it(tmp_path):
    write_corpus(tmp_path / "corpus")
    cfg = config_of(DATA_PATH="corpus", DATA_CACHE_DIR="cache", VAL_FRACTION="0.1")
    data = prepare(cfg, tmp_path, log=lambda m: None)
    m = data.manifest
    assert m["dtype"] == "uint16" and m["tokenizer"]["kind"] == "char"
    total = m["train_tokens"] + m["val_tokens"]
    assert m["val_tokens"] == int(total * 0.1)
    for split in ("train", "val"):
        raw = (data.path / f"{split}.bin").read_bytes()
        assert hashlib.sha256(raw).hexdigest() == m["sha256"][f"{split}.bin"]
        assert len(data.tokens(split)) == m[f"{split}_tokens"]
    assert data.tokenizer.sha256 == m["tokenizer"]["sha256"]
    text = data.tokenizer.decode(data.tokens("train")[:11])
    assert set(text) <= set("alphbetgmdsion \n")
    stamp = (data.path / "train.bin").stat().st_mtime_ns
    again = prepare(cfg, tmp_path, log=lambda m: pytest.fail("up-to-date data must not be prepared again"))
    assert again.path == data.path and (data.path / "train.bin").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [data.path.name, "tokenizers"], \
        "no temporary folders left"
    (tmp_path / "corpus" / "doc3.txt").write_text("new text\n")
    assert prepare(cfg, tmp_path, log=lambda m: None).path != data.path, "a changed source is prepared anew"
    byte = prepare(config_of(DATA_PATH="corpus", DATA_CACHE_DIR="cache", TOKENIZER_BYTE=True), tmp_path,
                   log=lambda m: None)
    assert byte.manifest["tokenizer"]["vocab_size"] == 256 and byte.path != data.path


def test_batches_are_shifted_windows_and_seeded(tmp_path):
    write_corpus(tmp_path / "corpus")
    data = prepare(config_of(DATA_PATH="corpus", DATA_CACHE_DIR="cache"), tmp_path, log=lambda m: None)
    a = Batches(data, "train", 4, 32, torch.device("cpu"), seed=3)
    x, y = a.next()
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    b = Batches(data, "train", 4, 32, torch.device("cpu"), seed=3)
    assert torch.equal(b.next()[0], x)
    a.reset()
    assert torch.equal(a.next()[0], x)
    with pytest.raises(DataError, match="the val split .* has [0-9]+ tokens, too few for CONFIG_BLOCK_SIZE=100000"):
        Batches(data, "val", 4, 100_000, torch.device("cpu"), seed=0)
