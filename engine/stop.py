"""Stopping a run on request: Ctrl-C and SIGTERM (`StopSignal`), and when to save inside an epoch
(`SaveClock`, which train_epoch reads as its `stop`)."""
import os
import signal
import socket
import sys
import threading
import time


class StopSignal:
    """Ctrl-C and SIGTERM, handled the way a long job should be.

    Once `arm()`ed (training), the first signal prints a notice at once and sets `requested`:
    the loop finishes its step and the trainer saves and exits 130 (143 for SIGTERM). A second
    signal quits at once with that code; the last checkpoint, written atomically, stays good.
    Before `arm()` (loading data, compiling) there is nothing to save, and the first quits.

    Python runs signal handlers only between bytecodes, so a handler would wait for a long C++
    call (a 12 s backward pass on CPU) to return. The C-level handler writes every signal to a
    wake-up socket at once, and a watcher thread acts on it from there. `with StopSignal() as stop:`
    puts the process's own handling back at the end (`close()`).
    """

    def __init__(self, out=sys.stderr):
        self.signum, self.armed, self.out = None, False, out
        self.before_quit = None  # called before quitting when nothing was saved (a run folder to take back)
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        wakeup_fd = signal.set_wakeup_fd(writer.fileno())  # the main thread only, as for signal.signal
        # The watcher acts; a do-nothing handler keeps Python's C handler in place.
        handlers = {s: signal.signal(s, lambda signum, frame: None) for s in (signal.SIGINT, signal.SIGTERM)}
        self._previous, self._writer = (wakeup_fd, handlers), writer  # the socket kept alive with self
        threading.Thread(target=self._watch, args=(reader,), daemon=True, name="stop-signal").start()

    @property
    def requested(self):
        return self.signum is not None

    @property
    def exit_code(self):  # a DDP rank stopped by another rank's signal exits as if sent SIGTERM
        return 128 + (self.signum or signal.SIGTERM)

    def arm(self):
        self.armed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Put back the handlers found at the start, and end the watcher: the process is as it was (a run
        inside a longer-lived process, as the tests run it)."""
        wakeup_fd, handlers = self._previous
        signal.set_wakeup_fd(wakeup_fd)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        self._writer.close()  # the watcher reads the end of its socket, and returns

    def _watch(self, reader):
        with reader:
            while data := reader.recv(1):  # empty once close() shuts the other end
                signum = data[0]
                if signum not in (signal.SIGINT, signal.SIGTERM):
                    continue  # another handler's signal (SIGCHLD, say) shares the socket
                if self.armed and self.signum is None:
                    self.signum = signum
                    print("\nstopping after this step (Ctrl-C again to quit now)", file=self.out, flush=True)
                    continue
                what = ("quitting now; the last checkpoint is kept" if self.armed
                        else "interrupted before training; nothing saved")
                if not self.armed and self.before_quit is not None:
                    self.before_quit()
                print(f"\n{what}", file=self.out, flush=True)
                os._exit(128 + signum)  # from this thread: the main one may be inside a long C++ call


class SaveClock:
    """What the trainer hands train_epoch as `stop`: asks it to return after a stop request, or once
    `every_s` seconds have passed since the last checkpoint (`saved()`), so that a kill -9 loses
    at most that long."""

    def __init__(self, stop, every_s):
        self.stop, self.every_s = stop, every_s
        self.saved()

    def saved(self):
        self.due_at = time.monotonic() + self.every_s

    @property
    def requested(self):
        return self.stop.requested or time.monotonic() >= self.due_at
