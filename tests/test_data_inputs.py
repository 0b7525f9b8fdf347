"""Hostile inputs: binary files and records, sources changed in place, symlink loops, text that is
not UTF-8 (each a named DataError, or data prepared anew); and `make bench` on a run that stops early."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import config_of
from data import content, sources
from data.dataset import source_for
from data.errors import DataError
from data.prepare import prepare
from kconfig.tree import parse_overrides, resolve, write_outputs
from test_data_sources import QUIET


def text_of(data) -> str:
    return data.tokenizer.decode(np.concatenate([data.tokens("train"), data.tokens("val")]))


# 1. Binary data


def test_binary_data_path_is_refused_with_what_was_found(tmp_path):
    (tmp_path / "zeros.txt").write_bytes(b"\0" * 10_000)
    with pytest.raises(DataError, match=r"CONFIG_DATA_PATH='.*zeros.txt': .*zeros.txt is binary data, not text: "
                                        r"byte 0x00 at offset 0; if it is UTF-16 text, convert it .*"
                                        r"or set CONFIG_DATA_PATH to a text"):
        prepare(config_of(DATA_PATH="zeros.txt", DATA_CACHE_DIR="cache"), tmp_path, **QUIET)
    (tmp_path / "late.txt").write_bytes(b"plain text\n" * 100 + b"\0")
    with pytest.raises(DataError, match=r"not text: byte 0x00 at offset 1100;"):
        source_for(config_of(DATA_PATH="late.txt"), tmp_path)
    (tmp_path / "utf16.txt").write_bytes("text in UTF-16\n".encode("utf-16"))
    with pytest.raises(DataError, match=r"utf16.txt is binary data, not text: byte 0x00 at offset 3;.*iconv"):
        source_for(config_of(DATA_PATH="utf16.txt"), tmp_path)
    (tmp_path / "controls.txt").write_bytes(b"ab\x01\x02\x03\x04cd\n" * 500)
    with pytest.raises(DataError, match=r"controls.txt is binary data, not text: 44% control characters in bytes "
                                        r"0-4499 \(text has under 10%\);"):
        source_for(config_of(DATA_PATH="controls.txt"), tmp_path)
    # Text keeps its tabs, form feeds, escapes (ANSI colours) and the odd stray control byte.
    (tmp_path / "ok.txt").write_bytes(b"def f():\n\treturn 1\n\x0c\n\x1b[31mred\x1b[0m\r\n" * 50 + b"x\x01y\n")
    data = prepare(config_of(DATA_PATH="ok.txt", DATA_CACHE_DIR="cache", TOKENIZER_BYTE=True), tmp_path, **QUIET)
    assert text_of(data).endswith("x\x01y\n")


def test_binary_stretch_past_the_sampled_blocks_is_found_while_streaming(tmp_path, monkeypatch):
    monkeypatch.setattr(content, "BINARY_SCAN_BYTES", 1 << 16)  # sample only the first and last block
    monkeypatch.setattr(content, "BINARY_BLOCKS", 2)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 1 << 18)  # several chunks
    body = bytearray(b"words and more words\n" * 100_000)  # 2.1 MB
    body[1_048_583] = 0
    (tmp_path / "big.txt").write_bytes(bytes(body))
    assert content.binary_evidence(tmp_path / "big.txt") is None, "the sampled blocks miss it"
    with pytest.raises(DataError, match=r"CONFIG_DATA_PATH='.*big.txt': .*big.txt is binary data, not text: "
                                        r"byte 0x00 at offset 1048583;.*remove it from the data"):
        prepare(config_of(DATA_PATH="big.txt", DATA_CACHE_DIR="cache", TOKENIZER_BYTE=True), tmp_path, **QUIET)


def test_binary_files_in_a_folder_are_skipped_and_named_when_nothing_is_left(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"\x7f\x01\x02\x03" * 300)
    (folder / "b.txt").write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match=r"CONFIG_DATA_PATH=.*holds no UTF-8 text files .*\(2 binary or unreadable "
                                        r"files skipped, the first .*a.txt\)"):
        source_for(config_of(DATA_PATH="c"), tmp_path)
    (folder / "c.txt").write_text("text\n")
    src = source_for(config_of(DATA_PATH="c"), tmp_path)
    assert [p.name for p in src.files] == ["c.txt"] and len(src.binary_skipped) == 2


def test_binary_junk_in_jsonl_and_parquet_text_is_refused_naming_the_record(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "r.jsonl").write_text(json.dumps({"text": "fine"}) + "\n"
                                      + json.dumps({"text": "\x89PNG\r\n\x1a\n\0\0\0\rIHDR"}) + "\n")
    with pytest.raises(DataError, match=r"CONFIG_DATA_PATH='.*r.jsonl': .*r.jsonl:2: field 'text' is binary data, "
                                        r"not text: character U\+0000 at position 8;"):
        prepare(config_of(DATA_PATH="r.jsonl", DATA_CACHE_DIR="cache", TOKENIZER_BYTE=True), tmp_path, **QUIET)
    pq.write_table(pa.table({"text": ["fine", None, "".join(map(chr, range(1, 40)))]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p.parquet: row 2, column 'text' is binary data, not text: "
                                        r"64% control characters \(text has under 10%\);"):
        list(source_for(config_of(DATA_PATH="p.parquet"), tmp_path).documents())


# 2. A source changed in place


def test_source_rewritten_with_same_size_and_mtime_is_prepared_anew(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("aaaa bbbb\n" * 500)
    st = path.stat()
    cfg = config_of(DATA_PATH="c.txt", DATA_CACHE_DIR="cache")  # char: the tokenizer is keyed by content too
    old = prepare(cfg, tmp_path, **QUIET)
    path.write_text("ab cd efg\n" * 500)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    new = prepare(cfg, tmp_path, **QUIET)
    assert new.path != old.path and text_of(new) == "ab cd efg\n" * 500 and text_of(old) == "aaaa bbbb\n" * 500
    assert not np.array_equal(new.tokens("train"), old.tokens("train"))
    assert new.manifest["source"]["fingerprint"] != old.manifest["source"]["fingerprint"]
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert prepare(cfg, tmp_path, **QUIET).path == new.path, "touching a file does not re-prepare it"


def test_large_file_digest_is_size_mtime_and_sampled_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(content, "FULL_HASH_BYTES", 1 << 16)
    block = content.BLOCK_BYTES
    path = tmp_path / "big.txt"
    path.write_bytes(b"x" * (40 * block))
    offsets = content.block_offsets(40 * block, content.DIGEST_BLOCKS)
    assert len(offsets) == 16 and offsets[0] == 0 and offsets[-1] == 39 * block
    st = path.stat()

    def rewrite(at: int, mtime_ns: int = st.st_mtime_ns) -> str:
        data = bytearray(b"x" * (40 * block))
        data[at] = ord("y")
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, mtime_ns))
        content._digest.cache_clear()  # rewrites within one tick of the coarse ctime clock would share a memo entry
        return content.file_digest(path)

    base = content.file_digest(path)
    assert base.startswith("sampled-sha256:")
    assert rewrite(7) != base and rewrite(40 * block - 1) != base and rewrite(offsets[5] + 3) != base
    gap = offsets[1] + block + 1  # between two sampled blocks: the documented blind spot
    assert rewrite(gap) == base and rewrite(gap, st.st_mtime_ns + 1) != base


# 3. Symlink loops and dangling links


def test_symlink_loop_and_dangling_link_are_named(tmp_path):
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    with pytest.raises(DataError, match=r"CONFIG_DATA_PATH='.*/a': symlink loop .*resolving .*/a leads back"):
        prepare(config_of(DATA_PATH="a", DATA_CACHE_DIR="cache"), tmp_path, **QUIET)
    with pytest.raises(DataError, match=r"CONFIG_DATA_MIX: entry x=b: symlink loop"):
        prepare(config_of(DATA_MIX="1:x=b", DATA_CACHE_DIR="cache"), tmp_path, **QUIET)
    os.symlink(tmp_path / "gone.txt", tmp_path / "dangling")
    with pytest.raises(DataError, match=r"CONFIG_DATA_PATH='.*dangling': no such file or folder \(a symlink to "
                                        r"'.*gone.txt', which does not exist\)"):
        source_for(config_of(DATA_PATH="dangling"), tmp_path)


# 4. Text that is not UTF-8


@pytest.mark.parametrize("tokenizer", ["CHAR", "BYTE", "SENTENCEPIECE"])
def test_all_text_skipped_as_non_utf8_says_how_much_where_and_what_to_do(tmp_path, tokenizer):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 100)
    cfg = config_of(DATA_PATH="latin1.txt", DATA_CACHE_DIR="cache", **{f"TOKENIZER_{tokenizer}": True})
    with pytest.raises(DataError, match=r"CONFIG_DATA_PATH='.*latin1.txt': the corpus is empty \(1 file, 1 skipped "
                                        r"as not UTF-8\); the first invalid UTF-8 is at .*latin1.txt: byte 0xe9 at "
                                        r"offset 3. Choose CONFIG_DATA_INVALID_UTF8_REPLACE=y"):
        prepare(cfg, tmp_path, **QUIET)
    (tmp_path / "r.jsonl").write_bytes(b'{"text": "bad \xff"}\n\n{"text": "also \xfe"}\n')
    with pytest.raises(DataError, match=r"the corpus is empty \(1 file, 2 non-UTF-8 records skipped\); the first "
                                        r"invalid UTF-8 is at .*r.jsonl:1. Choose CONFIG_DATA_INVALID_UTF8_REPLACE=y"):
        prepare(config_of(DATA_PATH="r.jsonl", DATA_CACHE_DIR="cache", **{f"TOKENIZER_{tokenizer}": True}),
                tmp_path, **QUIET)


def test_first_invalid_byte_offset_across_chunks_and_in_the_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 7)  # "é" (2 bytes) straddles a chunk edge
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "a.txt").write_text("good text\n")
    (folder / "b.txt").write_bytes("abcdeé xyz ".encode() + b"\xc3(" + b" more")
    data = prepare(config_of(DATA_PATH="c", DATA_CACHE_DIR="cache", TOKENIZER_BYTE=True), tmp_path, **QUIET)
    skipped = data.manifest["skipped"]
    assert skipped["non_utf8_files"] == 1 and skipped["non_utf8_first_at"].endswith("b.txt: byte 0xc3 at offset 12")
    assert text_of(data) == "good text\n"


# 5. make bench on a measured run that does not finish


def bench_setup(tmp_path):
    lines = [f"{a} {b} {a}{b}." for a in ("cat", "dog", "fox", "owl") for b in ("one", "two", "six")]
    (tmp_path / "corpus.txt").write_text("\n".join(lines * 60) + "\n")
    cfg = config_of(DATA_PATH="corpus.txt", DATA_CACHE_DIR="cache", MODEL_SIZE_CUSTOM=True, N_LAYER=1, N_HEAD=2,
                   N_EMBD=32, BLOCK_SIZE=32, MICRO_BATCH=4, MAX_ITERS=12, WARMUP_ITERS=2, LOG_INTERVAL=2, EVAL_INTERVAL=12,
                   EVAL_BATCHES=1, MAX_TIME=0, MAX_BAD_STEPS=2, DEVICE_CPU=True, DTYPE_FP32=True, SAMPLE_TOKENS=1,
                   CPU_THREADS=1)
    return cfg, prepare(cfg, tmp_path, **QUIET)


def test_bench_reports_a_nonfinite_stop_instead_of_crashing(tmp_path, monkeypatch, capsys):
    from scripts import bench

    class Poisoned(bench.Trainer):  # NaN loss from the 7th step on: the run stops with status "failed"
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            forward, calls = self.forward, []

            def nan_later(x, y):
                calls.append(1)
                logits, loss = forward(x, y)
                return logits, loss * float("nan") if len(calls) > 6 else loss
            self.forward = nan_later

    monkeypatch.setattr(bench, "Trainer", Poisoned)
    result = bench.bench(*bench_setup(tmp_path))
    out = capsys.readouterr().out
    assert result["status"] == "failed" and result["steps"] == 8 and result["planned_steps"] == 12
    assert "CONFIG_MAX_BAD_STEPS=2" in result["error"] and "tokens_per_s" not in result
    assert "the measured run stopped early (status 'failed') at step 8 of 12: stopped at step 8: loss or gradient " \
           "was NaN/Inf" in out and "no throughput figures: the summary" in out and "tokens/s" not in out


def test_bench_says_a_time_limited_run_was_cut_short_and_keeps_its_figures(tmp_path, monkeypatch, capsys):
    from scripts import bench

    class TimeLimited(bench.Trainer):  # the summary shape of a run stopped by MAX_TIME
        def run(self):
            return {**super().run(), "status": "time_limit", "planned_steps": 40, "final_lr": 1e-4}

    monkeypatch.setattr(bench, "Trainer", TimeLimited)
    result = bench.bench(*bench_setup(tmp_path))
    out = capsys.readouterr().out
    assert result["status"] == "time_limit" and result["steps"] == 12 and result["tokens_per_s"] > 0
    assert len(result["tokens_per_s_intervals"]) == 5 and "checkpoint_bytes" not in result
    assert "cut short by its time limit at step 12 of 40" in out and " tokens/s (median of 5 intervals" in out


def test_bench_main_exits_nonzero_and_writes_the_stop_to_bench_json(tmp_path, monkeypatch):
    from scripts import bench

    monkeypatch.setattr(bench, "bench", lambda cfg, data: {"plan": "x", "status": "interrupted", "steps": 3,
                                                           "planned_steps": 60, "error": "interrupted by SIGINT"})
    monkeypatch.setattr(bench, "prepare", lambda cfg, root: None)
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    kconf, _ = resolve([], parse_overrides("DEVICE_CPU=y"))
    write_outputs(kconf, tmp_path / ".config", tmp_path / "config.py")
    monkeypatch.setenv("BENCH_JSON", str(tmp_path / "bench.json"))
    monkeypatch.delenv("SET", raising=False)
    assert bench.main() == 1
    assert json.loads((tmp_path / "bench.json").read_text())["status"] == "interrupted"
