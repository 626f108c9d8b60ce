"""The Makefile's install step where torch is already there (a GPU box, a cluster image): nothing downloaded."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NO_REGISTRY = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": "", "PIP_INDEX_URL": "http://127.0.0.1:9/"}


def make_install(folder, **env):
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, folder)
    return subprocess.run(["make", "install", f"PYTHON={sys.executable}"], cwd=folder, capture_output=True, text=True,
                          env={**os.environ, **NO_REGISTRY, **env}, timeout=120)


def dependencies():
    """The import names of the Makefile's DEPS (`module:package` pairs)."""
    deps = re.search(r"^DEPS := (.*?[^\\])$", (ROOT / "Makefile").read_text(), re.M | re.S).group(1)
    return [dep.split(":")[0] for dep in deps.replace("\\\n", " ").split()]


def stand_ins(folder, missing=None):
    """A module for each of the Makefile's DEPS on a PYTHONPATH of its own, `missing` raising ImportError as if
    absent: the check sees that Python, and importing the real ones would take seconds."""
    for module in dependencies():
        path = folder.joinpath(*module.split("."), "__init__.py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("raise ImportError('not installed')\n" if module == missing else "__version__ = '2.13.0'\n")
    return str(folder)


def test_the_check_looks_for_the_modules_the_packages_install():
    missing = [module for module in dependencies() if importlib.util.find_spec(module) is None]
    assert not missing, f"the Makefile's DEPS name modules that this environment, which has them all, lacks: {missing}"
    assert {"torch", "nvidia.dali", "xdist", "PIL"} <= set(dependencies())


def test_a_python_with_torch_and_everything_else_installs_nothing(tmp_path):
    r = make_install(tmp_path, PYTHONPATH=stand_ins(tmp_path / "modules"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "every dependency is there: nothing to install" in r.stdout and "(torch 2.13.0)" in r.stdout
    assert not (tmp_path / ".venv").exists() and (tmp_path / ".deps-checked").exists()


def test_a_python_with_torch_but_a_missing_dependency_asks_pip_for_that_one_only(tmp_path):
    r = make_install(tmp_path, PYTHONPATH=stand_ins(tmp_path / "modules", missing="torchsummary"))
    assert "using " in r.stdout and "(torch 2.13.0)" in r.stdout, r.stdout
    assert "installing what it lacks: torchsummary\n" in r.stdout, r.stdout  # that one, and nothing else


@pytest.mark.long
def test_train_with_seeds_runs_once_per_seed_then_prints_the_results_of_the_folder_they_went_to(tmp_path):
    """`make train SEEDS=...` in the checkout itself (-o: no reinstall here), two 1-step runs; their folder named
    both ways, RUNS and --runs in ARGS, which wins as it does for train.py: the results are read there."""
    (tmp_path / "other").mkdir()
    r = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "-o", ".deps-checked", "train",
                        f"PYTHON={sys.executable}", 'SEEDS=0 1', f"RUNS={tmp_path / 'other'}",
                        f"ARGS=--smoke --limit-train 8 --batch-size 8 --limit-test 8 --runs {tmp_path / 'runs'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    seeds = sorted(json.loads(p.read_text())["config"]["seed"] for p in (tmp_path / "runs").glob("*/summary.json"))
    assert seeds == [0, 1] and r.stdout.count("done: ") == 2 and not list((tmp_path / "other").iterdir())
    assert f"2 finished runs under {tmp_path / 'runs'}, in 1 group of settings" in r.stdout and "| 2 |" in r.stdout

