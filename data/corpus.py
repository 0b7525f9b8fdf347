"""Local training text: a DATA_PATH file or folder, the embedded corpus, tiny Shakespeare.

Each source is a list of files read in order (see data/sources.py for formats)
plus a fingerprint of their content (data/content.py: a full hash of each file
up to 64 MiB, sampled blocks beyond) and the read options, which names the
prepared-data cache. A single DATA_PATH file that is binary is refused; in a
folder, binary files are skipped and counted.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import sys
import sysconfig
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from data.content import BINARY_HINT, binary_evidence, file_digest
from data.errors import DataError
from data.sources import Piece, ReadOptions, Stats, file_kind, read_pieces

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# Tests and generated tables (codec maps, pydoc topics) are left out: code, not data.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"}
DOC_SEPARATOR = "\n\n"  # between documents for tokenizers without an end-of-sequence token


@dataclass(frozen=True)
class Source:
    label: str  # short readable name used in cache directory names
    files: tuple[Path, ...]
    description: str
    byte_cap: int = 0  # 0 = no cap
    options: ReadOptions = ReadOptions()
    binary_skipped: tuple[Path, ...] = field(default=(), compare=False)
    where: str = field(default="", compare=False)  # the setting that names it, for errors: CONFIG_DATA_PATH='...'

    @property
    def fingerprint(self) -> str:
        """The one cache key of the source's content: every file's path and digest, the cap and read options."""
        h = hashlib.sha256(f"{self.label}|{self.byte_cap}|{self.options}".encode())
        for f in self.files:
            h.update(f"|{f}|{file_digest(f)}".encode())
        return h.hexdigest()

    @property
    def size_bytes(self) -> int:
        """Bytes that will be read: the files' total, at most the cap (progress totals, worker counts)."""
        total = sum(f.stat().st_size for f in self.files)
        return min(total, self.byte_cap) if self.byte_cap else total

    def pieces(self, stats: Stats) -> Iterator[Piece]:
        """Every document's text in file order, as bounded pieces; cut at byte_cap.

        The cap counts DOC_SEPARATOR bytes between documents, as the joined text would.
        """
        left = self.byte_cap or -1
        in_doc = False
        for path in self.files:
            for piece in read_pieces(path, self.options, stats, self.where):
                if piece.text and not in_doc:
                    stats.documents += 1
                    if stats.documents > 1 and left > 0:
                        left = max(0, left - len(DOC_SEPARATOR))
                    in_doc = True
                text = piece.text
                if left >= 0:
                    data = text.encode("utf-8")
                    if len(data) >= left:
                        text = data[:left].decode("utf-8", errors="ignore")
                        stats.text_bytes += len(text.encode("utf-8"))
                        yield Piece(text, True, piece.consumed)
                        return
                    left -= len(data)
                    stats.text_bytes += len(data)
                else:
                    stats.text_bytes += len(text.encode("utf-8")) if not text.isascii() else len(text)
                in_doc = in_doc and not piece.doc_end
                yield Piece(text, piece.doc_end, piece.consumed)

    def documents(self) -> Iterator[str]:
        """Whole documents (small corpora and tests only: each is held in memory)."""
        parts: list[str] = []
        for piece in self.pieces(Stats()):
            parts.append(piece.text)
            if piece.doc_end:
                if any(parts):
                    yield "".join(parts)
                parts = []
        if any(parts):
            yield "".join(parts)

    def read_text(self) -> str:
        """The corpus as one string, documents separated by a blank line (small corpora only)."""
        return DOC_SEPARATOR.join(self.documents())


def rooted(path: str, root: Path) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else root / p


def embedded_source(byte_cap: int) -> Source:
    """The Python standard library's own source, in sorted order (exists everywhere)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / n for n in sorted(filenames) if n.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(stdlib).as_posix())
    chosen, total = [], 0
    for f in files:
        if total >= byte_cap:
            break
        chosen.append(f)
        total += f.stat().st_size
    v = sys.version_info
    return Source(f"pystdlib{v.major}{v.minor}", tuple(chosen),
                  f"Python {v.major}.{v.minor}.{v.micro} standard library source ({stdlib})", byte_cap,
                  ReadOptions(invalid="replace"))


def local_source(path: Path, opts: ReadOptions = ReadOptions(), label: str = "", description: str = "",
                 where: str = "") -> Source:
    """A file, or every readable file under a folder (recursive, sorted; binary files skipped).

    ``where`` names the setting in errors (default: CONFIG_DATA_PATH=<path>).
    """
    where = where or f"CONFIG_DATA_PATH={str(path)!r}"
    binary: list[Path] = []
    if _is_dir(path, where):
        files = []
        for p in sorted((p for p in path.rglob("*") if p.is_file()
                         and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                        key=lambda p: p.relative_to(path).as_posix()):
            try:
                (binary if _binary(p) else files).append(p)
            except OSError:  # unreadable: left out like a binary file
                binary.append(p)
        if not files:
            found = f" ({len(binary)} binary or unreadable files skipped, the first {binary[0]})" if binary else ""
            raise DataError(f"{where}: the folder holds no UTF-8 text files (nor .jsonl or .parquet){found}; "
                            "point it at a .txt file or a folder of them")
    else:
        try:
            evidence = _binary(path)
        except OSError as e:
            raise DataError(f"{where}: cannot read {path} ({e.strerror or e}); check the file and its "
                            "permissions") from None
        if evidence:
            raise DataError(f"{where}: {path} is binary data, not text: {evidence}; {BINARY_HINT}, or set "
                            f"{_symbol(where)} to a text, .jsonl or .parquet file")
        files = [path]
    return Source(label or slug(path.name.split(".")[0] or path.name), tuple(files),
                  description or f"local data at {path}", options=opts, binary_skipped=tuple(binary), where=where)


def _is_dir(path: Path, where: str) -> bool:
    """Whether ``path`` is a folder (else a file); a missing path, a symlink loop or an unreadable one is an error."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(f"{where}: symlink loop ({e.strerror}): resolving {path} leads back to itself; "
                            "point the link (or the setting) at a real file or folder") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            dangling = f" (a symlink to {os.readlink(path)!r}, which does not exist)" if os.path.islink(path) else ""
            raise DataError(f"{where}: no such file or folder{dangling}; set it to a local text, .jsonl or "
                            ".parquet file, or a folder of them") from None
        raise DataError(f"{where}: cannot read {path} ({e.strerror or e}); check the path and its "
                        "permissions") from None
    if stat.S_ISDIR(st.st_mode):
        return True
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{where}: {path} is not a regular file or folder; point it at a text, .jsonl or "
                        ".parquet file, or a folder of them")
    return False


def shakespeare_source(download_dir: Path) -> Source:
    """Tiny Shakespeare, downloaded once (atomically) into the data cache."""
    target = download_dir / "tinyshakespeare.txt"
    if not target.exists():
        download_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        try:
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
                tmp.write_bytes(r.read())
            os.replace(tmp, target)
        except (urllib.error.URLError, OSError) as e:
            tmp.unlink(missing_ok=True)
            raise DataError(
                f"CONFIG_DATASET_SHAKESPEARE: could not download tiny Shakespeare from {SHAKESPEARE_URL} "
                f"({getattr(e, 'reason', e)}). Offline? Copy its input.txt to this machine and run with "
                f"make SET='DATA_PATH=/path/to/input.txt', or save it as {target}."
            ) from None
    return Source("shakespeare", (target,), f"tiny Shakespeare ({SHAKESPEARE_URL})")


def _binary(path: Path) -> str | None:
    """What makes ``path`` binary (data.content.binary_evidence), or None; text and plain .jsonl are checked."""
    if file_kind(path) == "parquet" or path.name.lower().endswith(".gz"):
        return None
    return binary_evidence(path)


def empty_corpus_error(sources, stats: Stats, description: str = "") -> DataError:
    """The corpus of ``sources`` (a Source or several) had no text: what was read, what was skipped, what to do."""
    sources = [sources] if isinstance(sources, Source) else list(sources)
    first = sources[0]
    name = description or first.where or first.description
    skipped = stats.as_dict()
    n = sum(len(s.files) for s in sources)
    counts = [f"{n} file{'s' * (n != 1)}"] + [f"{k} {what}" for k, what in (
        (skipped["non_utf8_files"], "skipped as not UTF-8"), (skipped["non_utf8_records"], "non-UTF-8 records skipped"),
        (sum(len(s.binary_skipped) for s in sources), "binary files left out")) if k]
    if stats.first_invalid:
        fix = (f"the first invalid UTF-8 is at {stats.first_invalid}. Choose CONFIG_DATA_INVALID_UTF8_REPLACE=y to "
               "keep such text with U+FFFD for each invalid byte sequence, or convert it to UTF-8 (for example "
               "iconv -f LATIN1 -t UTF-8)")
    else:
        fix = f"point {_symbol(first.where) or 'CONFIG_DATA_PATH'} at some UTF-8 text"
    return DataError(f"{name}: the corpus is empty ({', '.join(counts)}); {fix}")


def _symbol(where: str) -> str:
    """The symbol of an error prefix ("CONFIG_DATA_MIX: entry a=b", "CONFIG_DATA_PATH='x'")."""
    return where.split("=")[0].split(":")[0]


def slug(name: str) -> str:
    """``name`` as a short cache-folder label: letters, digits, "-" and "_" only."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40] or "data"
