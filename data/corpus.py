"""Where training text comes from: the embedded corpus, a preset, or DATA_PATH.

Each source yields its text plus a fingerprint cheap enough to compute on every
run (paths, sizes, modification times), which names the prepared-data cache.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# Tests and generated tables (codec maps, pydoc topics) are left out: code, not data.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"}


class DataError(Exception):
    """A data source cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Source:
    label: str  # short readable name used in cache directory names
    files: tuple[Path, ...]
    description: str
    byte_cap: int = 0  # 0 = no cap

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.label}|{self.byte_cap}".encode())
        for f in self.files:
            st = f.stat()
            h.update(f"|{f}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def read_text(self) -> str:
        """The corpus: files in order, separated by a blank line, cut at byte_cap."""
        parts, total = [], 0
        for f in self.files:
            text = f.read_text(encoding="utf-8", errors="replace")
            parts.append(text)
            total += len(text.encode("utf-8"))
            if self.byte_cap and total >= self.byte_cap:
                break
        text = "\n\n".join(parts)
        if self.byte_cap:
            text = text.encode("utf-8")[: self.byte_cap].decode("utf-8", errors="ignore")
        return text


def source_for(cfg, root: Path) -> Source:
    """The source the configuration asks for."""
    if cfg.DATA_PATH:
        return local_source(_rooted(cfg.DATA_PATH, root))
    if cfg.DATASET_SHAKESPEARE:
        return shakespeare_source(_rooted(cfg.DATA_CACHE_DIR, root) / "downloads")
    return embedded_source(cfg.EMBEDDED_CORPUS_MB * 1_000_000)


def _rooted(path: str, root: Path) -> Path:
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
                  f"Python {v.major}.{v.minor}.{v.micro} standard library source ({stdlib})", byte_cap)


def local_source(path: Path) -> Source:
    """A text file, or every UTF-8 text file under a folder (recursive, sorted)."""
    where = f"CONFIG_DATA_PATH={str(path)!r}"
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and _looks_like_text(p)
                        and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise DataError(f"{where}: the folder holds no UTF-8 text files; point it at a .txt file or a folder of them")
    else:
        raise DataError(f"{where}: no such file or folder; set it to a local text file or folder")
    return Source(_slug(path.stem or path.name), tuple(files), f"local text at {path}")


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


def _looks_like_text(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start > len(head) - 4  # a multibyte character cut by the 8 KiB window
    except OSError:
        return False
    return b"\0" not in head


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40] or "data"
