"""Reading documents out of files as bounded text pieces: .txt, .jsonl(.gz), .parquet.

A reader never holds a whole file: it yields ``Piece`` tuples of at most a few
MB of text, flagged where a document ends, plus how many source bytes were
consumed (for progress). A text file is one document (or several, split at
DATA_TEXT_SEPARATOR lines); a JSONL record or a Parquet row is one document.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

from data.content import BINARY_HINT, bytes_evidence, stat_key, text_evidence
from data.errors import DataError

CHUNK_BYTES = 4 << 20
_replaced = [0]  # invalid byte sequences replaced so far (policy "replace")


def _count_replace(e: UnicodeDecodeError):
    _replaced[0] += 1
    return "\ufffd", e.end


codecs.register_error("data.count_replace", _count_replace)


class Piece(NamedTuple):
    text: str
    doc_end: bool  # the document ends after this text
    consumed: int  # source bytes read, for progress


@dataclass(frozen=True)
class ReadOptions:
    """How files are read; part of the source fingerprint."""
    jsonl_field: str = "text"
    parquet_column: str = "text"
    separator: str = ""
    invalid: str = "skip"  # non-UTF-8 text: "skip" or "replace" (the DATA_INVALID_UTF8 choice)

    @classmethod
    def from_config(cls, cfg) -> "ReadOptions":
        return cls(cfg.DATA_JSONL_FIELD, cfg.DATA_PARQUET_COLUMN, cfg.DATA_TEXT_SEPARATOR, cfg.DATA_INVALID_UTF8)


@dataclass
class Stats:
    """What a pass over a source left out or repaired (reported in the log and the manifest)."""
    documents: int = 0
    text_bytes: int = 0
    skipped_files: list = field(default_factory=list)
    skipped_records: int = 0
    replaced_sequences: int = 0
    first_invalid: str = ""  # where the first skipped invalid UTF-8 was: "file: byte 0xe9 at offset 3", "file:2"

    def skip_file(self, path: Path, evidence: str) -> None:
        self.skipped_files.append(path)
        self.first_invalid = self.first_invalid or f"{path}: {evidence}"

    def skip_record(self, where: str) -> None:
        self.skipped_records += 1
        self.first_invalid = self.first_invalid or where

    def add(self, other: "Stats") -> None:
        """Fold another pass's skip counts into this one (for errors over several sources)."""
        self.skipped_files += other.skipped_files
        self.skipped_records += other.skipped_records
        self.replaced_sequences += other.replaced_sequences
        self.first_invalid = self.first_invalid or other.first_invalid

    def as_dict(self) -> dict:
        return {"non_utf8_files": len(self.skipped_files), "non_utf8_files_first": [str(p) for p in self.skipped_files[:5]],
                "non_utf8_records": self.skipped_records, "non_utf8_first_at": self.first_invalid,
                "replaced_byte_sequences": self.replaced_sequences}


def file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return "jsonl"
    return "parquet" if name.endswith(".parquet") else "text"


def read_pieces(path: Path, opts: ReadOptions, stats: Stats, where: str = "") -> Iterator[Piece]:
    """The documents of ``path`` as pieces; ``where`` (the setting that named the file) prefixes binary-data errors."""
    before = _replaced[0]
    try:
        kind = file_kind(path)
        if kind == "jsonl":
            yield from _jsonl_pieces(path, opts, stats, where)
        elif kind == "parquet":
            yield from _parquet_pieces(path, opts, stats, where)
        else:
            yield from _text_pieces(path, opts, stats, where)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); check the file and its permissions") from None
    finally:
        stats.replaced_sequences += _replaced[0] - before


def _errors(opts: ReadOptions) -> str:
    return "data.count_replace" if opts.invalid == "replace" else "strict"


def binary_error(where: str, what: str, evidence: str):
    """The error for binary data inside a text source: the setting, the file (or record), what was found."""
    return DataError(f"{where + ': ' if where else ''}{what} is binary data, not text: {evidence}; {BINARY_HINT}, "
                     "otherwise remove it from the data")


def _text_pieces(path: Path, opts: ReadOptions, stats: Stats, where: str) -> Iterator[Piece]:
    if opts.invalid == "skip":
        bad = first_invalid_utf8(*stat_key(path))
        if bad is not None:
            stats.skip_file(path, bad)
            yield Piece("", False, path.stat().st_size)
            return
    sep = re.compile(r"(?m)^" + re.escape(opts.separator) + r"[ \t\r]*(?:\n|\Z)") if opts.separator else None
    decoder = codecs.getincrementaldecoder("utf-8")(_errors(opts))
    carry, offset = "", 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(CHUNK_BYTES)
            # Checked as it streams: a sampled check before reading can miss a binary stretch of a large file.
            if evidence := bytes_evidence(raw, offset):
                raise binary_error(where, str(path), evidence)
            offset += len(raw)
            final = not raw
            text = carry + decoder.decode(raw, final=final)
            carry = ""
            if not final:  # cut after the last newline so pieces hold whole lines
                cut = text.rfind("\n") + 1
                if cut or len(text) < 4 * CHUNK_BYTES:
                    text, carry = text[:cut], text[cut:]
            parts = sep.split(text) if sep else [text]
            for part in parts[:-1]:
                yield Piece(part, True, 0)
            yield Piece(parts[-1], final, len(raw))
            if final:
                return


@functools.lru_cache(maxsize=4096)
def first_invalid_utf8(path: str, *stat) -> str | None:
    """Where the file first fails to decode as UTF-8 ("byte 0xe9 at offset 3"), or None when it all decodes.

    Read in chunks; memoized per data.content.stat_key (so a file rewritten in place is read again).
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    read = 0
    try:
        with open(path, "rb") as f:
            while raw := f.read(CHUNK_BYTES):
                pending = len(decoder.getstate()[0])  # bytes of an unfinished sequence carried from the last chunk
                read += len(raw)
                decoder.decode(raw)
        pending, raw = len(decoder.getstate()[0]), b""
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        at = read - len(raw) - pending + e.start
        return f"byte 0x{e.object[e.start]:02x} at offset {at}"
    return None


def _jsonl_pieces(path: Path, opts: ReadOptions, stats: Stats, where: str) -> Iterator[Piece]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                if opts.invalid == "skip":
                    stats.skip_record(f"{path}:{lineno}")
                    yield Piece("", False, len(raw))
                    continue
                line = raw.decode("utf-8", _errors(opts))
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line of a .jsonl file "
                                "must be one JSON object") from None
            text = record.get(opts.jsonl_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                fields = sorted(record)[:10] if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path}:{lineno}: no string field {opts.jsonl_field!r} (found: {fields}); "
                                "set CONFIG_DATA_JSONL_FIELD to the field that holds the text")
            if evidence := text_evidence(text):
                raise binary_error(where, f"{path}:{lineno}: field {opts.jsonl_field!r}", evidence)
            yield Piece(text, True, len(raw))


def _parquet_pieces(path: Path, opts: ReadOptions, stats: Stats, where: str) -> Iterator[Piece]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet files needs pyarrow; pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if opts.parquet_column not in names:
        raise DataError(f"{path}: no column {opts.parquet_column!r} (columns: {names[:10]}); "
                        "set CONFIG_DATA_PARQUET_COLUMN to the column that holds the text")
    size, rows, first = path.stat().st_size, max(1, pf.metadata.num_rows), 0
    for batch in pf.iter_batches(batch_size=1024, columns=[opts.parquet_column]):
        for row, value in enumerate(batch.column(0).to_pylist(), first):
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8", _errors(opts))
                except UnicodeDecodeError:
                    stats.skip_record(f"{path}: row {row}")
                    continue
            if isinstance(value, str):
                if evidence := text_evidence(value):
                    raise binary_error(where, f"{path}: row {row}, column {opts.parquet_column!r}", evidence)
                yield Piece(value, True, 0)
        first += batch.num_rows
        yield Piece("", False, size * batch.num_rows // rows)
