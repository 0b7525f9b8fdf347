"""Runs that differ only by their seed, taken together: one group each, drawn as one curve (mean and a
± one standard deviation band) and summarised as mean ± std over the seeds.

plan.json records what each run changes from the base (``differences``). Runs whose differences are
equal once CONFIG_SEED is left out, in the same plan and chain stage, are one group, provided their
seeds are distinct (two runs with equal seeds too are repeats of one configuration, not seeds: they
stay apart). The run that leaves SEED at the base's value records no SEED at all; it is one seed of
its group like the others.

Standard deviations are the sample's (n - 1 in the denominator), None for fewer than two values.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

SEED = "SEED"
# the "-seed1338" part run_name() gives a matrix run of CONFIG_MATRIX_SEEDS (also a leading "seed7")
SEED_PART = re.compile(r"(^|-)seed\d+(?=-|$)")


def finite(value) -> float | None:
    """A finite number, or None (missing, null, NaN, bool or text)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


@dataclass(frozen=True)
class Stat:
    """A metric over a group's runs that have it: mean, sample standard deviation (None below 2), the values."""
    mean: float
    std: float | None
    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)


def stat(values) -> Stat | None:
    """Mean and sample standard deviation of the finite values; None when there is none."""
    values = tuple(v for v in values if finite(v) is not None)
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return Stat(mean, std, values)


def difference(a: Stat, base: Stat) -> tuple[float, float | None]:
    """``a`` less ``base``: the difference of the means, and its standard error sqrt(s_a²/n_a + s_b²/n_b)
    when both have at least two values (else None: one run says nothing about its spread)."""
    delta = a.mean - base.mean
    if a.std is None or base.std is None:
        return delta, None
    return delta, math.sqrt(a.std ** 2 / a.n + base.std ** 2 / base.n)


@dataclass(frozen=True)
class SeedGroup:
    """Report rows (plan order) that differ only by seed; one row is a group of one."""
    label: str
    rows: tuple
    baseline: bool

    @property
    def n(self) -> int:
        return len(self.rows)

    def seeds(self) -> list[str]:
        """Each run's seed as plan.json records it ("base" for a run that keeps the base's SEED)."""
        return [str(row["differences"].get(SEED, "base")) for row in self.rows]

    def summary_stat(self, key: str) -> Stat | None:
        """A summary.json number over the group's runs that have it."""
        return stat(finite(row["summary"].get(key)) for row in self.rows)


def group_key(row: dict) -> tuple:
    """What a run is apart from its seed: its plan, chain stage and differences less SEED."""
    rest = tuple(sorted((symbol, repr(value)) for symbol, value in row["differences"].items() if symbol != SEED))
    return row.get("plan"), row["stage"], rest


def seed_label(row: dict) -> str:
    """A group's name: its first run's name less the seed part (``lr1e-3-seed1338`` → ``lr1e-3``); a run
    whose name is only its seed is the base configuration's (``base``)."""
    name = SEED_PART.sub("", row["name"].rsplit("/", 1)[-1]).strip("-") or "base"
    prefix = row["name"].rsplit("/", 1)[0] + "/" if "/" in row["name"] else ""
    return prefix + name


def group_runs(rows: list[dict]) -> list[SeedGroup]:
    """The plan's runs as seed groups, in the order of each group's first run. A group is the baseline
    when one of its runs is (or, in a plan without a baseline run, when it differs from the base only by
    seed, as a seeded matrix's base cell does)."""
    order = {id(row): i for i, row in enumerate(rows)}
    keyed: dict[tuple, list[dict]] = {}
    for row in rows:
        keyed.setdefault(group_key(row), []).append(row)
    flagged = any(row["baseline"] for row in rows)
    groups: list[tuple[int, SeedGroup]] = []
    for key, members in keyed.items():
        seeds = [row["differences"].get(SEED) for row in members]
        parts = [members] if len(members) > 1 and len(set(map(repr, seeds))) == len(seeds) else [[m] for m in members]
        for part in parts:
            label = seed_label(part[0]) if len(part) > 1 else part[0]["name"]
            base = any(r["baseline"] for r in part) if flagged else (key[1:] == (None, ()) and len(parts) == 1)
            groups.append((order[id(part[0])], SeedGroup(label, tuple(part), base)))
    return [group for _, group in sorted(groups, key=lambda pair: pair[0])]


def baseline_group(groups: list[SeedGroup]) -> SeedGroup | None:
    """The first baseline group (a report across plans compares with the first plan's baseline)."""
    return next((g for g in groups if g.baseline), None)
