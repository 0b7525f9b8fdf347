"""Several weighted training sources (DATA_MIX) and named validation sets (DATA_VAL_EXTRA).

DATA_MIX = "WEIGHT:NAME=PATH ..." trains on several local sources: one tokenizer
covers them all (data.vocab.mix_tokenizer), each source is prepared on its own
(cached and atomic like a single source, with its own VAL_FRACTION split), and
training sequences pick their source by weight (data.loader.MixedBatches).
Each source's held-out split is a validation set named after it; DATA_VAL_EXTRA
= "NAME=PATH ..." adds files or folders used entirely for validation. Without
either symbol, data.prepare.prepare returns a plain PreparedData and ``as_mix`` wraps it
as a one-source mix whose validation set is called "val", as before.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from data.cache import PreparedData, prepare_source
from data.corpus import local_source, rooted
from data.dataset import source_for
from data.errors import DataError
from data.loader import Batches, MixedBatches
from data.sources import ReadOptions
from data.tokenizer import Tokenizer
from data.vocab import configured_tokenizer, mix_tokenizer, tokenizer_settings

_NAME = re.compile(r"[A-Za-z0-9_-]+")
MIX_EXAMPLE = '"0.7:prose=/data/books 0.3:code=/data/src"'
EXTRA_EXAMPLE = '"wiki=/data/wiki.txt news=/data/news/"'


@dataclass(frozen=True)
class Member:
    name: str
    weight: float  # normalized: the members' weights sum to 1
    data: PreparedData


@dataclass(frozen=True)
class PreparedMix:
    members: tuple[Member, ...]
    extras: tuple[tuple[str, PreparedData], ...] = ()
    named: bool = True  # validation sets named after the sources (DATA_MIX); else the one split is "val"
    path: Path | None = None  # the cache folder holding the parts

    @property
    def tokenizer(self) -> Tokenizer:
        return self.members[0].data.tokenizer

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def weights(self) -> list[float]:
        return [m.weight for m in self.members]

    @property
    def manifest(self) -> dict:
        """Totals over the training sources (what `kbuild data` and the summary read)."""
        ms = [m.data.manifest for m in self.members]
        return {"train_tokens": sum(m["train_tokens"] for m in ms), "val_tokens": sum(m["val_tokens"] for m in ms),
                "tokenizer": ms[0]["tokenizer"],
                # the weighted mean of each source's unigram entropy: the baseline of the weighted val_loss
                "unigram_entropy_nats": sum(m.weight * m.data.manifest["unigram_entropy_nats"] for m in self.members),
                "sha256": {m.name: m.data.manifest["sha256"] for m in self.members}}

    def train_batches(self, split: str, batch_size: int, block_size: int, device: torch.device,
                      seed: int) -> MixedBatches:
        parts = [Batches(m.data, split, batch_size, block_size, device, seed) for m in self.members]
        return MixedBatches(parts, self.weights, seed)

    def val_batches(self, batch_size: int, block_size: int, device: torch.device, seed: int) -> dict[str, Batches]:
        """Every named validation set: each source's held-out split, then the DATA_VAL_EXTRA sets."""
        names = self.names if self.named else ["val"]
        sets = {name: Batches(m.data, "val", batch_size, block_size, device, seed)
                for name, m in zip(names, self.members)}
        sets.update((name, Batches(data, "val", batch_size, block_size, device, seed)) for name, data in self.extras)
        return sets

    def val_tokens_per_byte(self) -> dict[str, float | None]:
        """Each validation set's tokens over the UTF-8 bytes of the same text (None for a set without text):
        a loss in nats per token times this, over ln 2, is in bits per byte, which no tokenizer changes."""
        names = self.names if self.named else ["val"]
        sets = [(name, m.data) for name, m in zip(names, self.members)] + list(self.extras)
        return {name: data.manifest["val_tokens"] / data.val_bytes if data.val_bytes else None
                for name, data in sets}

    def aggregate(self, losses: dict[str, float]) -> float:
        """val_loss: the sources' held-out losses weighted as in DATA_MIX (or the single "val" loss)."""
        if not self.named:
            return losses["val"]
        return sum(m.weight * losses[m.name] for m in self.members)

    def summary(self) -> dict:
        """The summary's "data" entry; unchanged in form for a single source."""
        first = self.members[0].data
        if len(self.members) == 1 and not self.extras and not self.named:
            return {"path": str(first.path), "sha256": first.manifest["sha256"],
                    "tokenizer_sha256": first.manifest["tokenizer"]["sha256"]}
        return {"path": str(self.path), "tokenizer_sha256": first.manifest["tokenizer"]["sha256"],
                "sources": {m.name: {"path": str(m.data.path), "weight": m.weight, "sha256": m.data.manifest["sha256"]}
                            for m in self.members},
                "val_extra": {name: {"path": str(d.path), "sha256": d.manifest["sha256"]} for name, d in self.extras}}


def as_mix(data) -> PreparedMix:
    """``data`` as a mix: a PreparedMix as is; a PreparedData as one source whose validation set is "val"."""
    if isinstance(data, PreparedMix):
        return data
    return PreparedMix((Member(data.manifest["source"]["label"], 1.0, data),), (), False, data.path.parent)


def _entries(text: str, symbol: str, fmt: str, example: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as e:
        raise DataError(f"CONFIG_{symbol}={text!r}: {e}; write space-separated {fmt} entries, e.g. {example}") from None


def parse_mix(text: str) -> list[tuple[float, str, str]]:
    """DATA_MIX entries as (weight, name, path); the weights are not yet normalized."""
    out, seen = [], set()
    for entry in _entries(text, "DATA_MIX", "WEIGHT:NAME=PATH", MIX_EXAMPLE):
        def bad(what: str):
            return DataError(f"CONFIG_DATA_MIX: entry {entry!r}: {what}; write space-separated WEIGHT:NAME=PATH "
                             f"entries (WEIGHT a positive number), e.g. {MIX_EXAMPLE}")
        weight_text, colon, rest = entry.partition(":")
        if not colon:
            raise bad("no WEIGHT: before NAME=PATH")
        try:
            weight = float(weight_text)
        except ValueError:
            raise bad(f"weight {weight_text!r} is not a number") from None
        if not math.isfinite(weight) or weight <= 0:
            raise bad(f"weight {weight_text!r} must be a positive number")
        name, path = _name_path(entry, rest, bad, seen)
        out.append((weight, name, path))
    if not out:
        raise DataError(f"CONFIG_DATA_MIX: no entries; write WEIGHT:NAME=PATH entries, e.g. {MIX_EXAMPLE}")
    return out


def parse_val_extra(text: str, taken: set[str]) -> list[tuple[str, str]]:
    """DATA_VAL_EXTRA entries as (name, path); names must differ from ``taken`` (the other validation sets)."""
    out, seen = [], set(taken)
    for entry in _entries(text, "DATA_VAL_EXTRA", "NAME=PATH", EXTRA_EXAMPLE):
        def bad(what: str):
            return DataError(f"CONFIG_DATA_VAL_EXTRA: entry {entry!r}: {what}; write space-separated NAME=PATH "
                             f"entries, e.g. {EXTRA_EXAMPLE}")
        out.append(_name_path(entry, entry, bad, seen))
    return out


def _name_path(entry: str, text: str, bad, seen: set[str]) -> tuple[str, str]:
    name, eq, path = text.partition("=")
    if not eq or not name:
        raise bad("no NAME= before the path")
    if not _NAME.fullmatch(name):
        raise bad(f"name {name!r} may only hold letters, digits, '-' and '_'")
    if name in seen:
        raise bad(f"name {name!r} is used twice (validation sets and sources need distinct names)")
    if not path:
        raise bad(f"no PATH after {name}=")
    seen.add(name)
    return name, path


def prepare_mix(cfg, root: Path, log=print) -> PreparedMix:
    """Prepare DATA_MIX's sources (or the single configured source) and the DATA_VAL_EXTRA sets."""
    opts = ReadOptions.from_config(cfg)
    cache = rooted(cfg.DATA_CACHE_DIR, root)
    if cfg.DATA_MIX:
        entries = parse_mix(cfg.DATA_MIX)
        total = sum(w for w, _, _ in entries)
        sources = [(local_source(rooted(path, root), opts, label=name, description=f"DATA_MIX source {name} ({path})",
                                 where=f"CONFIG_DATA_MIX: entry {name}={path}"), w / total)
                   for w, name, path in entries]
        names = [name for _, name, _ in entries]
    else:
        source = source_for(cfg, root)
        sources, names = [(source, 1.0)], [source.label]
    named = bool(cfg.DATA_MIX)
    extra_entries = parse_val_extra(cfg.DATA_VAL_EXTRA, set(names) if named else {"val"})
    extra_sources = [local_source(rooted(path, root), opts, label=name, description=f"validation set {name} ({path})",
                                  where=f"CONFIG_DATA_VAL_EXTRA: entry {name}={path}") for name, path in extra_entries]
    if not named and tokenizer_settings(cfg)["kind"] != "char":  # the single source's own tokenizer covers any text
        tok, shared = configured_tokenizer(cfg, sources[0][0], cache, log), False
    else:
        tok, shared = mix_tokenizer(cfg, sources, extra_sources, cache, log), True
    members = tuple(Member(name, w, prepare_source(cfg, root, s, tok, log, shared=shared))
                    for name, (s, w) in zip(names, sources))
    extras = tuple((name, prepare_source(cfg, root, s, tok, log, shared=True, val_fraction=1.0))
                   for (name, _), s in zip(extra_entries, extra_sources))
    if named:
        log("data: mix " + ", ".join(f"{m.name} {m.weight:.3f}" for m in members))
    return PreparedMix(members, extras, named, cache)
