"""The configuration: one dataclass (`Config`, a field per train.py flag), the recipes, the checks.

- `flag_parser`: train.py's flags, one per field of `Config`;
- `RECIPES` and `SMOKE`: the presets a run's unset fields come from; `resolve` applies them;
- `check`: every mistake in the flags as a one-line `UserError`, before any work starts;
- `resumed`: a saved run's settings with the flags a resume may change;
- `augment`: the run's `pipelines.Augment`, whose defaults are the only copy of its numbers.
"""
import argparse
import dataclasses
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from net.kernels import HAVE_TRITON, runs_kernels
from pipelines import Augment
from pipelines.data import SPLITS

from .errors import UserError  # noqa: F401 (raised here, and imported from here by the scripts)

RECIPES = {
    # SGD + Nesterov with a short warm-up and a linear decay to 0, label smoothing, a large batch:
    # the usual way to reach a fixed accuracy in few epochs. Weight decay skips BN and biases.
    # Chosen from practice; on one H100, 78% after 15 epochs (docs/bench.md); bench/plans/fast-15.txt is its sweep.
    "fast": dict(epochs=15, batch_size=512, optimizer="sgd", lr=0.2, weight_decay=5e-4, label_smoothing=0.1,
                 schedule="onecycle", warmup_epochs=2.0, dropout=0.05, eval_batch_size=1000),
    # The original design: Adam 1e-3 with weight decay 1e-4 (its training configuration lists
    # both), ReduceLROnPlateau on test loss, batch 128, 63 epochs.
    "seed": dict(epochs=63, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=1e-4, label_smoothing=0.0,
                 schedule="plateau", warmup_epochs=0.0, dropout=0.1, eval_batch_size=1000),
}
# `--smoke`: the whole path in seconds on a CPU, on `synthetic_cifar` data, no download.
SMOKE = dict(epochs=1, batch_size=16, eval_batch_size=64, device="cpu", compile=False, limit_train=256,
             limit_test=128)
# The short run docs/training.md and the CPU notice suggest, and what it gave (measured there).
SHORT_RUN = "python train.py --device cpu --recipe seed --limit-train 2500 --limit-test 1000 --epochs 2 --batch-size 32"
SHORT_RUN_RESULT = "about 32% test accuracy, chance being 10%, in 9 minutes on a 2-core CPU"
SHORT = 500  # steps: fewer, and BatchNorm's running averages (momentum 0.1) lag the still fast-moving weights
AUGMENT = Augment()  # the original design's recipe: the augmentation flags' defaults come from it


@dataclass
class Config:
    data: str = field(default="data", metadata={"help": "anything load_cifar10 accepts (`make data` fills data/)"})
    source: str = field(default="raw", metadata={"choices": ["raw", "encoded"],
                        "help": "raw: uint8 arrays resident on device; encoded: JPEG/PNG decoded by DALI every epoch"})
    recipe: str = field(default="fast", metadata={"choices": list(RECIPES), "help": "preset for the fields left unset"})
    epochs: int = field(default=None, metadata={"help": "training epochs"})
    batch_size: int = field(default=None, metadata={"help": "global batch, images per step over all ranks"})
    optimizer: str = field(default=None, metadata={
        "choices": ["sgd", "adam", "adamw"],
        "help": "sgd: Nesterov, momentum 0.9; adam: weight decay as an L2 term (the original design's); adamw: "
                "weight decay decoupled from the gradient (Loshchilov & Hutter)"})
    lr: float = field(default=None, metadata={"help": "peak learning rate (sgd: Nesterov, momentum 0.9)"})
    weight_decay: float = field(default=None, metadata={"help": "on conv and linear weights only"})
    label_smoothing: float = field(default=None)
    schedule: str = field(default=None, metadata={"choices": ["onecycle", "plateau"],
                          "help": "onecycle: linear warm-up then linear decay to 0, per step; plateau: x0.5 after 3 "
                                  "epochs without test-loss gain"})
    warmup_epochs: float = field(default=None, metadata={"help": "onecycle warm-up; at most a tenth of a short run"})
    dropout: float = field(default=None, metadata={"help": "after every conv"})
    # Augmentation, per image (pipelines.Augment): each probability 0 turns that one off.
    flip_p: float = field(default=AUGMENT.flip_p, metadata={"help": "probability of a horizontal flip"})
    ssr_p: float = field(default=AUGMENT.ssr_p, metadata={"help": "probability of a shift-scale-rotate"})
    shift: float = field(default=AUGMENT.shift,
                         metadata={"help": "its largest shift, a fraction of the image, each axis"})
    scale: float = field(default=AUGMENT.scale, metadata={"help": "its scale range, 1 +- this"})
    rotate: float = field(default=AUGMENT.rotate, metadata={"help": "its largest rotation, degrees"})
    cutout_p: float = field(default=AUGMENT.cutout_p, metadata={"help": "probability of one cutout square (mean fill)"})
    cutout_size: int = field(default=AUGMENT.cutout_size, metadata={"help": "its side, pixels"})
    eval_batch_size: int = field(default=None,
                                 metadata={"help": "1000 divides 10,000: one shape for the compiled model"})
    limit_train: int = field(default=None, metadata={"help": "train on a class-balanced sample of this many images"})
    limit_test: int = field(default=None, metadata={"help": "evaluate on a class-balanced sample of this many images"})
    val: int = field(default=0, metadata={
        "help": "hold out this many train images as a validation set, evaluated every epoch beside the test set: "
                "class-balanced and the same images for every run and --seed, so a sweep ranks its variants on them "
                "(5000 is usual; default 0: train on all)"})
    max_steps: int = field(default=None,
                           metadata={"help": "stop after this many optimizer steps; the schedule ends there"})
    seed: int = field(default=0,
                      metadata={"help": "model init, sampling, shuffling and augmentation all follow from it"})
    device: str = field(default=None, metadata={"choices": ["cuda", "cpu"], "help": "default: cuda when available"})
    compile: bool = field(default=None, metadata={"help": "torch.compile (default: on with CUDA, off on CPU)"})
    compile_mode: str = field(default="default", metadata={"help": "torch.compile mode, e.g. max-autotune"})
    channels_last: bool = field(default=True, metadata={
        "help": "the model and its batches in channels_last memory (--no-channels-last: NCHW; docs/bench.md "
                "has what each layout measured)"})
    conv_impl: str = field(default="auto", metadata={
        "choices": ["auto", "triton", "torch"],
        "help": "what runs the depthwise and grouped convs: torch (F.conv2d), triton (the project's kernels, "
                "net/kernels.py; CUDA), or auto: both checked and timed per layer at start, the faster kept "
                "(torch where the kernels cannot run)"})
    fuse: str = field(default="auto", metadata={
        "choices": ["auto", "on", "off"],
        "help": "each conv with its neighbours' BatchNorm, ReLU and dropout in the same kernels: on CUDA "
                "net/fused.py's Triton kernels, on a CPU net/cpu.py's C++ kernels; on, off, or auto: fused when a "
                "start-up check against the unfused model passes and (CUDA) whole training steps time faster; on "
                "a CPU, fused whenever the kernels build and pass the check"})
    threads: int = field(default=None,
                         metadata={"help": "torch's CPU threads (default on CPU: the cores idle at start)"})
    bn_reestimate: int = field(default=None, metadata={
        "help": "re-estimate BatchNorm statistics on this many train images before each evaluation, 0 to never "
                f"(default: 1000 in runs of under {SHORT} steps, whose running averages lag the weights)"})
    ema: float = field(default=None, metadata={
        "help": "also keep an exponential moving average of the weights, this decay per step (e.g. 0.999), "
                "evaluated beside them every epoch (default: off)"})
    tta: bool = field(default=False, metadata={
        "help": "also evaluate the final weights with flip test-time augmentation, reported beside the plain accuracy"})
    init_from: str = field(default=None, metadata={
        "help": "start from this run folder's best weights (fine-tuning); optimizer and schedule start fresh"})
    target_acc: float = field(default=0.85, metadata={"help": "record when test accuracy first reaches this"})
    runs: str = field(default="runs", metadata={"help": "parent folder of run folders"})
    name: str = field(default=None, metadata={"help": "run folder name (default: date-time-recipe)"})
    resume: str = field(default=None, metadata={"help": "continue the run in this folder from its last.pt"})
    allow_other_data: bool = field(default=False, metadata={
        "help": "with --resume: go on although the train data differs from the run's (its saved fingerprint)"})
    checkpoint_every: float = field(default=10.0, metadata={
        "help": "minutes between checkpoints inside an epoch, as well as at its end (0: after every step)"})
    log_every: int = field(default=None,
                           metadata={"help": "steps between logs, each a host sync (default: 25 on cuda, 1 on cpu)"})
    smoke: bool = field(default=False,
                        metadata={"help": "tiny generated dataset, 1 epoch on CPU: checks the whole path"})


AUGMENT_FIELDS = tuple(f.name for f in dataclasses.fields(Augment))


def augment(cfg):
    """The run's per-image augmentation, from its flags."""
    return Augment(**{name: getattr(cfg, name) for name in AUGMENT_FIELDS})


def flag(name):
    return "--" + name.replace("_", "-")


def flag_parser(description=None):
    """train.py's command line: a flag per field of Config (bools as --x / --no-x). Defaults are
    suppressed, so that the parsed namespace holds the flags typed and nothing else."""
    parser = argparse.ArgumentParser(prog="train.py", description=description, argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        if f.type is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=f.metadata.get("help"))
        else:
            parser.add_argument(flag(f.name), type=f.type, choices=f.metadata.get("choices"),
                                help=f.metadata.get("help"))
    return parser


def resolve(cfg):
    """Fill what is unset: from --smoke, then from the recipe, then from the machine."""
    for key, value in {**RECIPES[cfg.recipe], **(SMOKE if cfg.smoke else {})}.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg.compile = cfg.device == "cuda" if cfg.compile is None else cfg.compile
    cfg.log_every = cfg.log_every or (25 if cfg.device == "cuda" else 1)  # a CPU step is seconds: log each
    cfg.name = cfg.name or time.strftime("%Y%m%d-%H%M%S-") + ("smoke" if cfg.smoke else cfg.recipe)
    return cfg


def check(cfg):
    """Every mistake in the flags becomes a one-line UserError here, before any work starts."""
    if cfg.ema is not None and not 0 < cfg.ema < 1:
        raise UserError(f"--ema is a decay per step in (0, 1), such as 0.999, not {cfg.ema}")
    if cfg.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every is in minutes, at least 0, not {cfg.checkpoint_every}")
    for key in ("epochs", "batch_size", "eval_batch_size", "log_every", "limit_train", "limit_test", "max_steps"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise UserError(f"{flag(key)} must be at least 1, not {getattr(cfg, key)}")
    if cfg.val < 0:
        raise UserError(f"--val is a number of images, at least 0, not {cfg.val}")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be positive, not {cfg.lr}")
    if not 0 <= cfg.dropout < 1 or not 0 <= cfg.label_smoothing < 1:
        raise UserError("--dropout and --label-smoothing must be in [0, 1)")
    if not 0 < cfg.target_acc <= 1:
        raise UserError(f"--target-acc is a fraction in (0, 1], not {cfg.target_acc}")
    for name, (low, high) in Augment.RANGES.items():
        if not low <= getattr(cfg, name) <= high:
            raise UserError(f"{flag(name)} {getattr(cfg, name)} is outside [{low:g}, {high:g}]")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} does not split evenly over {world} ranks")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but CUDA is not available; use --device cpu")
    if cfg.conv_impl == "triton" and not runs_kernels(torch.device(cfg.device)):
        why = ("the Triton kernels run on CUDA (on a CPU only under TRITON_INTERPRET=1, for tests)" if HAVE_TRITON
               else "Triton is not installed (pip install triton)")
        raise UserError(f"--conv-impl triton: {why}; use --conv-impl auto or torch")
    if cfg.fuse == "on" and cfg.device == "cpu" and not runs_kernels(torch.device("cpu")):
        from net import cpu  # the C++ kernels: built here, once per machine (then cached on disk)

        if cpu.available():
            raise UserError(f"--fuse on: {cpu.available()}; use --fuse off (or auto: off where they cannot build)")
    elif cfg.fuse == "on" and not runs_kernels(torch.device(cfg.device)):
        why = "the fused kernels run on CUDA" if HAVE_TRITON else "Triton is not installed (pip install triton)"
        raise UserError(f"--fuse on: {why}; use --fuse auto or off")
    if not cfg.smoke and not Path(cfg.data).exists():
        raise UserError(f"--data {cfg.data} does not exist; run `make data` (or `make data SRC=/path/to/copy`)")
    if cfg.limit_train is not None and cfg.limit_train < cfg.batch_size:  # known now: say it before a long load
        raise UserError(f"--limit-train {cfg.limit_train} is fewer images than one batch of {cfg.batch_size}; raise "
                        f"--limit-train or lower --batch-size")
    run_dir = Path(cfg.runs) / cfg.name
    if not cfg.resume and (run_dir / "last.pt").exists():
        raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --name")
    # the run folder is made only when training starts
    existing = next(p for p in [run_dir, *run_dir.parents] if p.exists())
    try:  # permission bits do not tell (root, read-only mounts, /proc): create a probe and remove it
        if not existing.is_dir():
            raise NotADirectoryError(existing)
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".probe-"))
    except OSError:
        raise UserError(f"cannot write the run folder {run_dir} ({existing} is not a writable folder); "
                        f"pick another --runs or --name") from None
    return cfg


# What a resumed run may change: how long it goes on, and how (not what) it computes.
RESUME_MAY_CHANGE = ("epochs", "max_steps", "log_every", "device", "compile", "compile_mode", "channels_last",
                     "conv_impl", "fuse", "threads", "checkpoint_every", "allow_other_data", "tta",
                     "data")  # data: a moved copy, checked by fingerprint


def resumed(saved, given, run_dir):
    """(Config, notes): the settings saved in `run_dir`'s checkpoint, with the flags `given` (typed
    ones only) that a resume may change; any other differing flag is refused in one line."""
    saved = Config(**{**saved, "resume": str(run_dir), "runs": str(run_dir.parent), "name": run_dir.name,
                      "allow_other_data": False})  # asked anew at each resume
    changed = {k: v for k, v in given.items() if getattr(saved, k) != v}
    refused = [f"{flag(k)} {v} (the run has {getattr(saved, k)})" for k,
               v in changed.items() if k not in RESUME_MAY_CHANGE]
    if refused:
        raise UserError(f"{', '.join(refused)}: a resumed run keeps its settings but "
                        f"{', '.join(flag(k) for k in RESUME_MAY_CHANGE)}; drop "
                        f"{'that flag' if len(refused) == 1 else 'those flags'}, or start a new run")
    for key in ("epochs", "max_steps"):  # a shorter run would cut its schedule short
        if key in changed and (getattr(saved, key) is None or changed[key] < getattr(saved, key)):
            raise UserError(f"{flag(key)} {changed[key]} would shorten the run (it has "
                            f"{getattr(saved, key) or 'no limit'}); on resume it can only be raised")
    cfg = dataclasses.replace(saved, **changed)
    notes = [f"{flag(k)} {v} (was {getattr(saved, k)})" for k, v in changed.items()]
    if {"epochs", "max_steps"} & set(changed) and cfg.schedule == "onecycle":
        notes.append("the onecycle schedule is stretched to the new end as if planned so from the start: "
                     "the learning rate steps up from where it was")
    return check(cfg), notes


def planned_steps(recipe):
    """Optimizer steps the recipe takes on the full train set: what a short run is short of."""
    r = RECIPES[recipe]
    return r["epochs"] * (SPLITS["train"] // r["batch_size"])


def total_steps(cfg, steps_per_epoch):
    return min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)
