"""plan/provenance.py: git state of real repositories, versions, devices, provenance.json history."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plan import provenance
from plan.provenance import (PROVENANCE_FILE, collect, comparable, contributing, devices, differing, git_state,
                             load_attempts, record_attempt, versions)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git repository with one commit of train.py."""
    d = tmp_path / "tree"
    d.mkdir()
    git(d, "init", "-q")
    git(d, "config", "user.email", "t@example.com")
    git(d, "config", "user.name", "t")
    (d / "train.py").write_text("lr = 1e-3\n")
    git(d, "add", "train.py")
    git(d, "commit", "-q", "-m", "one")
    return d


@pytest.fixture
def no_outer_repo(tmp_path, monkeypatch):
    """git must not find a repository above tmp_path (a checkout that holds the temp folder)."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))


def test_git_clean_then_dirty(repo, no_outer_repo):
    state = git_state(repo)
    assert state == {"commit": git(repo, "rev-parse", "HEAD"), "dirty": False, "changes": None}
    assert len(state["commit"]) == 40
    # What training writes into the tree (runs/, .cache/) does not make it dirty.
    for sub in ("runs/plan-1/base", ".cache/data"):
        (repo / sub).mkdir(parents=True)
        (repo / sub / "x.bin").write_bytes(b"\0")
    assert git_state(repo)["dirty"] is False
    (repo / "train.py").write_text("lr = 3e-4\n")
    edited = git_state(repo)
    assert edited["dirty"] is True and edited["commit"] == state["commit"]
    assert len(edited["changes"]) == 12
    (repo / "train.py").write_text("lr = 1e-2\n")  # another edit of the same file: another hash
    assert git_state(repo)["changes"] != edited["changes"]
    (repo / "train.py").write_text("lr = 1e-3\n")
    (repo / "notes.txt").write_text("new file\n")  # untracked files count as dirty too
    assert git_state(repo)["dirty"] is True
    # A new commit is recorded as such.
    git(repo, "add", "notes.txt")
    git(repo, "commit", "-q", "-m", "two")
    after = git_state(repo)
    assert after["commit"] == git(repo, "rev-parse", "HEAD") != state["commit"] and after["dirty"] is False


def test_not_a_repository(tmp_path, no_outer_repo):
    d = tmp_path / "plain"
    d.mkdir()
    state = git_state(d)
    assert state["commit"] is None and state["dirty"] is None
    assert "not a git repository" in state["reason"]
    # A repository without a commit yet: no commit, but the tree state is known.
    git(d, "init", "-q")
    (d / "a.py").write_text("x = 1\n")
    state = git_state(d)
    assert state["commit"] is None and state["dirty"] is True and "rev-parse" in state["reason"]


def test_git_missing_or_hanging(tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    state = git_state(tmp_path)
    assert state["commit"] is None and state["dirty"] is None and state["reason"] == "git is not installed"
    hang = empty / "git"
    hang.write_text(f"#!{sys.executable}\nimport time; time.sleep(30)\n")
    hang.chmod(0o755)
    monkeypatch.setattr(provenance, "GIT_TIMEOUT_S", 0.3)
    state = git_state(tmp_path)
    assert state["commit"] is None and state["dirty"] is None
    assert state["reason"] == "git rev-parse took more than 0.3s; git status took more than 0.3s"


def test_versions(monkeypatch):
    monkeypatch.setattr(provenance, "PACKAGES", ("kconfiglib", "numpy", "no-such-package-xyz"))
    v = versions()
    assert v["python"] == platform.python_version() and v["torch"] == torch.__version__
    assert v["cuda"] == torch.version.cuda
    assert v["kconfiglib"] == importlib.metadata.version("kconfiglib")
    assert v["numpy"] == importlib.metadata.version("numpy")
    assert "no-such-package-xyz" not in v
    if not torch.cuda.is_available():
        assert v["nccl"] is None


def test_devices_cpu(monkeypatch):
    def no_cuda(*a):
        raise AssertionError("CUDA must not be touched when it is not available")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", no_cuda)
    monkeypatch.setattr(torch.cuda, "device_count", no_cuda)
    d = devices()
    assert d["gpu"] is None and d["gpu_count"] == 0 and d["cpu_count"] == os.cpu_count()
    assert isinstance(d["cpu"], str) and d["cpu"]


def test_devices_gpus_of_the_run(monkeypatch):
    names = ["NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: names[i])
    every = devices()
    assert every["gpu"] == "NVIDIA A100-SXM4-80GB, NVIDIA H100 80GB HBM3" and every["gpu_count"] == 3
    assert devices("2") == {**every, "gpu": "NVIDIA H100 80GB HBM3", "gpu_count": 1}
    assert devices("0,1") == {**every, "gpu": "NVIDIA A100-SXM4-80GB", "gpu_count": 2}


def test_record_attempt_keeps_history(repo, no_outer_repo, tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "p" / "base"
    run_dir.mkdir(parents=True)
    monkeypatch.setenv("SET", "LR=1e-3 SEED=2")
    first = record_attempt(run_dir, "LR=1e-3 SEED=2", root=repo)
    assert first["git"]["commit"] == git(repo, "rev-parse", "HEAD") and first["git"]["dirty"] is False
    assert first["command"] == {"argv": sys.orig_argv, "SET": "LR=1e-3 SEED=2"} and first["set"] == "LR=1e-3 SEED=2"
    assert first["hostname"] and first["time"][:2] == "20"
    (repo / "train.py").write_text("lr = 3e-4\n")  # resumed after an edit
    monkeypatch.delenv("SET")
    second = record_attempt(run_dir, "", root=repo, resumed=True)
    data = json.loads((run_dir / PROVENANCE_FILE).read_text())
    assert list(data) == ["attempts"] and data["attempts"] == [first, second] == load_attempts(run_dir)
    assert second["git"]["dirty"] is True and second["command"]["SET"] is None
    assert first["resumed"] is None and second["resumed"] is True
    assert [p.name for p in run_dir.iterdir()] == [PROVENANCE_FILE]  # atomic: no temporary left
    assert differing({"1": first, "2": second}) == {"dirty": {False: ["1"], True: ["2"]},
                                                    "changes": {None: ["1"], second["git"]["changes"]: ["2"]}}


def test_contributing_attempts():
    a = [{"n": 1, "resumed": None}, {"n": 2, "resumed": False}, {"n": 3, "resumed": True}, {"n": 4, "resumed": True}]
    assert [x["n"] for x in contributing(a)] == [2, 3, 4]
    assert [x["n"] for x in contributing(a + [{"n": 5, "resumed": False}])] == [5]
    assert [x["n"] for x in contributing([{"n": 1}, {"n": 2, "resumed": True}])] == [1, 2]  # not recorded: all


def test_unreadable_file_is_replaced(tmp_path, no_outer_repo):
    (tmp_path / PROVENANCE_FILE).write_text('{"attempts": [{"time"')
    assert load_attempts(tmp_path) is None
    attempt = record_attempt(tmp_path, "", root=tmp_path)
    assert "unreadable" in attempt["note"] and load_attempts(tmp_path) == [attempt]
    assert attempt["git"]["commit"] is None and "not a git repository" in attempt["git"]["reason"]


def test_comparable_leaves_out_time_command_and_set(tmp_path, no_outer_repo):
    a = {"time": "2026-01-01T00:00:00", **collect("LR=1", root=tmp_path)}
    b = {**a, "time": "2026-01-02T00:00:00", "set": "LR=2", "command": {"argv": ["other"], "SET": "LR=2"}}
    assert comparable(a) == comparable(b) and differing({"a": a, "b": b}) == {}
    fields = list(comparable(a))
    assert fields[:8] == ["commit", "dirty", "changes", "python", "torch", "cuda", "cudnn", "nccl"]
    assert fields[-5:] == ["gpu", "gpu_count", "cpu", "cpu_count", "hostname"]
    c = {**a, "versions": {**a["versions"], "torch": "9.9.9"}, "hostname": "other-host"}
    assert differing({"a": a, "b": b, "c": c}) == {"torch": {a["versions"]["torch"]: ["a", "b"], "9.9.9": ["c"]},
                                                  "hostname": {a["hostname"]: ["a", "b"], "other-host": ["c"]}}
