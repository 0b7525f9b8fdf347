"""scripts/setup.mk: the torch index option (TORCH_INDEX) and reusing a complete virtualenv (VENV=...).

Nothing here installs anything: pip is replaced by a recorder (PIP=...), and the "existing virtualenv"
is a folder whose bin/python runs this interpreter, which has every package the tests need.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kconfig.tree import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import venv_complete  # noqa: E402  (scripts/ is not a package)


def _make(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """make without SKIP_SETUP, so the setup rules run as on a new user's machine."""
    env = {k: v for k, v in os.environ.items() if k not in ("SET", "SKIP_SETUP", "VENV", "PIP", "TORCH_INDEX")}
    return subprocess.run(["make", "--no-print-directory", f"PYTHON={sys.executable}", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120)


def _existing_venv(tmp_path: Path) -> Path:
    """A virtualenv made elsewhere: its python is this interpreter, no stamp files."""
    venv = tmp_path / "their-env"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return venv


def _recording_pip(tmp_path: Path) -> tuple[Path, Path]:
    """A pip that records its arguments, one call a line, and installs nothing."""
    log = tmp_path / "pip-calls.txt"
    pip = tmp_path / "pip"
    pip.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    pip.chmod(0o755)
    return pip, log


def _torch_install_line(repo: Path, *args: str) -> str:
    p = _make(repo, "-n", "VENV=/nonexistent/venv", "/nonexistent/venv/.installed-core", *args)
    assert p.returncode == 0, p.stderr
    (line,) = [x.strip() for x in p.stdout.splitlines() if "install --quiet" in x and "[core]" not in x]
    return line


def test_the_default_torch_install_is_todays_command(repo):
    """No TORCH_INDEX: pip's own configuration chooses (PyPI, or this machine's local wheels)."""
    assert _torch_install_line(repo) == '/nonexistent/venv/bin/pip install --quiet  "torch==2.13.0"; \\'


@pytest.mark.parametrize("index, url", [
    ("cpu", "https://download.pytorch.org/whl/cpu"),
    ("cu126", "https://download.pytorch.org/whl/cu126"),
    ("https://mirror.example/torch/simple", "https://mirror.example/torch/simple"),
])
def test_torch_index_picks_pytorchs_index_with_pypi_for_the_rest(repo, index, url):
    line = _torch_install_line(repo, f"TORCH_INDEX={index}")
    assert f"install --quiet --index-url {url} --extra-index-url https://pypi.org/simple \"torch==2.13.0\"" in line


@pytest.mark.slow
def test_a_complete_existing_virtualenv_is_reused_without_installing(repo, tmp_path):
    venv = _existing_venv(tmp_path)
    pip, log = _recording_pip(tmp_path)
    p = _make(repo, f"VENV={venv}", f"PIP={pip}", "setup")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "already has torch==2.13.0 and the core packages: nothing to install" in p.stdout
    assert (venv / ".installed-core").exists() and not log.exists(), "no pip install ran"
    p = _make(repo, f"VENV={venv}", f"PIP={pip}", f"{venv}/.installed-dev")
    assert p.returncode == 0 and "already has the dev packages" in p.stdout, p.stdout + p.stderr
    assert (venv / ".installed-dev").exists() and not log.exists()
    assert "Nothing to be done" in _make(repo, f"VENV={venv}", f"PIP={pip}", "setup").stdout


@pytest.mark.slow
def test_a_virtualenv_missing_a_requirement_is_installed_into(repo, tmp_path):
    venv = _existing_venv(tmp_path)
    pip, log = _recording_pip(tmp_path)
    p = _make(repo, f"VENV={venv}", f"PIP={pip}", "TORCH_SPEC=torch==1.0.0", "TORCH_INDEX=cpu", "setup")
    assert p.returncode == 0, p.stdout + p.stderr
    assert log.read_text().splitlines() == [
        "install --quiet --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple "
        "torch==1.0.0",
        "install --quiet .[core]",
    ]
    assert (venv / ".installed-core").exists()


def test_the_check_reads_the_extras_from_pyproject():
    reqs = venv_complete.requirements(["core"], ["torch==2.13.0"])
    assert reqs[-1] == "torch==2.13.0" and "kconfiglib>=14.1" in reqs and "torchao==0.18.0" in reqs
    assert not any(r.startswith("pytest") for r in reqs), "only the named extras"
    with pytest.raises(SystemExit, match="no extra 'cuda'"):
        venv_complete.requirements(["cuda"], [])
