"""Files a run writes and reads back: atomic writes (`write_atomic`, `SaveError`), checkpoints saved whole
and read with weights_only=True (`load_checkpoint`), and the weights of a finished run for what comes
after training (`load_weights`, `init_from`, `add_run_flags`: evaluation, prediction, export,
fine-tuning)."""
import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from .config import Config
from .errors import SaveError, UserError

UMASK = os.umask(0o022)
os.umask(UMASK)  # read once: os.umask can only be read by setting it


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


def add_run_flags(parser):
    """The flags every script that reads a run back takes: the run folder, which checkpoint, which weights."""
    parser.add_argument("run", help="a run folder that train.py wrote (runs/<name>)")
    parser.add_argument("--checkpoint", choices=["best", "last"], default="best",
                        help="which checkpoint (default: best)")
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
        raise UserError(f"{run_dir / f'{which}.pt'} holds no weight average (the run had no --ema); "
                        "use its raw weights")
    return (ckpt["ema"]["model"] if weights == "ema" else ckpt["model"]), weights, ckpt, Config(**ckpt["config"])


def init_from(model, run_dir):
    """Load another run's best weights into `model` (fine-tuning): a note saying which, or a
    one-line UserError when they do not fit it (checked tensor by tensor, before loading)."""
    theirs, weights, ckpt, _ = load_weights(run_dir, "best", flag="--init-from")
    mine = model.state_dict()
    misfits = [k for k in sorted(set(mine) | set(theirs))
               if k not in mine or k not in theirs or mine[k].shape != theirs[k].shape]
    if misfits:
        k = misfits[0]
        shapes = " against ".join(str(tuple(d[k].shape)) if k in d else "none" for d in (theirs, mine))
        more = f", and {len(misfits) - 1} more" if len(misfits) > 1 else ""
        raise UserError(f"--init-from {run_dir}: its weights do not fit this model ({k}: {shapes}{more}); "
                        f"start from a run of this model")
    model.load_state_dict(theirs)
    state = ckpt["state"]
    row = state["history"][-1] if state["history"] else None  # best.pt is saved at the end of its epoch
    which = f" (epoch {row['epoch']}, test accuracy {state['best_acc']:.2%}" \
            f"{', the weight average' if weights == 'ema' else ''})" if row else ""
    return f"starting from {run_dir}/best.pt{which}; the optimizer and the schedule start fresh"
