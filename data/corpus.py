"""Where training text comes from: DATA_PATH, a Hugging Face dataset, or a preset.

Each source is a list of files read in order (see data/sources.py for formats)
plus a fingerprint cheap enough to compute on every run (paths, sizes,
modification times, read options), which names the prepared-data cache.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from data.sources import Piece, ReadOptions, Stats, file_kind, read_pieces

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# Tests and generated tables (codec maps, pydoc topics) are left out: code, not data.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"}
DOC_SEPARATOR = "\n\n"  # between documents for tokenizers without an end-of-sequence token


class DataError(ValueError):
    """A data source cannot be used; the message says what, where and what to do."""


@dataclass(frozen=True)
class Source:
    label: str  # short readable name used in cache directory names
    files: tuple[Path, ...]
    description: str
    byte_cap: int = 0  # 0 = no cap
    options: ReadOptions = ReadOptions()
    binary_skipped: tuple[Path, ...] = field(default=(), compare=False)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.label}|{self.byte_cap}|{self.options}".encode())
        for f in self.files:
            st = f.stat()
            h.update(f"|{f}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def pieces(self, stats: Stats) -> Iterator[Piece]:
        """Every document's text in file order, as bounded pieces; cut at byte_cap.

        The cap counts DOC_SEPARATOR bytes between documents, as the joined text would.
        """
        left = self.byte_cap or -1
        in_doc = False
        for path in self.files:
            for piece in read_pieces(path, self.options, stats):
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


def source_for(cfg, root: Path) -> Source:
    """The source the configuration asks for: DATA_PATH, else DATA_HF_NAME, else the preset."""
    from data import hub

    opts = ReadOptions.from_config(cfg)
    if cfg.DATA_PATH:
        return local_source(rooted(cfg.DATA_PATH, root), opts)
    downloads = rooted(cfg.DATA_CACHE_DIR, root) / "downloads"
    if cfg.DATA_HF_NAME:
        return hub.hub_source(hub.HubDataset(cfg.DATA_HF_NAME, cfg.DATA_HF_CONFIG, cfg.DATA_HF_SPLIT,
                                             "CONFIG_DATA_HF_NAME"), cfg.DATA_HF_MAX_MB, downloads, opts)
    for symbol, preset in hub.PRESETS.items():
        if cfg.get(symbol):
            return hub.hub_source(preset, cfg.DATA_HF_MAX_MB, downloads, opts)
    if cfg.DATASET_SHAKESPEARE:
        return shakespeare_source(downloads)
    return embedded_source(cfg.EMBEDDED_CORPUS_MB * 1_000_000)


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
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = []
        for p in sorted((p for p in path.rglob("*") if p.is_file()
                         and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                        key=lambda p: p.relative_to(path).as_posix()):
            (files if _readable(p) else binary).append(p)
        if not files:
            raise DataError(f"{where}: the folder holds no UTF-8 text files (nor .jsonl or .parquet); "
                            "point it at a .txt file or a folder of them")
    else:
        raise DataError(f"{where}: no such file or folder; set it to a local text, .jsonl or .parquet file, "
                        "or a folder of them")
    return Source(label or _slug(path.name.split(".")[0] or path.name), tuple(files),
                  description or f"local data at {path}", options=opts, binary_skipped=tuple(binary))


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


def _readable(path: Path) -> bool:
    """JSONL/Parquet by extension; other files unless binary (a NUL byte in the first 8 KiB)."""
    if file_kind(path) != "text":
        return True
    try:
        with open(path, "rb") as f:
            return b"\0" not in f.read(8192)
    except OSError:
        return False


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40] or "data"
