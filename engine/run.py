"""Around a run: files written atomically, checkpoints read with weights_only, the run's state,
the run-folder lock, the data check on resume, Ctrl-C and SIGTERM (`StopSignal`), when to save
inside an epoch (`SaveClock`), and the facts stored beside every result (`run_facts`)."""
import dataclasses
import fcntl
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines import load_cifar10, subset, synthetic_cifar

from .config import Config, UserError

ROOT = Path(__file__).resolve().parents[1]


# --- files: atomic writes, checkpoints read with weights_only -----------------------------------

UMASK = os.umask(0o022)
os.umask(UMASK)  # read once: os.umask can only be read by setting it


class SaveError(Exception):
    """A file could not be written (a full or read-only disk): one line naming it; the previous
    version of it, if any, is intact."""


def write_atomic(path, write):
    """`write(tmp)` to a temporary name beside `path`, then rename: never a half-written file.

    The file gets the mode any new file of the user's would (mkstemp's temporary is 0600). Any
    OSError (no space, read-only, permissions) becomes a SaveError, with no temporary left behind."""
    path, tmp = Path(path), None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except OSError as e:
        kept = f"; the previous {path.name} is intact" if path.exists() else ""
        raise SaveError(f"could not write {path} ({e.strerror or type(e).__name__}){kept}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(obj, path):
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_json(obj, path):
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2)))


CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "rng_cpu", "state", "config"}


def load_checkpoint(path, fix="pass a run folder that train.py wrote, or start a new run without --resume"):
    """A checkpoint this project wrote, read with weights_only=True (tensors and plain data only).

    Anything else raises UserError: one line naming the file and `fix`, what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; {fix}")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes), not a checkpoint; {fix}")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols: the error below says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's own messages run to many lines: name the kind of problem
        why = "not a readable torch.save file"
        if unsafe_globals(path):  # classes or functions the file would import: refused unread
            why = "it holds objects other than tensors and plain data, refused unread"
        raise UserError(f"{path}: {why}; {fix}") from None
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= set(ckpt):
        raise UserError(f"{path} is not a checkpoint of this project (no model, optimizer and config); {fix}")
    unknown = set(ckpt["config"]) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise UserError(f"{path} was written by another version (unknown settings {sorted(unknown)}); {fix}")
    if {"epoch", "step_in_epoch", "step", "history", "partial"} - set(ckpt["state"]):  # later fields have defaults
        raise UserError(f"{path} was written by an older train.py; {fix}")
    return ckpt


def unsafe_globals(path):
    """The classes and functions a torch.save file names beyond what weights_only allows ([] when
    it is not a torch.save file at all): read from the file's opcodes, nothing executed."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return []


def load_split(cfg, split):
    """A run's train or test images, as it trains and is evaluated on them: the class-balanced sample
    of --limit-train / --limit-test (seeded), or the generated --smoke set."""
    limit = cfg.limit_train if split == "train" else cfg.limit_test
    if cfg.smoke:
        return synthetic_cifar(limit, split=split, seed=cfg.seed)
    images, labels = load_cifar10(cfg.data, split, encoded=cfg.source == "encoded")
    return subset(images, labels, limit, seed=cfg.seed) if limit else (images, labels)


# --- the run's state, saved in every checkpoint -------------------------------------------------

@dataclass
class RunState:
    """Where a run is and what it has measured. Passed explicitly (the trainer changes it, the
    logger reads it) and saved in every checkpoint as plain data, so a resume continues exactly."""
    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # steps done in the current epoch (a run stopped mid-epoch)
    step: int = 0  # optimizer steps in all
    best_acc: float = 0.0
    history: list = field(default_factory=list)  # a row per finished epoch
    train_s: float = 0.0  # seconds in train_epoch
    wall_s: float = 0.0  # training and evaluation: the clock time to accuracy counts
    target_epoch: int = None  # the first epoch whose test accuracy reached --target-acc
    target_wall_s: float = None
    partial: dict = None  # the current epoch's totals so far, across a stop and resume
    best_weights: str = "raw"  # which weights gave best_acc: "raw", or "ema" (their moving average)

    def complete(self, cfg):
        return self.epoch >= cfg.epochs or self.step >= (cfg.max_steps or math.inf)

    def add_part(self, part, start, first_step, resumed=False):
        """Add a part of an epoch (all of it, or up to a stop or a checkpoint) from `train_epoch`;
        `resumed`: the part is the first of a resumed run, which marks its epoch's row."""
        before = self.partial or {"loss_sum": 0.0, "correct": 0.0, "images": 0, "seconds": 0.0, "resumed_at_step": None}
        self.partial = {**{k: before[k] + part[k] for k in ("loss_sum", "correct", "images", "seconds")},
                        "resumed_at_step": before["resumed_at_step"] if before["resumed_at_step"] is not None
                        else (start if resumed and start else None)}
        self.step_in_epoch, self.step = part["end"], first_step + part["end"]
        self.train_s += part["seconds"]
        self.wall_s += part["seconds"]

    def end_epoch(self, row, eval_s, target_acc):
        """Record a finished epoch's row; returns whether its test accuracy (of the raw weights, or of
        their average where there is one) is the best so far."""
        self.wall_s += eval_s
        if self.partial["resumed_at_step"] is not None:
            row["resumed_at_step"] = self.partial["resumed_at_step"]  # trained in two sessions; totals cover it all
        acc, weights = max((row["test_acc"], "raw"), (row.get("ema_test_acc", -1.0), "ema"))
        improved = acc > self.best_acc
        if acc >= target_acc and self.target_epoch is None:
            self.target_epoch, self.target_wall_s = row["epoch"], self.wall_s
        self.history.append(row)
        if improved:
            self.best_acc, self.best_weights = acc, weights
        self.epoch, self.step_in_epoch, self.partial = row["epoch"], 0, None
        return improved


def save_run(path, model, optimizer, schedule, state, cfg, env, data=None, ema=None):
    """Everything a resume needs, atomically: weights, optimizer moments, schedule, RNG, state,
    settings, the fingerprint of the train data (`pipelines.data.fingerprint`) and the weights'
    moving average (`--ema`)."""
    save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": schedule.state_dict(), "rng_cpu": torch.get_rng_state(),
                     "rng_cuda": torch.cuda.get_rng_state(env.device) if env.device.type == "cuda" else None,
                     "state": dataclasses.asdict(state), "config": dataclasses.asdict(cfg), "data": data,
                     "ema": ema.state_dict() if ema else None}, path)


def same_data(saved, now, cfg):
    """None when the train data matches the run's saved fingerprint; a note when it differs and
    --allow-other-data says so; otherwise a one-line UserError. Checkpoints from before
    fingerprints (None) pass with a note."""
    if saved is None:
        return "this run's checkpoint has no fingerprint of its data (an older train.py): not checked"
    if saved == now:
        return None
    what = (f"{saved['images']:,} train images then, {now['images']:,} now" if saved["images"] != now["images"] else
            "other labels" if saved["labels_sha256"] != now["labels_sha256"] else "other images")
    if cfg.allow_other_data:
        return f"--data {cfg.data} differs from the data this run trained on ({what}): going on with it, as asked"
    raise UserError(f"--data {cfg.data} is not the data this run trained on ({what}); resume with that data, or add "
                    f"--allow-other-data to go on with this")


RUN_FILES = ("last.pt", "best.pt", "summary.json")  # what a run folder holds besides TensorBoard's events


class RunFolderLock:
    """One process per run folder, on this machine and on a shared file system that supports locks.

    `RunFolderLock(run_dir)` creates the folder if needed and takes an exclusive flock on its
    `.lock` file, or raises a one-line UserError naming the process that holds it. The kernel
    drops the lock when the process ends, however it ends (kill -9 too), so it is never left
    stuck; the file stays (removing it would race a process about to lock it). Holding the lock,
    it clears the temporaries a killed process left mid-write. `abandon()`
    removes the folder again if this lock made it and the run never started; `release()` lets go
    (the end of the process does too)."""

    def __init__(self, run_dir):
        self.run_dir, self.created = Path(run_dir), not Path(run_dir).exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o666 & ~UMASK)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise UserError(f"{self.run_dir} is in use by another train.py ({holder}); wait for it, stop it, or pick "
                            f"another --name") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        for name in RUN_FILES:  # temporaries a killed process left mid-write: no one else writes here now
            for stale in self.run_dir.glob(f".{name}.*"):
                stale.unlink()

    def abandon(self):
        if self.created and {p.name for p in self.run_dir.iterdir()} <= {".lock"}:
            (self.run_dir / ".lock").unlink(missing_ok=True)
            self.run_dir.rmdir()

    def release(self):
        os.close(self.fd)  # the lock goes with the file descriptor


def add_run_flags(parser):
    """The flags every script that reads a run back takes: the run folder, which checkpoint, which weights."""
    parser.add_argument("run", help="a run folder that train.py wrote (runs/<name>)")
    parser.add_argument("--checkpoint", choices=["best", "last"], default="best", help="which checkpoint (default: best)")
    parser.add_argument("--weights", choices=["raw", "ema"], help="the trained weights or, for --ema runs, their "
                        "average (default: those best.pt marks as best; last.pt's raw ones)")


def load_weights(run_dir, which="best", weights=None, flag="the run"):
    """(state_dict, label, checkpoint, Config) of `run_dir`'s best.pt or last.pt, for what comes
    after training: evaluation, prediction, export, fine-tuning. `weights`: "raw" or "ema" (the
    moving average of --ema runs); None takes those best.pt marks as best, and last.pt's raw
    ones. One-line UserError for anything else."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{flag} {run_dir} is not a folder; pass a run folder that train.py wrote (runs/<name>)")
    ckpt = load_checkpoint(run_dir / f"{which}.pt", fix="pass a run folder that train.py wrote (runs/<name>)")
    weights = weights or (ckpt["state"].get("best_weights", "raw") if which == "best" else "raw")
    if weights == "ema" and not ckpt.get("ema"):
        raise UserError(f"{run_dir / f'{which}.pt'} holds no weight average (the run had no --ema); use its raw weights")
    return (ckpt["ema"]["model"] if weights == "ema" else ckpt["model"]), weights, ckpt, Config(**ckpt["config"])


def init_from(model, run_dir):
    """Load another run's best weights into `model` (fine-tuning): a note saying which, or a
    one-line UserError when they do not fit it (checked tensor by tensor, before loading)."""
    theirs, weights, ckpt, _ = load_weights(run_dir, "best", flag="--init-from")
    mine = model.state_dict()
    misfits = [k for k in sorted(set(mine) | set(theirs)) if k not in mine or k not in theirs or mine[k].shape != theirs[k].shape]
    if misfits:
        k = misfits[0]
        shapes = " against ".join(str(tuple(d[k].shape)) if k in d else "none" for d in (theirs, mine))
        more = f", and {len(misfits) - 1} more" if len(misfits) > 1 else ""
        raise UserError(f"--init-from {run_dir}: its weights do not fit this model ({k}: {shapes}{more}); "
                        f"start from a run of this model")
    model.load_state_dict(theirs)
    state = ckpt["state"]
    row = state["history"][-1] if state["history"] else None  # best.pt is saved at the end of its epoch
    return (f"starting from {run_dir}/best.pt" + (f" (epoch {row['epoch']}, test accuracy {state['best_acc']:.2%}"
                                                  f"{', the weight average' if weights == 'ema' else ''})" if row else "")
            + "; the optimizer and the schedule start fresh")


def restore_run(ckpt, model, optimizer, schedule, env):
    """Weights, optimizer moments, schedule position and RNG as saved; returns the RunState."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    schedule.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng_cpu"])
    if env.device.type == "cuda" and ckpt.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng_cuda"], env.device)
    return RunState(**ckpt["state"])


def rank_failed(error, env, run_dir):
    """Under torchrun, an error one rank meets (most often a collective failing because another rank
    died): one line per rank, the whole traceback kept in a file rather than interleaved with the
    other ranks' on the console. Returns the exit code."""
    where = run_dir if run_dir.is_dir() else Path(tempfile.gettempdir())
    path = where / f"error-rank{env.rank}.txt"
    path.write_text("".join(traceback.format_exception(error)))
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
    print(f"\nerror: rank {env.rank}: {type(error).__name__}: {first}; traceback in {path}. If another rank died, "
          f"torchrun names it below; the last checkpoint is kept: resume the job with --resume", file=sys.stderr)
    return 1


# --- stopping on request --------------------------------------------------------------------------

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
                what = "quitting now; the last checkpoint is kept" if self.armed else "interrupted before training; nothing saved"
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


# --- what a result records ---------------------------------------------------------------------

def git_commit(root=ROOT):
    """The short commit, with "+dirty" when the Python code that runs differs from it (results files don't count)."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, timeout=5)

    try:
        commit = git("rev-parse", "--short", "HEAD").stdout.strip()
        return commit + ("+dirty" if git("diff", "--quiet", "HEAD", "--", "*.py").returncode else "") if commit else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def run_facts(env):
    """Device, ranks, versions and commit: stored beside every training and bench result."""
    import nvidia.dali

    return {"device": env.name, "world_size": env.world, "torch": torch.__version__,
            "dali": nvidia.dali.__version__, "python": sys.version.split()[0], "commit": git_commit()}
