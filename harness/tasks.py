"""Finding EVAL_TASKS: local YAML task files in EVAL_TASKS_DIR first, then lm-eval's own registry.

A local task's relative ``data_files`` (dataset_path: json, csv, parquet or text) are taken from its
YAML file's folder, so a task folder works from any working directory. A registry task needs its
Hugging Face dataset; when it cannot be loaded (offline, not in the datasets cache) the error names
the dataset and how to provide it, instead of lm-eval's traceback.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from harness.errors import EvalError

LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}  # datasets' packaged builders: read local files


def task_names(text: str) -> list[str]:
    """EVAL_TASKS as a list: names separated by spaces or commas, duplicates dropped, order kept."""
    return list(dict.fromkeys(name for name in re.split(r"[\s,]+", text) if name))


def task_specs(names: list[str], tasks_dir: Path) -> tuple[list, object]:
    """(lm-eval task specs, the TaskManager that builds them) for EVAL_TASKS: a local task as its YAML
    config with data_files made absolute, a registry task by name."""
    from lm_eval.tasks import TaskManager

    if not tasks_dir.is_dir():
        raise EvalError(f"CONFIG_EVAL_TASKS_DIR: {tasks_dir} is not a folder; point it at a folder of lm-eval "
                        "task YAML files (the repository ships evaluation/tasks)")
    local = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    specs, registry = [], []
    for name in names:
        entry = local.task_index.get(name)
        if entry is not None and entry.yaml_path is not None and entry.kind.name == "TASK":
            specs.append(local_config(Path(entry.yaml_path)))
        elif entry is not None:  # a local group or tag: built by name, its members' paths as written
            specs.append(name)
        else:
            registry.append(name)
    if not registry:
        return specs, local
    manager = TaskManager(include_path=str(tasks_dir))  # indexing lm-eval's own tasks takes a few seconds
    known = set(manager.all_tasks)
    for name in registry:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=4, cutoff=0.6)
            raise EvalError(f"CONFIG_EVAL_TASKS: no task {name!r} in {tasks_dir} or lm-eval's registry"
                            + (f" (close: {', '.join(close)})" if close else "")
                            + "; 'lm_eval ls tasks' lists the registry, docs/evaluation.md shows a local task file")
        specs.append(name)
    return specs, manager


def local_config(yaml_path: Path) -> dict:
    """A local task's YAML (includes and !function resolved, as lm-eval reads it), relative data_files
    taken from the YAML's own folder."""
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own reader (its public API builds by name only)

    config = load_yaml(yaml_path, resolve_func=True)
    kwargs = dict(config.get("dataset_kwargs") or {})
    if "data_files" in kwargs and config.get("dataset_path") in LOCAL_BUILDERS:
        kwargs["data_files"] = _rooted(kwargs["data_files"], yaml_path.parent)
        for files in _flat(kwargs["data_files"]):
            if not Path(files).is_file():
                raise EvalError(f"{yaml_path}: dataset_kwargs.data_files names {files}, which does not exist")
        config["dataset_kwargs"] = kwargs
    return config


def _rooted(files, folder: Path):
    if isinstance(files, dict):
        return {split: _rooted(f, folder) for split, f in files.items()}
    if isinstance(files, list):
        return [_rooted(f, folder) for f in files]
    return str(folder / files) if not Path(files).is_absolute() else files


def _flat(files) -> list[str]:
    if isinstance(files, dict):
        return [f for v in files.values() for f in _flat(v)]
    return [f for v in files for f in _flat(v)] if isinstance(files, list) else [files]


def build_tasks(specs: list, manager) -> dict:
    """{task name: lm-eval Task} for the specs, built one at a time so a dataset that cannot be loaded is named."""
    tasks = {}
    for spec in specs:
        try:
            tasks |= manager.load([spec])["tasks"]
        except EvalError:
            raise
        except Exception as e:  # datasets raises many kinds (ConnectionError, DatasetNotFoundError, OSError...)
            raise dataset_error(spec, manager, e) from e
    return tasks


def dataset_error(spec, manager, error: Exception) -> EvalError:
    """The named error for a task whose dataset could not be loaded."""
    name = spec["task"] if isinstance(spec, dict) else spec
    config = spec if isinstance(spec, dict) else _registry_config(name, manager)
    path, subset = config.get("dataset_path"), config.get("dataset_name")
    dataset = f"{path}" + (f" ({subset})" if subset else "")
    fetch = f"datasets.load_dataset({path!r}" + (f", {subset!r}" if subset else "") + ")"
    return EvalError(f"CONFIG_EVAL_TASKS: task {name!r} could not load its dataset {dataset}: "
                     f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. Offline, the "
                     f"dataset must be in the Hugging Face datasets cache: on a machine with internet run "
                     f"python -c \"import datasets; {fetch}\" and copy its cache (~/.cache/huggingface, or "
                     "HF_DATASETS_CACHE / HF_HOME) here; or write the task as local JSONL in CONFIG_EVAL_TASKS_DIR")


def _registry_config(name: str, manager) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        return {}
    return load_yaml(entry.yaml_path, resolve_func=False)
