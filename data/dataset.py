"""The source the configuration asks for: DATA_PATH, else DATA_HF_NAME, else the DATASET preset.

The one place that chooses between the local sources (data/corpus.py) and the Hugging Face
ones (data/hub.py), so neither imports the other to choose.
"""

from __future__ import annotations

from pathlib import Path

from data.corpus import Source, embedded_source, local_source, rooted, shakespeare_source
from data.hub import PRESETS, HubDataset, hub_source
from data.sources import ReadOptions


def source_for(cfg, root: Path) -> Source:
    """``cfg``'s training source; relative paths are relative to ``root``."""
    opts = ReadOptions.from_config(cfg)
    if cfg.DATA_PATH:
        return local_source(rooted(cfg.DATA_PATH, root), opts)
    downloads = rooted(cfg.DATA_CACHE_DIR, root) / "downloads"
    if cfg.DATA_HF_NAME:
        return hub_source(HubDataset(cfg.DATA_HF_NAME, cfg.DATA_HF_CONFIG, cfg.DATA_HF_SPLIT, "CONFIG_DATA_HF_NAME"),
                          cfg.DATA_HF_MAX_MB, downloads, opts)
    if cfg.DATASET == "embedded":
        return embedded_source(cfg.EMBEDDED_CORPUS_MB * 1_000_000)
    if cfg.DATASET == "shakespeare":
        return shakespeare_source(downloads)
    return hub_source(PRESETS[cfg.DATASET], cfg.DATA_HF_MAX_MB, downloads, opts)
