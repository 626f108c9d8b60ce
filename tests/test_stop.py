"""engine/stop.py: Ctrl-C and SIGTERM as a long job should take them, and when to save inside an epoch."""
import io
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from engine.run import ROOT
from engine.stop import SaveClock, StopSignal


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
from engine.stop import StopSignal
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


def test_the_save_clock_asks_for_a_checkpoint_when_due_or_on_a_stop():
    class Stop:
        requested = False

    clock = SaveClock(Stop(), every_s=3600)
    assert not clock.requested
    clock.stop.requested = True
    assert clock.requested
    clock = SaveClock(Stop(), every_s=0)  # --checkpoint-every 0: after every step
    assert clock.requested
