"""bench/sweep.py (`make sweep`): a plan read and checked before anything runs, its runs in seed order, a
budget that cuts the sweep, the same command resuming it, and the ranked table."""
import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest

from bench import sweep
from engine.config import Config, flag_parser, resolve

ROOT = Path(__file__).resolve().parents[1]
# train.py's smallest runs: 2 steps of 8 generated images an epoch
SMOKE = "--smoke --limit-train 16 --batch-size 8 --limit-test 16 --eval-batch-size 16 --bn-reestimate 0"


def write_plan(folder, text):
    path = Path(folder) / "plan.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize("line, message", [
    ("fast: --dropuot 0", "plan.txt:3: unrecognized arguments: --dropuot 0; fix that line of the plan"),
    ("fast: --lr fast", "plan.txt:3: argument --lr: invalid float value: 'fast'"),
    ("fast: --lr -1", "plan.txt:3 (fast): --lr must be positive"),
    # with common
    ("fast: --batch-size 512", "plan.txt:3 (fast): --limit-train 256 is fewer images than one batch of 512"),
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
    assert plan.seeds == [0, 1, 2] and "--tta" in plan.common and plan.variants["control"] == []
    assert plan.common[plan.common.index("--val") + 1] == "5000"  # chosen on held-out images
    assert plan.variants["no-dropout"] == ["--dropout", "0"] and len(plan.variants) >= 10
    jobs = plan.jobs()
    # every variant of seed 0 first, the likeliest first and the control second
    assert [seed for _, seed, _ in jobs[:len(plan.variants)]] == [0] * len(plan.variants)
    assert [name for *_, name in jobs[:2]] == ["light-batch-256-s0", "control-s0"]
    assert jobs[len(plan.variants)][2] == "light-batch-256-s1"


# A stand-in for train.py with its contract and none of its cost (no torch: a run takes a tenth of a second):
# --epochs E of one "step" each; summary.json after every epoch (complete at the end), last.pt beside it;
# --resume DIR goes on from last.pt; SIGTERM saves and exits 143. Its accuracy is 0.1 a finished epoch plus
# a thousandth of the seed, so the variant with more epochs ranks first, and with --val N its validation accuracy
# is 1 minus that, so there it ranks last. TRAINED counts epochs in a file.
STAND_IN = r"""
import argparse, json, signal, sys, time
from pathlib import Path
p = argparse.ArgumentParser()
for f in ("--seed", "--epochs", "--threads", "--val"):
    p.add_argument(f, type=int, default=0 if f == "--val" else 1)
p.add_argument("--runs"); p.add_argument("--name"); p.add_argument("--resume")
a, _ = p.parse_known_args()
run = Path(a.resume) if a.resume else Path(a.runs) / a.name
state = json.loads((run / "last.pt").read_text()) if a.resume else {"seed": a.seed, "epochs": a.epochs, "done": [],
                                                                    "val": a.val}
run.mkdir(parents=True, exist_ok=True)
def save(complete):
    (run / "last.pt").write_text(json.dumps(state))
    acc = [0.1 * (e + 1) + state["seed"] / 1000 for e in state["done"]]
    val = [1 - x for x in acc] if state["val"] else [None] * len(acc)  # held-out images rank the other way
    (run / "summary.json").write_text(json.dumps({
        "config": {"seed": state["seed"], "epochs": state["epochs"]}, "device": "cpu", "complete": complete,
        "final_acc": acc[-1] if acc else None, "best_acc": max(acc, default=None), "target_acc": 0.85,
        "final_val_acc": val[-1] if val else None,
        "epoch_to_target": None, "wall_s_to_target": None, "mean_train_img_per_s": 100.0,
        "history": [{"epoch": e + 1, "test_acc": x, **({"val_acc": v} if v is not None else {})}
                    for e, x, v in zip(state["done"], acc, val)]}))
def stop(*_):
    save(False); print("stopped at an epoch's end, saved", flush=True); sys.exit(143)
signal.signal(signal.SIGTERM, stop)
print(f"training {state['epochs'] - len(state['done'])} epochs", flush=True)
while len(state["done"]) < state["epochs"]:
    time.sleep(0.3)
    state["done"].append(len(state["done"]))
    with open(Path(sys.argv[0]).with_name("TRAINED"), "a") as f:
        f.write(f"{run.name} {len(state['done'])}\n")
    save(len(state["done"]) == state["epochs"])
print("done:", flush=True)
"""


def test_a_sweep_cut_by_its_budget_resumes_where_it_stopped_and_ranks_every_variant(tmp_path, capsys):
    """The sweep's own work, with the stand-in above for train.py (its contract is train.py's own tests'):
    every variant of seed 0 first; past the budget the running run gets SIGTERM and nothing new starts; the same
    command again skips the finished, resumes the cut and runs the rest, nothing trained twice; the table ranks."""
    trainer, runs = tmp_path / "stand_in.py", tmp_path / "runs"
    trainer.write_text(STAND_IN)
    plan = sweep.read_plan(write_plan(tmp_path, "seeds: 0 1\ncommon: --smoke\none-epoch: --epochs 1\n"
                                                "three-epochs: --epochs 3  # the run the budget cuts\n"), runs)
    assert [name for *_, name in plan.jobs()] == ["one-epoch-s0", "three-epochs-s0", "one-epoch-s1", "three-epochs-s1"]

    def clock():  # the budget runs out once three-epochs-s0 has finished its first epoch
        summary = runs / "three-epochs-s0" / "summary.json"
        return 1e9 if summary.exists() and json.loads(summary.read_text())["history"] else 0.0

    assert sweep.Sweep(plan, runs, parallel=1, budget_s=60, clock=clock, trainer=trainer).run() == 0
    out = capsys.readouterr().out
    assert "three-epochs-s0: cut (saved; resumed next time)" in out and "stopped by the budget of 60 s" in out
    assert "1 of 4 runs done, 1 cut, 2 not started" in out
    done = runs / "one-epoch-s0" / "summary.json"
    first = done.stat().st_mtime_ns
    table = json.loads((runs / "sweep.json").read_text())["variants"]
    assert [(v["variant"], v["n"], v["runs"]) for v in table] == [
        ("one-epoch", 1, {"done": 1, "cut": 0, "failed": 0, "new": 1}),
        ("three-epochs", 0, {"done": 0, "cut": 1, "failed": 0, "new": 1})]
    assert not (runs / "one-epoch-s1").exists()  # nothing started past the budget
    assert table[1]["partial"] == {"run": "three-epochs-s0", "epoch": 1, "epochs": 3, "test_acc": 0.1,
                                   "val_acc": None, "curve": [0.1], "val_curve": []}  # the cut run so far
    assert "partial: 10.00% at epoch 1 of 3" in (runs / "sweep.md").read_text()

    again = sweep.Sweep(sweep.read_plan(plan.path, runs), runs, parallel=1, trainer=trainer)  # the same command again
    assert again.run() == 0
    out = capsys.readouterr().out
    assert "(1 done already)" in out and "three-epochs-s0: resumed" in out
    assert "one-epoch-s0" not in out.split("\n", 1)[1]
    assert done.stat().st_mtime_ns == first  # the finished run was left alone
    trained = sorted((tmp_path / "TRAINED").read_text().split("\n")[:-1])
    assert trained == ["one-epoch-s0 1", "one-epoch-s1 1", "three-epochs-s0 1", "three-epochs-s0 2",
                       "three-epochs-s0 3", "three-epochs-s1 1", "three-epochs-s1 2", "three-epochs-s1 3"]  # each once
    assert "--resume" in (runs / "logs" / "three-epochs-s0.log").read_text().split("\n== ")[1]
    data = json.loads((runs / "sweep.json").read_text())
    assert [(v["variant"], v["n"], v["runs"]["done"]) for v in data["variants"]] == [("three-epochs", 2, 2),
                                                                                      ("one-epoch", 2, 2)]
    assert data["variants"][0]["final"][0] == pytest.approx(0.3005) == data["variants"][0]["curve"][2]
    markdown = (runs / "sweep.md").read_text()
    assert "| 1    | three-epochs |" in markdown and "Mean test accuracy after each epoch" in markdown


def test_each_run_is_train_py_with_the_plans_settings_and_a_resume_with_its_folder(tmp_path):
    """What the stand-in above does not show: the commands the sweep gives train.py are train.py's own flags,
    and resolve to the settings the plan checked (the thread count aside, a CPU's share of the idle cores)."""
    runs = tmp_path / "runs"
    plan = sweep.read_plan(write_plan(tmp_path, f"seeds: 3\ncommon: {SMOKE}\nfast: --lr 0.1 --dropout 0\n"), runs)
    s = sweep.Sweep(plan, runs, parallel=1)
    argv = s.command("fast", 3, "fast-s3")
    assert argv[:2] == [sys.executable, str(ROOT / "train.py")]
    given = vars(flag_parser().parse_args(argv[2:]))
    assert given["threads"] >= 1 and dataclasses.replace(resolve(Config(**given)), threads=None, name="fast-s3") == \
        dataclasses.replace(s.planned["fast-s3"], name="fast-s3")
    assert (given["lr"], given["dropout"], given["seed"], given["runs"]) == (0.1, 0.0, 3, str(runs))
    s.state["fast-s3"] = "cut"  # a checkpoint to go on from
    assert vars(flag_parser().parse_args(s.command("fast", 3, "fast-s3")[2:])) == {
        "resume": str(runs / "fast-s3"), "threads": given["threads"]}


def test_with_held_out_images_the_sweep_ranks_by_validation_accuracy(tmp_path):
    """Choosing by test accuracy and reporting it overstates it: a plan with --val ranks by the held-out images
    (the stand-in makes them rank the runs the other way round), test accuracy beside it."""
    trainer, runs = tmp_path / "stand_in.py", tmp_path / "runs"
    trainer.write_text(STAND_IN)
    plan = sweep.read_plan(write_plan(tmp_path, "seeds: 0\ncommon: --smoke --val 32\none-epoch: --epochs 1\n"
                                                "three-epochs: --epochs 3\n"), runs)
    s = sweep.Sweep(plan, runs, parallel=1, trainer=trainer)
    runs.mkdir()
    s.report()  # before any run: already ranked by the held-out images, as the plan says
    assert "ranked by mean final validation accuracy" in (runs / "sweep.md").read_text()
    assert s.run() == 0
    data = json.loads((runs / "sweep.json").read_text())
    assert data["ranked_by"] == "final_val"
    assert [(v["variant"], v["final_val"][0], v["final"][0]) for v in data["variants"]] == [
        ("one-epoch", pytest.approx(0.9), pytest.approx(0.1)), ("three-epochs", pytest.approx(0.7), pytest.approx(0.3))]
    markdown = (runs / "sweep.md").read_text()
    assert "ranked by mean final validation accuracy" in markdown and "Mean validation accuracy after each" in markdown


def test_a_running_runs_new_epoch_is_seen_once(tmp_path):
    """The table follows a long run epoch by epoch: the sweep rewrites it when a running run's summary.json (written
    after each of its epochs) changes, once per change."""
    runs = tmp_path / "runs"
    plan = sweep.read_plan(write_plan(tmp_path, f"seeds: 0\ncommon: {SMOKE}\nonly:\n"), runs)
    s = sweep.Sweep(plan, runs, parallel=1)
    summary = runs / "only-s0" / "summary.json"
    assert not s.new_epoch("only-s0")  # nothing written yet
    summary.parent.mkdir(parents=True)
    summary.write_text("{}")
    assert s.new_epoch("only-s0") and not s.new_epoch("only-s0")
    os.utime(summary, ns=(summary.stat().st_atime_ns, summary.stat().st_mtime_ns + 10**9))  # the next epoch's
    assert s.new_epoch("only-s0")
