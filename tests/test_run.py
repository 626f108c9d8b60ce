"""engine/run.py: the run state saved and restored, the lock on its folder, the data check on resume, run facts."""
import dataclasses
import subprocess
import sys

import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.config import Config, UserError, resolve
from engine.device import Env
from engine.loop import make_optimizer, make_schedule
from engine.run import ROOT, RunFolderLock, RunState, git_commit, restore_run, same_data, save_run
from net import build_model

CPU = Env(device=torch.device("cpu"))


def smoke_run(**overrides):
    """(cfg, model, optimizer, schedule) as train.py sets them up for a --smoke run of 16 steps an epoch."""
    cfg = resolve(Config(smoke=True, **overrides))
    model = build_model(dropout=cfg.dropout)
    optimizer = make_optimizer(cfg, model)
    return cfg, model, optimizer, make_schedule(cfg, optimizer, 16)


# --- saved and restored ---------------------------------------------------------------------------


def test_a_run_saved_and_restored_continues_where_it_was(tmp_path):
    cfg, model, optimizer, schedule = smoke_run()
    for _ in range(3):  # a few steps: optimizer moments and the schedule position are not the initial ones
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        optimizer.step()
        schedule.after_step()
    state = RunState(epoch=0, step_in_epoch=3, step=3, partial={"loss_sum": 1.0, "correct": 2.0, "images": 48,
                                                                  "seconds": 1.5, "resumed_at_step": None})
    save_run(tmp_path / "last.pt", model, optimizer, schedule, state, cfg, CPU)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind
    expected_rng = torch.get_rng_state()
    torch.rand(5)  # move the RNG on: the restore puts it back

    ckpt = load_checkpoint(tmp_path / "last.pt")
    _, model2, optimizer2, schedule2 = smoke_run()
    restored = restore_run(ckpt, model2, optimizer2, schedule2, CPU)
    assert restored == state and Config(**ckpt["config"]) == cfg
    assert schedule2.lr == schedule.lr and schedule2.scheduler.last_epoch == 3
    for key, value in model.state_dict().items():
        assert torch.equal(model2.state_dict()[key], value), key
    assert torch.equal(torch.get_rng_state(), expected_rng)


def test_run_state_adds_the_parts_of_an_epoch_cut_by_a_stop():
    state = RunState()
    assert state.next_part(steps_per_epoch=4, total=8) == (0, 4)
    state.add_part({"loss_sum": 8.0, "correct": 4.0, "images": 16, "seconds": 2.0, "end": 1}, start=0)
    assert state.next_part(steps_per_epoch=4, total=8) == (1, 4)  # a resume goes on inside the epoch
    state.add_part({"loss_sum": 24.0, "correct": 12.0, "images": 48, "seconds": 3.0, "end": 4}, start=1, resumed=True)
    assert (state.step, state.step_in_epoch, state.train_s) == (4, 4, 5.0)
    assert state.partial == {"loss_sum": 32.0, "correct": 16.0, "images": 64, "seconds": 5.0, "resumed_at_step": 1}
    row = {"epoch": 1, "test_acc": 0.4}
    assert state.end_epoch(row, eval_s=1.0, target_acc=0.3)  # the best so far
    assert row["resumed_at_step"] == 1 and state.history == [row] and state.partial is None
    assert (state.epoch, state.step_in_epoch, state.best_acc, state.target_epoch, state.target_wall_s) == (1, 0, 0.4,
                                                                                                           1, 6.0)
    for start, end in ((0, 2), (2, 4)):  # a checkpoint after step 2, in the same process: not a resume
        state.add_part({"loss_sum": 4.0, "correct": 2.0, "images": 8, "seconds": 1.0, "end": end}, start=start)
    row = {"epoch": 2, "test_acc": 0.3}
    assert not state.end_epoch(row, eval_s=1.0, target_acc=0.3) and "resumed_at_step" not in row
    assert state.target_epoch == 1 and state.limit_reached(resolve(Config(smoke=True, epochs=2))) == "--epochs 2"


def test_a_run_that_ends_inside_an_epoch_leaves_it_open_for_a_longer_run():
    """--max-steps 6 at 4 steps an epoch: the run ends 2 steps into epoch 2, evaluated there, the epoch not
    counted; raised to 7 on resume, it trains on inside epoch 2, and the end of epoch 2 replaces its row."""
    state, part = RunState(), {"loss_sum": 4.0, "correct": 2.0, "images": 8, "seconds": 1.0}
    state.add_part({**part, "end": 4}, start=0)
    state.end_epoch({"epoch": 1, "step": 4, "test_acc": 0.2}, eval_s=0.5, target_acc=0.9)
    assert state.next_part(steps_per_epoch=4, total=6) == (0, 2)  # the run's end inside epoch 2
    state.add_part({**part, "end": 2}, start=0)
    state.end_epoch({"epoch": 2, "step": 6, "test_acc": 0.3}, eval_s=0.5, target_acc=0.9, whole=False)
    assert (state.epoch, state.step_in_epoch, state.step) == (1, 2, 6) and state.history[-1]["partial"]
    assert state.limit_reached(resolve(Config(smoke=True, epochs=2, max_steps=6))) == "--max-steps 6"
    assert state.limit_reached(resolve(Config(smoke=True, epochs=2, max_steps=7))) is None  # raised: not done
    assert state.next_part(steps_per_epoch=4, total=7) == (2, 3)
    state.add_part({**part, "end": 3}, start=2, resumed=True)
    state.end_epoch({"epoch": 2, "step": 7, "test_acc": 0.35}, eval_s=0.5, target_acc=0.9, whole=False)
    state.add_part({**part, "end": 4}, start=3)  # and on to the epoch's end, with --max-steps 8
    state.end_epoch({"epoch": 2, "step": 8, "test_acc": 0.4}, eval_s=0.5, target_acc=0.9)
    assert [(h["epoch"], h["step"], h.get("partial")) for h in state.history] == [(1, 4, None), (2, 8, None)]
    assert state.history[-1]["resumed_at_step"] == 2 and state.partial is None and state.epoch == 2
    assert state.partial is None and state.step == 8


# --- what a result records -----------------------------------------------------------------------


def test_results_name_the_commit_and_say_when_the_code_differs_from_it(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "model.py").write_text("width = 32\n")
    (tmp_path / "results.md").write_text("| 1 |\n")
    git("add", ".")
    git("commit", "-qm", "first")
    commit = git("rev-parse", "--short", "HEAD")
    assert git_commit(tmp_path) == commit
    (tmp_path / "results.md").write_text("| 2 |\n")  # the bench rewrites its results: still the same code
    assert git_commit(tmp_path) == commit
    (tmp_path / "model.py").write_text("width = 64\n")
    assert git_commit(tmp_path) == commit + "+dirty"
    assert git_commit(tmp_path / "nowhere") is None


# --- what real runs meet: two processes on a folder, other data -------------------------------------


def test_a_second_process_on_a_run_folder_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; from engine.run import RunFolderLock; "
                               f"lock = RunFolderLock({str(tmp_path / 'run')!r}); print('locked', flush=True); "
                               "time.sleep(600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(UserError) as e:
            RunFolderLock(tmp_path / "run")
        assert f"{tmp_path / 'run'} is in use by another train.py (pid {holder.pid} on " in str(e.value)
    finally:
        holder.kill()  # kill -9: no chance to clean up
        holder.wait()
    lock = RunFolderLock(tmp_path / "run")  # the kernel let go of the dead process's lock
    assert not lock.created


def test_a_run_folder_made_for_a_run_that_never_started_is_taken_back(tmp_path):
    lock = RunFolderLock(tmp_path / "new")
    assert lock.created and (tmp_path / "new" / ".lock").exists()
    lock.abandon()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old").mkdir()
    RunFolderLock(tmp_path / "old").abandon()  # not made by it: left alone
    assert (tmp_path / "old").exists()


def fingerprints(**changes):
    base = {"images": 50_000, "labels_sha256": "a" * 64, "sample_sha256": "b" * 64}
    return base, {**base, **changes}


@pytest.mark.parametrize("changes, what", [
    ({"images": 2_500}, "50,000 train images then, 2,500 now"),
    ({"labels_sha256": "c" * 64}, "other labels"),
    ({"sample_sha256": "c" * 64}, "other images"),
])
def test_a_resume_on_other_data_is_refused_unless_asked_for(changes, what):
    saved, now = fingerprints(**changes)
    cfg = resolve(Config(data="elsewhere", device="cpu"))
    with pytest.raises(UserError) as e:
        same_data(saved, now, cfg)
    assert str(e.value) == (f"--data elsewhere is not the data this run trained on ({what}); resume with that data, "
                            f"or add --allow-other-data to go on with this")
    assert what in same_data(saved, now, dataclasses.replace(cfg, allow_other_data=True))  # a note, and on it goes
    assert same_data(saved, saved, cfg) is None
    assert "no fingerprint" in same_data(None, now, cfg)  # a checkpoint from before fingerprints
