"""bench/sweep.py (`make sweep`): a plan read and checked before anything runs, its runs in seed order, a
budget that cuts the sweep, the same command resuming it, and the ranked table."""
import json
import time
from pathlib import Path

import pytest

from bench import sweep

ROOT = Path(__file__).resolve().parents[1]
# 2 steps of 8 images an epoch, on generated data: a CPU takes about a second a step
SMOKE = "--smoke --limit-train 16 --batch-size 8 --limit-test 16 --eval-batch-size 16 --bn-reestimate 0"


def write_plan(folder, text):
    path = Path(folder) / "plan.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize("line, message", [
    ("fast: --dropuot 0", "plan.txt:3: unrecognized arguments: --dropuot 0; fix that line of the plan"),
    ("fast: --lr fast", "plan.txt:3: argument --lr: invalid float value: 'fast'"),
    ("fast: --lr -1", "plan.txt:3 (fast): --lr must be positive"),
    ("fast: --batch-size 512", "plan.txt:3 (fast): --limit-train 256 is fewer images than one batch of 512"),  # with common
    ("fast: --seed 3", "plan.txt:3: --seed is set by the sweep for each run"),
    ("control: --dropout 0.1", "plan.txt:3: a second variant named control (the first is at "),
    ("seeds: 0 zero", "plan.txt:3: `seeds:` takes distinct whole numbers"),
    ("just words", "plan.txt:3: 'just words' is not `name: train.py flags`"),
])
def test_a_bad_plan_line_is_one_line_naming_it_before_anything_runs(line, message, tmp_path, capsys):
    plan = write_plan(tmp_path, f"common: --smoke\ncontrol:\n{line}\n")
    assert sweep.main([str(plan), "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_the_first_plan_reads_as_train_py_would_take_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # train.py's default --data, which the check asks to exist
    plan = sweep.read_plan(ROOT / "bench" / "plans" / "fast-15.txt", tmp_path / "runs")
    assert plan.seeds == [0, 1, 2, 3, 4] and "--tta" in plan.common and plan.variants["control"] == []
    assert plan.variants["no-dropout"] == ["--dropout", "0"] and len(plan.variants) >= 10
    jobs = plan.jobs()
    assert [seed for _, seed, _ in jobs[:len(plan.variants)]] == [0] * len(plan.variants)  # every variant of seed 0 first
    assert jobs[0][2] == "control-s0" and jobs[len(plan.variants)][2] == "control-s1"


@pytest.mark.long
def test_a_sweep_cut_by_its_budget_resumes_where_it_stopped_and_ranks_every_variant(tmp_path, capsys):
    runs = tmp_path / "runs"
    plan = sweep.read_plan(write_plan(tmp_path, f"seeds: 0 1\ncommon: {SMOKE}\none-epoch:\n"
                                                "two-epochs: --epochs 2  # the run the budget cuts\n"), runs)
    assert [name for *_, name in plan.jobs()] == ["one-epoch-s0", "two-epochs-s0", "one-epoch-s1", "two-epochs-s1"]

    def clock():  # the budget runs out once two-epochs-s0 has started training: its 4 steps take seconds
        log = runs / "logs" / "two-epochs-s0.log"
        return 1e9 if log.exists() and "training 2 epochs" in log.read_text() else 0.0

    assert sweep.Sweep(plan, runs, parallel=1, budget_s=60, clock=clock).run() == 0
    out = capsys.readouterr().out
    assert "two-epochs-s0: cut (saved; resumed next time)" in out and "stopped by the budget of 60 s" in out
    assert "1 of 4 runs done, 1 cut, 2 not started" in out
    done = runs / "one-epoch-s0" / "summary.json"
    first = done.stat().st_mtime_ns
    table = json.loads((runs / "sweep.json").read_text())["variants"]
    assert [(v["variant"], v["n"], v["runs"]) for v in table] == [
        ("one-epoch", 1, {"done": 1, "cut": 0, "failed": 0, "new": 1}),
        ("two-epochs", 0, {"done": 0, "cut": 1, "failed": 0, "new": 1})]
    assert not (runs / "one-epoch-s1").exists()  # nothing started past the budget

    time.sleep(0.01)
    assert sweep.main([str(plan.path), "--runs", str(runs)]) == 0  # the same command again
    out = capsys.readouterr().out
    assert "(1 done already)" in out and "two-epochs-s0: resumed" in out and "one-epoch-s0" not in out.split("\n", 1)[1]
    assert done.stat().st_mtime_ns == first  # the finished run was left alone
    log = (runs / "logs" / "two-epochs-s0.log").read_text()
    assert log.count("\n== ") == 1 and "--resume" in log.split("\n== ")[1] and "stopped at" in log
    resumed = json.loads((runs / "two-epochs-s0" / "summary.json").read_text())
    assert resumed["complete"] and resumed["steps"] == 4 and [h["epoch"] for h in resumed["history"]] == [1, 2]
    data = json.loads((runs / "sweep.json").read_text())
    assert [(v["n"], v["runs"]["done"]) for v in data["variants"]] == [(2, 2), (2, 2)]
    assert data["variants"][0]["final"][0] >= data["variants"][1]["final"][0]  # ranked by mean final accuracy
    markdown = (runs / "sweep.md").read_text()
    assert "| 1    | " in markdown and "Mean test accuracy after each epoch" in markdown and "| two-epochs |" in markdown
