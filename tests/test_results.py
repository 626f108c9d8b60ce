"""engine/results.py and results.py (`make results`): finished runs grouped by settings, mean ± std over seeds."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import Config, resolve
from engine.results import finished_runs, format_groups, group_runs

ROOT = Path(__file__).resolve().parents[1]


def write_run(runs, name, *, seed, final, best, reached=None, complete=True, **settings):
    """A run folder's summary.json as train.py writes it, with only what the results read."""
    cfg = resolve(Config(device="cpu", seed=seed, name=name, runs=str(runs), **settings)).__dict__
    (runs / name).mkdir(parents=True)
    (runs / name / "summary.json").write_text(json.dumps({
        "config": cfg, "device": "cpu", "train_images": 50_000, "complete": complete, "final_acc": final,
        "best_acc": best, "target_acc": 0.85, "epoch_to_target": reached and reached[0],
        "wall_s_to_target": reached and reached[1]}))


@pytest.fixture
def runs(tmp_path):
    for seed, (final, best, reached) in enumerate([(0.84, 0.86, (12, 400.0)), (0.85, 0.87, (11, 380.0)),
                                                    (0.83, 0.84, None)]):
        write_run(tmp_path, f"fast-{seed}", seed=seed, final=final, best=best, reached=reached,
                  tta=seed == 1)  # a flip-TTA report beside the result changes nothing the run trained
    write_run(tmp_path, "seed-0", seed=0, final=0.80, best=0.81, recipe="seed")
    write_run(tmp_path, "cut-short", seed=9, final=0.1, best=0.1, complete=False)  # stopped: not a result
    return tmp_path


def test_runs_that_differ_only_in_their_seed_form_one_group(runs):
    groups = {g["settings"]["recipe"]: g for g in group_runs(finished_runs(runs))}
    fast = groups["fast"]
    assert fast["n"] == 3 and sorted(fast["seeds"]) == [0, 1, 2]
    assert fast["final"] == pytest.approx((0.84, statistics.stdev([0.84, 0.85, 0.83])))
    assert fast["best"][0] == pytest.approx(0.8566666, abs=1e-6)
    assert fast["reached"] == 2 and fast["epochs_to_target"] == (11.5, pytest.approx(0.7071, abs=1e-4))
    assert fast["seconds_to_target"][0] == 390.0
    assert groups["seed"]["n"] == 1 and groups["seed"]["final"] == (0.80, None)  # one run: no spread to show
    table = format_groups(group_runs(finished_runs(runs)))
    assert "| 3 | 84.00% ± 1.00% |" in table and "2 of 3 (85%)" in table and "11.5 ± 0.7" in table
    assert "| 1 | 80.00% " in table


def test_results_script_prints_the_groups_and_says_when_there_are_none(runs, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "results.py"), runs], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "4 finished runs under" in r.stdout and "in 2 groups of settings" in r.stdout
    assert r.stdout.count("| fast, cpu,") == 1 and r.stdout.count("| seed, cpu,") == 1
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, str(ROOT / "results.py"), tmp_path / "empty"], capture_output=True, text=True)
    assert r.returncode == 0 and "no finished runs" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "results.py"), tmp_path / "none"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is not a folder of runs" in r.stderr


def test_as_trained_reads_the_folder_from_train_py_flags(runs, capsys):
    from results import main

    assert main(["--as-trained", "--smoke", "--runs", str(runs), "--seed", "3"]) == 0
    assert f"4 finished runs under {runs}," in capsys.readouterr().out
    assert main(["--as-trained", "--resume", str(runs / "fast-0")]) == 0  # a resumed run's folder: its parent
    assert f"4 finished runs under {runs}," in capsys.readouterr().out
