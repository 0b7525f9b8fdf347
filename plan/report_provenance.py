"""The report's Provenance section: for each run, the attempts that made its result (machine, software,
code, data), and what differs between the runs (plan/provenance.py reads and compares them)."""

from __future__ import annotations

from plan.provenance import contributing, differing


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def describe_device(device: dict | None) -> str:
    """``2× NVIDIA H100 80GB HBM3`` or ``CPU Intel(R) Xeon(R) (16 CPUs)``."""
    device = device or {}
    if device.get("gpu"):
        return f"{device.get('gpu_count') or '?'}× {device['gpu']}"
    return f"CPU {device.get('cpu') or 'unknown'} ({device.get('cpu_count') or '?'} CPUs)"


def describe(attempt: dict) -> str:
    """One attempt in a line: commit (clean/dirty), versions, device, host."""
    git, v = attempt.get("git") or {}, attempt.get("versions") or {}
    if git.get("commit"):
        tree = {True: "dirty", False: "clean"}.get(git.get("dirty"), "tree state unknown")
        if git.get("changes"):
            tree += f", changes {git['changes']}"
        commit = f"commit {git['commit'][:12]} ({tree})"
    else:
        commit = f"no git commit ({git.get('reason') or 'unknown why'})"
    cuda = ", ".join(f"{k} {v[key]}" for k, key in (("CUDA", "cuda"), ("cuDNN", "cudnn"), ("NCCL", "nccl"))
                     if v.get(key))
    torch = f"torch {v.get('torch') or 'none'}" + (f" ({cuda})" if cuda else "")
    return (f"{commit}, Python {v.get('python') or '?'}, {torch}, device {describe_device(attempt.get('device'))}, "
            f"host {attempt.get('hostname') or '?'}")


def _values_by_run(by_value: dict, field: str) -> str:
    def value(v):
        return v[:12] if field == "commit" and isinstance(v, str) else _show(v)
    return "; ".join(f"`{value(v)}` ({', '.join(names)})" for v, names in by_value.items())


def format_provenance(rows: list[dict]) -> list[str]:
    """The Provenance section: one line when every run ran on the same commit, tree, versions, device
    and host (latest attempt of each); else each field that differs with which runs have which value.
    Runs whose own attempts differ (those its outputs come from: since its last fresh start), SET
    differences (information) and runs without a record follow."""
    latest = {r["name"]: r["provenance"][-1] for r in rows if r["provenance"]}
    lines = ["## Provenance", ""]
    if not latest:
        return lines + ["No run has a provenance.json (a plan from before provenance was recorded, or no run "
                        "has started)."]
    if len(latest) == 1 or not (diffs := differing(latest)):
        name = next(iter(latest))
        lines.append(f"{'All ' + str(len(latest)) + ' runs' if len(latest) > 1 else f'Run `{name}`'}: "
                     f"{describe(latest[name])}.")
    else:
        lines.append(f"**The runs differ in {len(diffs)} provenance field{'s' if len(diffs) > 1 else ''}** "
                     f"(latest attempt of each run); their differences are not only the configuration:")
        lines += [f"- {field}: {_values_by_run(by_value, field)}" for field, by_value in diffs.items()]
    for row in rows:  # a run resumed on another commit, tree or machine
        every = row["provenance"] or []
        attempts = contributing(every)
        first = len(every) - len(attempts) + 1  # numbered as in provenance.json
        diffs = differing({f"attempt {first + i}": a for i, a in enumerate(attempts)}) if len(attempts) > 1 else {}
        if diffs:
            lines.append(f"- **run `{row['name']}`: its {len(attempts)} attempts differ** in "
                         + "; ".join(f"{field}: {_values_by_run(values, field)}" for field, values in diffs.items()))
    sets = {name: a.get("set") or "" for name, a in latest.items()}
    if len(set(sets.values())) > 1:
        by_set: dict = {}
        for name, value in sets.items():
            by_set.setdefault(value or "(none)", []).append(name)
        lines.append("- SET differs (information: overrides may differ legitimately): "
                     + "; ".join(f"`{v}` ({', '.join(n)})" for v, n in by_set.items()))
    missing = [r["name"] for r in rows if not r["provenance"] and r["status"] not in ("pending", "rejected")]
    if missing:
        lines.append(f"- No provenance.json (started by a runner that did not record it): "
                     f"{', '.join(f'`{n}`' for n in missing)}.")
    return lines
