"""engine/run.py: atomic files, checkpoints read with weights_only, the run state, Ctrl-C, run facts."""
import dataclasses
import io
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from engine.config import Config, UserError, resolve
from engine.device import Env
from engine.loop import make_optimizer, make_schedule
from engine.run import (RunFolderLock, RunState, SaveClock, SaveError, StopSignal, git_commit, init_from, load_checkpoint,
                        restore_run, same_data, save_run, write_atomic)
from net import build_model

ROOT = Path(__file__).resolve().parents[1]
CPU = Env(device=torch.device("cpu"))


def smoke_run(**overrides):
    """(cfg, model, optimizer, schedule) as train.py sets them up for a --smoke run of 16 steps an epoch."""
    cfg = resolve(Config(smoke=True, **overrides))
    model = build_model(dropout=cfg.dropout)
    optimizer = make_optimizer(cfg, model)
    return cfg, model, optimizer, make_schedule(cfg, optimizer, 16)


# --- checkpoints ----------------------------------------------------------------------------------

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
    state.add_part({"loss_sum": 8.0, "correct": 4.0, "images": 16, "seconds": 2.0, "end": 1}, start=0, first_step=0)
    state.add_part({"loss_sum": 24.0, "correct": 12.0, "images": 48, "seconds": 3.0, "end": 4}, start=1, first_step=0,
                   resumed=True)
    assert (state.step, state.step_in_epoch, state.train_s) == (4, 4, 5.0)
    assert state.partial == {"loss_sum": 32.0, "correct": 16.0, "images": 64, "seconds": 5.0, "resumed_at_step": 1}
    row = {"epoch": 1, "test_acc": 0.4}
    assert state.end_epoch(row, eval_s=1.0, target_acc=0.3)  # the best so far
    assert row["resumed_at_step"] == 1 and state.history == [row] and state.partial is None
    assert (state.epoch, state.step_in_epoch, state.best_acc, state.target_epoch, state.target_wall_s) == (1, 0, 0.4, 1, 6.0)
    for start, end in ((0, 2), (2, 4)):  # a checkpoint after step 2, in the same process: not a resume
        state.add_part({"loss_sum": 4.0, "correct": 2.0, "images": 8, "seconds": 1.0, "end": end}, start=start, first_step=4)
    row = {"epoch": 2, "test_acc": 0.3}
    assert not state.end_epoch(row, eval_s=1.0, target_acc=0.3) and "resumed_at_step" not in row
    assert state.target_epoch == 1 and state.complete(resolve(Config(smoke=True, epochs=2)))


class Boom:
    def __reduce__(self):
        return (os.system, ("echo owned",))


@pytest.mark.parametrize("content, message", [
    (b"", "is empty (0 bytes)"),
    (bytes(range(256)) * 2, "not a readable torch.save file"),  # fixed bytes: the same test id on every xdist worker
    (pickle.dumps({"model": Boom()}), "not a readable torch.save file"),
    (None, "not a checkpoint of this project"),
    ("code", "objects other than tensors"),
    ("old", "was written by an older train.py"),
])
def test_bad_checkpoints_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "last.pt"
    if content is None:
        torch.save({"weights": torch.zeros(2)}, path)  # a real torch file, not ours
    elif content == "code":
        torch.save({"model": Boom()}, path)  # would run os.system if unpickled without weights_only
    elif content == "old":  # a checkpoint from before the run state had all its fields
        keys = ("model", "optimizer", "scheduler", "rng_cpu", "config")
        torch.save({**dict.fromkeys(keys, {}), "state": {"epoch": 1}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    assert "without --resume" in str(e.value)  # and the way out


# --- Ctrl-C and SIGTERM -------------------------------------------------------------------------------------

def test_first_signal_asks_to_stop_and_says_so_and_the_process_is_left_as_it_was():
    handlers = lambda: {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # noqa: E731
    before, threads, out = handlers(), set(threading.enumerate()), io.StringIO()
    with StopSignal(out=out) as stop:
        (watcher,) = set(threading.enumerate()) - threads
        stop.arm()
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 10
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.requested and stop.exit_code == 130
        assert "stopping after this step (Ctrl-C again to quit now)" in out.getvalue()
    assert handlers() == before and signal.set_wakeup_fd(-1) == -1  # as train.py found them (run in-process by tests)
    watcher.join(timeout=10)
    assert watcher.name == "stop-signal" and not watcher.is_alive()


WATCHED = """
import sys, time, torch
from engine.run import StopSignal
stop = StopSignal()
if sys.argv[1] == "armed":
    stop.arm()
print("ready", flush=True)
a = torch.randn(1500, 1500)
while True:  # long C++ calls, as in a CPU backward pass: Python's own handlers would wait for them
    torch.linalg.eigvals(a)
"""


@pytest.mark.parametrize("armed", [True, False])
def test_signals_quit_at_once_when_there_is_nothing_to_wait_for(armed):
    proc = subprocess.Popen([sys.executable, "-c", WATCHED, "armed" if armed else "loading"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    for _ in range(2 if armed else 1):  # armed: the second one quits; loading: the first
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    if armed:
        assert "stopping after this step" in err and "quitting now; the last checkpoint is kept" in err
    else:
        assert "interrupted before training; nothing saved" in err
    assert "Traceback" not in err



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


# --- what real runs meet: a full disk, two processes on a folder, other data ----------------------

@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), OSError(30, "Read-only file system")])
def test_a_write_that_fails_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch, error):
    (tmp_path / "last.pt").write_bytes(b"the good one")

    def fails_halfway(tmp):
        Path(tmp).write_bytes(b"half")
        raise error

    with pytest.raises(SaveError) as e:
        write_atomic(tmp_path / "last.pt", fails_halfway)
    assert str(e.value) == f"could not write {tmp_path / 'last.pt'} ({error.strerror}); the previous last.pt is intact"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind
    assert (tmp_path / "last.pt").read_bytes() == b"the good one"
    monkeypatch.setattr(tempfile, "mkstemp", lambda **kw: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
    with pytest.raises(SaveError, match=r"could not write .*summary.json \(Read-only file system\)$"):
        write_atomic(tmp_path / "summary.json", lambda tmp: None)  # not even a temporary could be made


def test_a_second_process_on_a_run_folder_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; from engine.run import RunFolderLock; "
                               f"lock = RunFolderLock({str(tmp_path / 'run')!r}); print('locked', flush=True); time.sleep(600)"],
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


def test_the_save_clock_asks_for_a_checkpoint_when_due_or_on_a_stop():
    class Stop:
        requested = False

    clock = SaveClock(Stop(), every_s=3600)
    assert not clock.requested
    clock.stop.requested = True
    assert clock.requested
    clock = SaveClock(Stop(), every_s=0)  # --checkpoint-every 0: after every step
    assert clock.requested


# --- after training: another run's weights to start from ------------------------------------------

@pytest.mark.xdist_group("short")
def test_init_from_loads_another_runs_best_weights_and_says_so(short_run):
    run, _ = short_run
    model = build_model()
    note = init_from(model, run)
    ckpt = torch.load(run / "best.pt", weights_only=True)
    best = ckpt["ema"]["model"] if ckpt["state"]["best_weights"] == "ema" else ckpt["model"]  # as the run marked them
    assert all(torch.equal(model.state_dict()[k], v) for k, v in best.items())
    assert note.startswith(f"starting from {run}/best.pt (epoch 1, test accuracy ") and "start fresh" in note


@pytest.mark.xdist_group("short")
def test_init_from_weights_that_do_not_fit_is_one_line(short_run, tmp_path):
    (tmp_path / "other").mkdir()
    ckpt = torch.load(short_run[0] / "best.pt", weights_only=True)
    ckpt["state"]["best_weights"] = "raw"  # the weights init_from takes
    ckpt["model"]["head.2.weight"] = torch.zeros(100, 128)  # a head for 100 classes
    torch.save(ckpt, tmp_path / "other" / "best.pt")
    model = build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as e:
        init_from(model, tmp_path / "other")
    assert str(e.value) == (f"--init-from {tmp_path / 'other'}: its weights do not fit this model (head.2.weight: "
                            f"(100, 128) against (10, 128)); start from a run of this model")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # untouched
    with pytest.raises(UserError, match="--init-from nowhere is not a folder"):
        init_from(model, "nowhere")
