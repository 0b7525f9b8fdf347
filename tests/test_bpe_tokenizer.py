"""TOKENIZER_BPE: a byte-level BPE trained on the corpus, exact on any text, cached and keyed like SentencePiece."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import config_of
from data.bpe_tokenizer import END_OF_TEXT, native, native_json, safe_chunks, token_byte_lengths, train_bpe
from data.corpus import embedded_source
from data.prepare import prepare
from data.sources import Stats
from data.tokenizer import Tokenizer
from plan.preflight import check_vocab
from train.trainer import Trainer

QUIET = {"log": lambda m: None}
# Spaces and newlines in every arrangement the GPT-2 regex treats differently, and text beyond ASCII:
# accents, CJK, an emoji with a skin tone, a combining mark, a right-to-left script, and the characters
# on which Python's and Rust's ideas of whitespace differ (U+001C..U+001F, U+0085, U+00A0, U+3000).
TRICKY = ("def f(x):\n    return x  \n\n\n  y = 'it's'\r\n\tz\n \nend  \n"
          "café naïve 東京 👍🏽 e\u0301 שלום \x1c\x1d\x1e\x1f a\x85b c\xa0d e\u3000f  \n 1234567 x\n\n")


def stories(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "and", "then", "slept"]
    return [" ".join(rng.choice(words, 40)) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def small_bpe():
    return Tokenizer(train_bpe([" ".join(stories(300)) + TRICKY * 20], 400))


def test_fits_generated_text_with_ids_in_vocab_and_every_document_ending_in_end_of_text(tmp_path):
    docs = stories(400)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = prepare(config_of(DATA_PATH="docs.jsonl", DATA_CACHE_DIR="cache", TOKENIZER_BPE=True,
                             BPE_VOCAB_SIZE=400, VAL_FRACTION="0.1"), tmp_path, **QUIET)
    tok, m = data.tokenizer, data.manifest
    assert m["tokenizer"]["kind"] == "bpe" and tok.eos_id == 0 == m["tokenizer"]["eos_id"]
    assert 257 < tok.vocab_size <= 400, "the 256 bytes, <|endoftext|> and some merges"
    ids = np.concatenate([data.tokens("train"), data.tokens("val")]).astype(np.int64)
    assert ids.max() < tok.vocab_size and (ids == tok.eos_id).sum() == 400 and ids[-1] == tok.eos_id
    first = ids[:np.argmax(ids == tok.eos_id)]
    assert tok.decode(first) == docs[0] and len(first) < len(docs[0]) / 3, "merges were learned"
    assert tok.decode(ids[:200]).startswith(docs[0] + docs[1]), "end-of-text decodes to nothing"


def test_round_trip_is_exact_for_any_text_including_unicode_and_unseen_characters(small_bpe):
    for text in (TRICKY, TRICKY * 3, "Ωμέγα – “quotes” … ∑ 🦀\u200d🔥", "\n", " ", "  \n\n  ", ""):
        ids = small_bpe.encode_array(text)
        assert small_bpe.decode(ids) == text and (ids < small_bpe.vocab_size).all()
    assert END_OF_TEXT not in small_bpe.decode([0, *small_bpe.encode("ab")]) == "ab"
    spelt = f"a {END_OF_TEXT} b"  # text about GPT-2 may spell the token: it stays text, never id 0
    assert 0 not in small_bpe.encode(spelt) and small_bpe.decode(small_bpe.encode(spelt)) == spelt


def test_chunked_encoding_gives_the_ids_of_encoding_the_whole_text(small_bpe):
    # encode_array cuts long text into chunks encoded on several threads; any chunk size must leave
    # the ids those of the unsplit text (what transformers would produce from the same tokenizer.json)
    hf = native(small_bpe.spec)
    text = TRICKY * 40
    whole = hf.encode(text).ids
    for size in (1, 5, 17, 200):
        chunks = list(safe_chunks(text, size))
        assert "".join(chunks) == text and len(chunks) > 1
        assert [i for e in hf.encode_batch(chunks) for i in e.ids] == whole, size
    assert small_bpe.encode(text) == whole


def test_transformers_loading_the_native_tokenizer_json_gives_our_ids(small_bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.json").write_text(native_json(small_bpe.spec))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token=END_OF_TEXT,
                                              split_special_tokens=True, clean_up_tokenization_spaces=False)
    text = TRICKY * 3 + f" {END_OF_TEXT} x"
    ids = small_bpe.encode(text)
    assert hf(text)["input_ids"] == ids and hf.decode(ids) == text and hf.eos_token_id == small_bpe.eos_id == 0


def test_embedded_corpus_round_trips_exactly_with_the_ids_of_whole_text_encoding():
    text = "".join(p.text for p in embedded_source(300_000).pieces(Stats()))
    tok = Tokenizer(train_bpe([text[:100_000]], 1000))
    ids = tok.encode_array(text)
    assert tok.decode(ids) == text and ids.tolist() == native(tok.spec).encode(text).ids
    assert len(ids) < len(text.encode("utf-8")) / 2


def test_token_byte_lengths_sum_to_the_texts_utf8_bytes(small_bpe):
    lengths = np.array(token_byte_lengths(small_bpe.spec))
    assert len(lengths) == small_bpe.vocab_size and lengths[small_bpe.eos_id] == 0
    for text in (TRICKY, "Ωμέγα 🦀\u200d🔥 東京"):
        ids = small_bpe.encode_array(text)
        assert lengths[ids].sum() == len(text.encode("utf-8"))
        assert lengths[np.append(ids, small_bpe.eos_id)].sum() == len(text.encode("utf-8"))


def test_training_is_deterministic_and_the_spec_carries_a_native_tokenizer_json(small_bpe):
    again = Tokenizer(train_bpe([" ".join(stories(300)) + TRICKY * 20], 400))
    assert again.sha256 == small_bpe.sha256
    saved = json.loads(native_json(small_bpe.spec))
    assert saved["model"]["type"] == "BPE" and saved["pre_tokenizer"]["type"] == "ByteLevel"
    assert saved["added_tokens"][0]["content"] == END_OF_TEXT and saved["added_tokens"][0]["id"] == 0


def test_the_cache_key_follows_the_vocab_size_and_a_stored_tokenizer_is_reused(tmp_path):
    (tmp_path / "c.txt").write_text("".join(p.text for p in embedded_source(200_000).pieces(Stats())))
    base = {"DATA_PATH": "c.txt", "DATA_CACHE_DIR": "cache", "TOKENIZER_BPE": True}
    small = prepare(config_of(**base, BPE_VOCAB_SIZE=300), tmp_path, **QUIET)
    large = prepare(config_of(**base, BPE_VOCAB_SIZE=320), tmp_path, **QUIET)
    assert small.path != large.path and small.tokenizer.sha256 != large.tokenizer.sha256
    assert small.tokenizer.vocab_size == 300 and large.tokenizer.vocab_size == 320
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*-bpe-*.json"))) == 2
    logs = []
    again = prepare(config_of(**base, BPE_VOCAB_SIZE=300), tmp_path, log=logs.append)
    assert again.path == small.path and again.tokenizer.sha256 == small.tokenizer.sha256
    assert not any("training byte-level BPE" in m for m in logs)
    assert prepare(config_of(**base, BPE_VOCAB_SIZE=300, BPE_SAMPLE_MB=2), tmp_path, **QUIET).path != small.path


def test_make_checks_vocab_bound_is_the_configured_bpe_size_padded():
    assert check_vocab(config_of(TOKENIZER_BPE=True, BPE_VOCAB_SIZE=1000)) == 1024
    assert check_vocab(config_of(TOKENIZER_BPE=True)) == 8192
    assert check_vocab(config_of(TOKENIZER_SENTENCEPIECE=True, SENTENCEPIECE_VOCAB_SIZE=1000)) == 1024
    assert check_vocab(config_of(TOKENIZER_BYTE=True)) == 256


def test_a_tiny_training_run_with_the_bpe_tokenizer(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(stories(300)) + "\n")
    cfg = config_of("DATA_PATH=c.txt DATA_CACHE_DIR=cache TOKENIZER_BPE=y BPE_VOCAB_SIZE=300 MODEL_SIZE_CUSTOM=y "
                    "N_LAYER=1 N_HEAD=2 N_EMBD=32 BLOCK_SIZE=32 MICRO_BATCH=8 MAX_ITERS=6 WARMUP_ITERS=2 "
                    "EVAL_INTERVAL=6 EVAL_BATCHES=2 LOG_INTERVAL=3 DEVICE_CPU=y DTYPE_FP32=y SAMPLE_TOKENS=8 "
                    'SAMPLE_PROMPT="the cat" SEED=1')
    data = prepare(cfg, tmp_path, **QUIET)
    (tmp_path / "run").mkdir()
    summary = Trainer(cfg, data, tmp_path / "run", log=lambda m: None).run()
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 8 * 32
    assert np.isfinite(summary["final_val_loss"]) and summary["final_val_loss"] < np.log(300) + 0.5
