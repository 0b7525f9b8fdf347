"""What a file holds, judged from bounded reads: its content digest and whether it is binary.

Both read the same blocks: the whole file when it is small, otherwise blocks at
the start, the end and evenly spaced between, so the cost stays bounded on
files of any size. The digest names prepared data (a file rewritten with the
same size and modification time is still seen as changed when it is hashed in
full, and almost always when sampled); the binary check keeps NUL-filled or
control-character files out of a text corpus. Results are memoized per file
stat (including the inode change time, which no tool can set back), so a file
changed in place within one process is read again (unless within one tick of
the file system's clock, a few milliseconds).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path

FULL_HASH_BYTES = 64 << 20  # up to this size a file's digest covers every byte
BLOCK_BYTES = 64 << 10
DIGEST_BLOCKS = 16  # sampled blocks of a larger file: first, last, evenly spaced between
BINARY_SCAN_BYTES = 1 << 20  # up to this size the binary check reads the whole file
BINARY_BLOCKS = 16
CONTROL_SHARE = 0.10  # more control characters than this in a block (or record) is binary
_MIN_CONTROLS = 8  # ...counted only from this many, so a short tail with one stray byte is not
# Control characters that text does not hold: all below 0x20 except tab, line feed, vertical tab,
# form feed, carriage return and escape (ANSI colours in logs), plus DEL.
_CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0e, 0x1b), *range(0x1c, 0x20), 0x7f])
_CONTROL_RE = re.compile("[" + "".join(f"\\x{b:02x}" for b in _CONTROL_BYTES) + "]")
BINARY_HINT = "if it is UTF-16 text, convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)"


def stat_key(path: Path) -> tuple:
    """One state of a file within this process (a memoization key): path, size, mtime, then ctime, inode, device."""
    st = os.stat(path)
    return str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


def block_offsets(size: int, blocks: int, block: int = BLOCK_BYTES) -> list[int]:
    """Offsets of ``blocks`` blocks of ``block`` bytes: first, last and evenly spaced between."""
    if size <= blocks * block:
        return list(range(0, size, block))
    span = size - block
    return sorted({span * i // (blocks - 1) for i in range(blocks)})


def _blocks(path: Path, offsets: list[int], block: int = BLOCK_BYTES):
    with open(path, "rb") as f:
        for offset in offsets:
            f.seek(offset)
            yield offset, f.read(block)


def file_digest(path: Path) -> str:
    """SHA-256 of the file's bytes up to FULL_HASH_BYTES; above, of its size, mtime and sampled blocks."""
    return _digest(*stat_key(path))


@functools.lru_cache(maxsize=65536)
def _digest(path: str, size: int, mtime_ns: int, *_) -> str:
    h = hashlib.sha256()
    if size <= FULL_HASH_BYTES:
        with open(path, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
        return f"sha256:{h.hexdigest()}"
    h.update(f"{size}|{mtime_ns}".encode())
    for offset, data in _blocks(Path(path), block_offsets(size, DIGEST_BLOCKS)):
        h.update(f"|{offset}|".encode())
        h.update(data)
    return f"sampled-sha256:{h.hexdigest()}"


def binary_evidence(path: Path) -> str | None:
    """Why ``path`` is not text ("byte 0x00 at offset 17", "34% control characters in bytes 0-65535 ..."), or None.

    Reads the whole file up to BINARY_SCAN_BYTES, sampled blocks beyond.
    """
    return _binary(*stat_key(path))


@functools.lru_cache(maxsize=65536)
def _binary(path: str, size: int, *_) -> str | None:
    blocks = BINARY_SCAN_BYTES // BLOCK_BYTES if size <= BINARY_SCAN_BYTES else BINARY_BLOCKS
    for offset, data in _blocks(Path(path), block_offsets(size, blocks)):
        if found := bytes_evidence(data, offset):
            return found
    return None


def bytes_evidence(data: bytes, offset: int = 0) -> str | None:
    """Why ``data`` (read at ``offset`` of its file) is binary, or None: a NUL byte, or too many control bytes."""
    nul = data.find(b"\0")
    if nul >= 0:
        return f"byte 0x00 at offset {offset + nul}"
    controls = len(data) - len(data.translate(None, _CONTROL_BYTES))
    if controls >= _MIN_CONTROLS and controls > CONTROL_SHARE * len(data):
        return (f"{100 * controls / len(data):.0f}% control characters in bytes {offset}-{offset + len(data) - 1} "
                f"(text has under {100 * CONTROL_SHARE:.0f}%)")
    return None


def text_evidence(text: str) -> str | None:
    """Why decoded ``text`` (a JSONL field, a Parquet value) is binary junk, or None."""
    if not _CONTROL_RE.search(text):
        return None
    nul = text.find("\0")
    if nul >= 0:
        return f"character U+0000 at position {nul}"
    controls = len(_CONTROL_RE.findall(text))
    if controls >= _MIN_CONTROLS and controls > CONTROL_SHARE * len(text):
        return f"{100 * controls / len(text):.0f}% control characters (text has under {100 * CONTROL_SHARE:.0f}%)"
    return None
