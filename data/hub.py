"""Hugging Face datasets (DATA_HF_NAME and the TinyStories/FineWeb-Edu presets).

A dataset is streamed once with the `datasets` library (an optional package,
not a dependency) into a local JSONL file under DATA_CACHE_DIR/downloads,
capped at DATA_HF_MAX_MB of text and written atomically; from then on it is an
ordinary local source and needs no network. Without the library or offline the
error names the symbol and the local file to use instead.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from data.corpus import Source, local_source, slug
from data.errors import DataError
from data.sources import ReadOptions


@dataclass(frozen=True)
class HubDataset:
    name: str
    config: str
    split: str
    symbol: str  # the Kconfig symbol that asked for it, for error messages
    offline_hint: str = ("Download the data yourself and pass a local path with "
                         "make SET='DATA_PATH=/path/to/file-or-folder' (.txt, .jsonl or .parquet).")


PRESETS = {  # by the DATASET choice's value
    "tinystories": HubDataset(
        "roneneldan/TinyStories", "", "train", "CONFIG_DATASET_TINYSTORIES",
        "Download TinyStoriesV2-GPT4-train.txt (2.2 GB) from "
        "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt "
        "and run with make SET='DATA_PATH=/path/to/TinyStoriesV2-GPT4-train.txt "
        "DATA_TEXT_SEPARATOR=<|endoftext|>'."),
    "fineweb_edu": HubDataset(
        "HuggingFaceFW/fineweb-edu", "sample-10BT", "train", "CONFIG_DATASET_FINEWEB_EDU",
        "Download sample/10BT/000_00000.parquet (about 2 GB) from "
        "https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu/tree/main/sample/10BT "
        "and run with make SET='DATA_PATH=/path/to/000_00000.parquet' (or a folder of such shards)."),
}


def hub_source(ds: HubDataset, max_mb: int, download_dir: Path, opts: ReadOptions) -> Source:
    """The dataset's saved copy, streamed and saved first when missing."""
    name = "-".join(slug(p) for p in (ds.name.replace("/", "--"), ds.config, ds.split) if p)
    target = download_dir / f"hf-{name}-{max_mb}mb.jsonl"
    if not target.exists():
        _download(ds, opts.jsonl_field, max_mb * 1_000_000, target)
    return local_source(target, replace(opts, jsonl_field="text"), label=slug(ds.name.split("/")[-1]),
                        description=f"Hugging Face {ds.name} {ds.config} [{ds.split}], first {max_mb} MB ({target})",
                        where=_where(ds))


def _where(ds: HubDataset) -> str:
    return f"{ds.symbol}={ds.name!r}" if ds.symbol == "CONFIG_DATA_HF_NAME" else ds.symbol


def _download(ds: HubDataset, field: str, cap: int, target: Path) -> None:
    where = _where(ds)
    try:
        import datasets
    except ImportError:
        raise DataError(f"{where}: the Hugging Face 'datasets' library is not installed, so {ds.name} cannot be "
                        f"streamed (pip install datasets). {ds.offline_hint}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    written = 0
    try:
        stream = datasets.load_dataset(ds.name, ds.config or None, split=ds.split, streaming=True)
        with open(tmp, "w", encoding="utf-8") as f:
            for row in stream:
                text = row.get(field)
                if not isinstance(text, str):
                    raise DataError(f"{where}: rows have no string field {field!r} (found: {sorted(row)[:10]}); "
                                    "set CONFIG_DATA_JSONL_FIELD to the field that holds the text")
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(text.encode("utf-8"))
                if written >= cap:
                    break
        if not written:
            raise DataError(f"{where}: split {ds.split!r} of {ds.name} streamed no text; check DATA_HF_SPLIT")
        os.replace(tmp, target)
    except DataError:
        raise
    except Exception as e:  # offline, unknown dataset, gated dataset: all surface as library-specific errors
        raise DataError(f"{where}: could not stream {ds.name} from the Hugging Face Hub "
                        f"({type(e).__name__}: {e}). Offline? {ds.offline_hint}") from None
    finally:
        tmp.unlink(missing_ok=True)
