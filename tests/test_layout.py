"""The three floors: data and model at the bottom, the engine above them, the entry points on top.

Nothing imports upward, nothing imports the train.py script, and the bench times the engine's
own functions rather than a copy."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each package, and the top-level packages it must not import.
BELOW = {"net": {"engine", "bench", "pipelines", "train"}, "pipelines": {"engine", "bench", "net", "train"},
         "engine": {"bench", "train"}, "bench": {"train"}}


def imported_packages(path):
    """The top-level names a file imports (relative imports stay in its own package)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("package", sorted(BELOW))
def test_nothing_imports_upward(package):
    for path in (ROOT / package).glob("*.py"):
        assert not set(imported_packages(path)) & BELOW[package], f"{path.relative_to(ROOT)} imports upward"


def test_nothing_imports_the_train_script():
    for path in [*ROOT.glob("*.py"), *ROOT.glob("[!.]*/**/*.py")]:
        if ".venv" not in path.parts:
            assert "train" not in set(imported_packages(path)), f"{path} imports train.py"


def loaded_on_import(module):
    """Every module that importing `module` loads, following the project's own files through their
    top-level imports (an import inside a function waits until it is called, so it is not followed)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # a module's packages load first
        if name in seen:
            continue
        seen.add(name)
        path = next((p for p in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py"))
                     if p.exists()), None)
        if path is None:  # not the project's: torch, numpy, nvidia.dali, ...
            continue
        package = parts if path.name == "__init__.py" else parts[:-1]
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join((package[:len(package) - node.level + 1] if node.level else [])
                                + ([node.module] if node.module else []))
                todo += [base] + [f"{base}.{a.name}" for a in node.names]  # an imported name may be a module
    return seen


@pytest.mark.parametrize("module", ["engine.config", "engine.run", "predict", "export"])
def test_the_configuration_and_the_scripts_that_only_read_one_load_no_dali(module):
    assert {"pipelines.dali", "nvidia.dali"} <= loaded_on_import("train")  # the walk sees DALI where it is loaded
    assert not {"pipelines.dali", "nvidia.dali"} & loaded_on_import(module), f"{module} loads DALI (most of a second)"


def test_every_module_says_what_it_is_for():
    for package in BELOW:
        for path in (ROOT / package).glob("*.py"):
            if path.name != "__main__.py":
                assert ast.get_docstring(ast.parse(path.read_text())), f"{path.relative_to(ROOT)} has no docstring"


def test_trainer_and_bench_run_the_same_train_epoch():
    import bench.model
    import engine.loop

    assert bench.model.train_epoch is engine.loop.train_epoch and bench.model.train_step is engine.loop.train_step
    tree = ast.parse((ROOT / "train.py").read_text())
    defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "engine.loop"
                for a in n.names}
    assert {"train_epoch", "evaluate"} <= imported and not {"train_epoch", "train_step", "evaluate"} & defined
