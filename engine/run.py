"""The run itself: its data (`load_split`), its state (`RunState`, saved in every checkpoint) and how it
is saved and restored (`save_run`, `restore_run`), the lock on its folder, the data check on resume,
a rank's failure under torchrun, and the facts stored beside every result (`run_facts`).

`ROOT`, the checkout, is defined here for the whole project."""
import dataclasses
import fcntl
import os
import socket
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines import load_cifar10, subset, synthetic_cifar
from pipelines.data import hold_out

from .checkpoint import UMASK, save_checkpoint
from .config import UserError

ROOT = Path(__file__).resolve().parents[1]


def load_split(cfg, split):
    """A run's "train", "val" or "test" images, as it trains and is evaluated on them: --val's held-out
    images ("val") apart from the rest of the train set ("train"), then the class-balanced sample of
    --limit-train / --limit-test (seeded), or the generated --smoke set."""
    source = "test" if split == "test" else "train"
    limit = {"train": cfg.limit_train, "test": cfg.limit_test}.get(split)
    if cfg.smoke:
        n = cfg.limit_train + cfg.val if source == "train" else limit  # --smoke sets both limits
        images, labels = synthetic_cifar(n, split=source, seed=cfg.seed)
    else:
        images, labels = load_cifar10(cfg.data, source, encoded=cfg.source == "encoded")
    if source == "train" and cfg.val:
        if cfg.val >= len(labels):
            raise UserError(f"--val {cfg.val} holds out all of the {len(labels):,} train images; lower --val")
        train, val = hold_out(images, labels, cfg.val)
        images, labels = train if split == "train" else val
    return subset(images, labels, limit, seed=cfg.seed) if limit else (images, labels)


# --- the run's state, saved in every checkpoint -------------------------------------------------

@dataclass
class RunState:
    """Where a run is and what it has measured. Passed explicitly (the trainer changes it, the
    logger reads it) and saved in every checkpoint as plain data, so a resume continues exactly.

    The trainer runs in parts: from where the run is (`next_part`) to its epoch's end, or to the
    run's end inside it, or to a stop or a checkpoint due; each part is added (`add_part`), and an
    epoch's end, or the run's, is recorded with its evaluation (`end_epoch`)."""
    epoch: int = 0  # whole epochs finished (one the run ended inside, at --max-steps, is not)
    step_in_epoch: int = 0  # steps done in the current epoch (a run stopped or ended inside one)
    step: int = 0  # optimizer steps in all
    best_acc: float = 0.0
    history: list = field(default_factory=list)  # a row per finished epoch
    train_s: float = 0.0  # seconds in train_epoch
    wall_s: float = 0.0  # training and evaluation: the clock time to accuracy counts
    target_epoch: int = None  # the first epoch whose test accuracy reached --target-acc
    target_wall_s: float = None
    partial: dict = None  # the current epoch's totals so far, across a stop and resume
    best_weights: str = "raw"  # which weights gave best_acc: "raw", or "ema" (their moving average)

    def limit_reached(self, cfg):
        """The limit the run has reached, in words ("--epochs 15", "--max-steps 400"), or None."""
        if cfg.max_steps is not None and self.step >= cfg.max_steps:
            return f"--max-steps {cfg.max_steps}"
        return f"--epochs {cfg.epochs}" if self.epoch >= cfg.epochs else None

    @property
    def first_step(self):
        """The current epoch's first step, counted in the run."""
        return self.step - self.step_in_epoch

    def next_part(self, steps_per_epoch, total):
        """(start, end): the steps of the current epoch the next part may run, up to its end or the run's."""
        return self.step_in_epoch, min(steps_per_epoch, self.step_in_epoch + total - self.step)

    def add_part(self, part, start, resumed=False):
        """Add a part of an epoch (all of it, or up to a stop or a checkpoint) from `train_epoch`;
        `resumed`: the part is the first of a resumed run, which marks its epoch's row."""
        before = self.partial or {"loss_sum": 0.0, "correct": 0.0, "images": 0, "seconds": 0.0, "resumed_at_step": None}
        self.partial = {**{k: before[k] + part[k] for k in ("loss_sum", "correct", "images", "seconds")},
                        "resumed_at_step": before["resumed_at_step"] if before["resumed_at_step"] is not None
                        else (start if resumed and start else None)}
        self.step_in_epoch, self.step = part["end"], self.first_step + part["end"]
        self.train_s += part["seconds"]
        self.wall_s += part["seconds"]

    def end_epoch(self, row, eval_s, target_acc, whole=True):
        """Record an evaluated epoch's row; returns whether its test accuracy (of the raw weights, or of
        their average where there is one) is the best so far.

        whole=False: the run ended inside the epoch (--max-steps). Its row is marked `partial` and the
        epoch stays open, its totals kept: a resume with a higher --max-steps trains on inside it, and
        the row of its end replaces this one."""
        self.wall_s += eval_s
        if self.partial["resumed_at_step"] is not None:
            row["resumed_at_step"] = self.partial["resumed_at_step"]  # trained in two sessions; totals cover it all
        acc, weights = max((row["test_acc"], "raw"), (row.get("ema_test_acc", -1.0), "ema"))
        improved = acc > self.best_acc
        if acc >= target_acc and self.target_epoch is None:
            self.target_epoch, self.target_wall_s = row["epoch"], self.wall_s
        if self.history and self.history[-1].get("partial"):  # this epoch's row at the run's earlier end
            self.history.pop()
        if not whole:
            row["partial"] = True
        self.history.append(row)
        if improved:
            self.best_acc, self.best_weights = acc, weights
        if whole:
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


def restore_run(ckpt, model, optimizer, schedule, env):
    """Weights, optimizer moments, schedule position and RNG as saved; returns the RunState."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    schedule.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng_cpu"])
    if env.device.type == "cuda" and ckpt.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng_cuda"], env.device)
    return RunState(**ckpt["state"])


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


# --- what a result records ---------------------------------------------------------------------

def git_commit(root=ROOT):
    """The short commit, with "+dirty" when the Python code that runs differs from it (results files don't count)."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, timeout=5)

    try:
        commit = git("rev-parse", "--short", "HEAD").stdout.strip()
        return commit + ("+dirty" if git("diff", "--quiet", "HEAD", "--",
                                         "*.py").returncode else "") if commit else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def run_facts(env):
    """Device, ranks, versions and commit: stored beside every training and bench result."""
    import nvidia.dali

    return {"device": env.name, "world_size": env.world, "torch": torch.__version__,
            "dali": nvidia.dali.__version__, "python": sys.version.split()[0], "commit": git_commit()}
