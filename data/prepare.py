"""Prepared data for a configuration: its one source, or a DATA_MIX / DATA_VAL_EXTRA mix.

The entry point of the data library (the runner, 'make data', 'make slurm' and the trainer call
``prepare``). It chooses between preparing the single source (data/cache.py, with the source's own
tokenizer) and a mix (data/mix.py, with one tokenizer shared by its parts), so neither of those
imports the other.
"""

from __future__ import annotations

from pathlib import Path

from data.cache import PreparedData, prepare_source
from data.corpus import rooted
from data.dataset import source_for
from data.mix import PreparedMix, prepare_mix
from data.vocab import configured_tokenizer


def prepare(cfg, root: Path, log=print) -> PreparedData | PreparedMix:
    """Prepared data for ``cfg``, reusing an up-to-date copy when one exists.

    A PreparedData for one source; a PreparedMix when DATA_MIX or DATA_VAL_EXTRA is set.
    """
    if cfg.DATA_MIX or cfg.DATA_VAL_EXTRA:
        return prepare_mix(cfg, root, log)
    source = source_for(cfg, root)
    cache = rooted(cfg.DATA_CACHE_DIR, root)
    return prepare_source(cfg, root, source, configured_tokenizer(cfg, source, cache, log), log)
