"""Rows of post-training data (SFT_DATA, DPO_DATA): JSON, JSONL, Parquet, a folder of them, or a
Hugging Face dataset, each row a dict with where it came from (``file:line`` or ``file row N``).

Unlike pretraining sources (data/sources.py), rows are small and read whole: a fine-tuning set
is thousands to a few hundred thousand examples, and each bad row is named by file and row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from data.errors import DataError

SUFFIXES = (".json", ".jsonl", ".parquet")


def read_records(setting: str, root: Path, symbol: str) -> list[tuple[dict, str]]:
    """(row, where) for every row named by ``setting`` (the value of ``symbol``, e.g. CONFIG_SFT_DATA):
    a file, a folder of files (sorted, recursive), or ``hf:<name>[:<split>]``."""
    if not setting:
        raise DataError(f"{symbol} is empty: set it to a .json, .jsonl or .parquet file, a folder of them, "
                        "or hf:<dataset>[:<split>]")
    if setting.startswith("hf:"):
        return _hub_records(setting, symbol)
    path = Path(setting).expanduser()
    path = path if path.is_absolute() else root / path
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise DataError(f"{symbol}={setting!r}: the folder {path} holds no {', '.join(SUFFIXES)} files")
    elif path.is_file():
        if path.suffix not in SUFFIXES:
            raise DataError(f"{symbol}={setting!r}: {path} is not a {', '.join(SUFFIXES)} file")
        files = [path]
    else:
        raise DataError(f"{symbol}={setting!r}: {path} does not exist (a relative path is taken from {root})")
    rows = [row for f in files for row in _file_records(f, symbol)]
    if not rows:
        raise DataError(f"{symbol}={setting!r}: no rows in {', '.join(map(str, files[:3]))}")
    return rows


def _file_records(path: Path, symbol: str) -> Iterator[tuple[dict, str]]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield _dict(_json(line, f"{path}:{number}", symbol), f"{path}:{number}", symbol)
    elif path.suffix == ".json":
        data = _json(path.read_text(encoding="utf-8"), str(path), symbol)
        if not isinstance(data, list):
            raise DataError(f"{symbol}: {path} holds a JSON {type(data).__name__}, not a list of rows; "
                            "write the rows as a JSON list (or one per line as .jsonl)")
        for number, row in enumerate(data, 1):
            yield _dict(row, f"{path} row {number}", symbol)
    else:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError... for a damaged or non-Parquet file
            raise DataError(f"{symbol}: {path} cannot be read as Parquet ({type(e).__name__}: {e})") from None
        for number, row in enumerate(table.to_pylist(), 1):
            yield row, f"{path} row {number}"


def _json(text: str, where: str, symbol: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{symbol}: {where}: not valid JSON ({e})") from None


def _dict(row, where: str, symbol: str) -> tuple[dict, str]:
    if not isinstance(row, dict):
        raise DataError(f"{symbol}: {where}: a row must be a JSON object, not {type(row).__name__}")
    return row, where


def _hub_records(setting: str, symbol: str) -> list[tuple[dict, str]]:
    name, _, split = setting[3:].partition(":")
    split = split or "train"
    fetch = f"datasets.load_dataset({name!r}, split={split!r})"
    try:
        import datasets
    except ImportError:
        raise DataError(f"{symbol}={setting!r}: the Hugging Face 'datasets' library is not installed "
                        "(pip install datasets); or save the rows as a local .jsonl or .parquet file") from None
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown dataset, unknown split: many kinds
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{symbol}={setting!r}: could not load the dataset {name} [{split}] "
                        f"({type(e).__name__}: {first}). Offline, it must be in the Hugging Face datasets cache: "
                        f"on a machine with internet run python -c \"import datasets; {fetch}\" and copy its cache "
                        "(~/.cache/huggingface, or HF_DATASETS_CACHE / HF_HOME) here; or save the rows as a "
                        "local .jsonl or .parquet file") from None
    return [(dict(row), f"{setting} row {number}") for number, row in enumerate(rows, 1)]
