"""The Makefile's install step where torch is already there (a GPU box, a cluster image): nothing downloaded; the
extras beside the torch it installs; the CUDA machine's package set, resolvable."""
import concurrent.futures
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
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
@pytest.mark.long  # two train.py processes through make
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



def make_says(expression, env=None, **variables):
    """What the Makefile's `expression` expands to and runs, with the given variables set on make's command line."""
    rule = f"say: ; @{expression}"
    r = subprocess.run(["make", "--no-print-directory", "--eval", rule, "say",
                        *(f"{k}={v}" for k, v in variables.items())], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_the_interpreters_triton_is_installed_only_where_torch_brought_none():
    assert make_says('$(PY) -c "$$TRITON_EXTRA"', PY=sys.executable) == "test"  # this environment has Triton
    assert make_says('$(PY) -c "$$TRITON_EXTRA"', PY=f"{sys.executable} -S") == "test,interpreter"  # no site-packages


def pip_resolves(*requirements):
    """(ok, what pip's dry run would install {name: version}, its complaint) for `requirements` resolved together
    from the registry's metadata: nothing is downloaded but the packages' metadata."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                            "--report", str(report), *requirements], capture_output=True, text=True, timeout=600)
        installs = json.loads(report.read_text())["install"] if report.exists() else []
    return r.returncode == 0, {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in installs}, r.stderr


@pytest.mark.slow  # the package registry: about 25 s of pip's resolving
def test_the_cuda_install_set_resolves_with_the_triton_its_torch_pins():
    """`make install` on a machine with an NVIDIA driver: torch as the Makefile names it there, then the project
    with the extras TRITON_EXTRA picks beside a torch that brings Triton, resolved together by pip's dry run for
    the torch the Makefile would pick and for the lent GPU's torch 2.11 (whose Triton is 3.6.0)."""
    with tempfile.TemporaryDirectory() as bin_dir:  # an nvidia-smi on PATH: the Makefile's CUDA branch
        Path(bin_dir, "nvidia-smi").write_text("#!/bin/sh\n")
        Path(bin_dir, "nvidia-smi").chmod(0o755)
        torch_words = make_says("echo $(TORCH)", env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}).split()
    assert torch_words == ["torch"]  # PyPI's default build: CUDA on Linux
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["test"]
    assert not any(r.startswith("triton") for r in requirements)  # nothing pinned against torch's own Triton
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two resolutions of ~20 s each, mostly waiting
        newest, gpu_box = pool.map(lambda torch: pip_resolves(torch, *requirements), (torch_words[0], "torch==2.11.0"))
    if not (newest[0] or gpu_box[0]) and subprocess.run([sys.executable, "-m", "pip", "index", "versions", "pip"],
                                                        capture_output=True).returncode != 0:
        pytest.skip("the package registry cannot be reached from here")
    for ok, installs, complaint in (newest, gpu_box):
        assert ok, complaint[-3000:]
        assert "triton" in installs, installs  # a CUDA torch brings its own
    assert gpu_box[1]["torch"] == "2.11.0" and gpu_box[1]["triton"] == "3.6.0"
    print(f"resolved: torch {newest[1]['torch']} with Triton {newest[1]['triton']}; torch 2.11.0 with Triton 3.6.0")
