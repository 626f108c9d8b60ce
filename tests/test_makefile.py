"""The Makefile's install step where torch is already there (a GPU box, a cluster image): nothing downloaded."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_REGISTRY = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": "", "PIP_INDEX_URL": "http://127.0.0.1:9/"}


def make_install(folder, **env):
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, folder)
    return subprocess.run(["make", "install", f"PYTHON={sys.executable}"], cwd=folder, capture_output=True, text=True,
                          env={**os.environ, **NO_REGISTRY, **env}, timeout=120)


def test_a_python_with_torch_and_everything_else_installs_nothing(tmp_path):
    r = make_install(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "every dependency is there: nothing to install" in r.stdout and "using " in r.stdout
    assert not (tmp_path / ".venv").exists() and (tmp_path / ".deps-checked").exists()


def test_a_python_with_torch_but_a_missing_dependency_asks_pip_for_that_one_only(tmp_path):
    hidden = tmp_path / "hide"
    hidden.mkdir()
    (hidden / "torchsummary.py").write_text("raise ImportError('not installed')\n")  # as if it were absent
    r = make_install(tmp_path, PYTHONPATH=str(hidden))
    assert "installing what it lacks: torchsummary\n" in r.stdout, r.stdout  # that one, and nothing else
