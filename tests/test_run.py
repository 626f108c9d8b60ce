"""engine/run.py: atomic files, checkpoints read with weights_only, the run state, Ctrl-C, run facts."""
import io
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.config import Config, UserError, resolve
from engine.device import Env
from engine.loop import make_optimizer, make_schedule
from engine.run import RunState, StopSignal, git_commit, load_checkpoint, restore_run, save_run, write_atomic
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
    state.add_part({"loss_sum": 24.0, "correct": 12.0, "images": 48, "seconds": 3.0, "end": 4}, start=1, first_step=0)
    assert (state.step, state.step_in_epoch, state.train_s) == (4, 4, 5.0)
    assert state.partial == {"loss_sum": 32.0, "correct": 16.0, "images": 64, "seconds": 5.0, "resumed_at_step": 1}
    row = {"epoch": 1, "test_acc": 0.4}
    assert state.end_epoch(row, eval_s=1.0, target_acc=0.3)  # the best so far
    assert row["resumed_at_step"] == 1 and state.history == [row] and state.partial is None
    assert (state.epoch, state.step_in_epoch, state.best_acc, state.target_epoch, state.target_wall_s) == (1, 0, 0.4, 1, 6.0)
    state.add_part({"loss_sum": 8.0, "correct": 4.0, "images": 16, "seconds": 2.0, "end": 4}, start=0, first_step=4)
    assert not state.end_epoch({"epoch": 2, "test_acc": 0.3}, eval_s=1.0, target_acc=0.3)
    assert state.target_epoch == 1 and state.complete(resolve(Config(smoke=True, epochs=2)))


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"the good one")

    def fails_halfway(tmp):
        Path(tmp).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(tmp_path / "last.pt", fails_halfway)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"] and (tmp_path / "last.pt").read_bytes() == b"the good one"


class Boom:
    def __reduce__(self):
        return (os.system, ("echo owned",))


@pytest.mark.parametrize("content, message", [
    (b"", "is empty (0 bytes)"),
    (os.urandom(512), "not a readable torch.save file"),
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

def test_first_signal_asks_to_stop_and_says_so():
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out = io.StringIO()
    try:
        stop = StopSignal(out=out)
        stop.arm()
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 10
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.requested and stop.exit_code == 130
        assert "stopping after this step (Ctrl-C again to quit now)" in out.getvalue()
    finally:
        signal.set_wakeup_fd(-1)
        for s, handler in old.items():
            signal.signal(s, handler)


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
