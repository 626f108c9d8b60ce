"""Train the seed CNN on CIFAR-10: `python train.py` (`make train`); `python train.py --help` lists every flag.

On CUDA: DALI on the GPU, bf16 autocast, channels_last, torch.compile (checked against eager
before use). On CPU: the same code in fp32, eager. Multi-GPU: `torchrun --nproc_per_node N
train.py`; --batch-size is the global batch, split evenly over the ranks, so the recipe (and its
learning rate) does not change with N. A script: the loop itself lives in net/engine.py, which
the bench times.

Writes runs/<name>/: TensorBoard events, last.pt and best.pt (atomic, every epoch), summary.json.
"""
import argparse
import dataclasses
import gc
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from net import build_model, count_params
from net.engine import (RECIPES, CompileCheck, Config, NonFiniteLoss, StopSignal, UserError, compile_checked, evaluate, load_checkpoint,
                        make_optimizer, make_scheduler, reestimate_batchnorm, resolve, run_facts, save_checkpoint, setup_env, total_steps,
                        train_epoch, warmup_steps, write_json)
from net.model import train_memory_bytes
from pipelines import CLASSES, Augment, DataError, load_cifar10, make_loader, subset, synthetic_cifar
from pipelines.data import SPLITS, decode_image
from pipelines.preview import one_per_class

# What a resumed run may change: how long it goes on, and how (not what) it computes.
RESUME_MAY_CHANGE = ("epochs", "max_steps", "log_every", "device", "compile", "compile_mode", "threads")


# --- configuration: the flags, or a resumed run's saved settings --------------------------------

def parse_config(argv=None):
    """(Config, checkpoint or None, notes). The checkpoint of a resumed run is read here, once."""
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.splitlines()[0],
                                     argument_default=argparse.SUPPRESS)  # so that we see which flags were typed
    for f in dataclasses.fields(Config):
        flag, help_ = "--" + f.name.replace("_", "-"), f.metadata.get("help")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
        else:
            parser.add_argument(flag, type=f.type, choices=f.metadata.get("choices"), help=help_)
    given = vars(parser.parse_args(argv))  # syntax errors: argparse's usage and exit 2
    if "resume" not in given:
        cfg = resolve(Config(**given))
        check_config(cfg)
        return cfg, None, []

    run_dir = Path(given.pop("resume"))
    ckpt = load_checkpoint(run_dir / "last.pt")
    if set(fresh_state()) - set(ckpt["state"]):
        raise UserError(f"{run_dir / 'last.pt'} was written by an older train.py; start a new run without --resume")
    saved = Config(**{**ckpt["config"], "resume": str(run_dir), "runs": str(run_dir.parent), "name": run_dir.name})
    changed = {k: v for k, v in given.items() if getattr(saved, k) != v}
    refused = [f"--{k.replace('_', '-')} {v} (the run has {getattr(saved, k)})" for k, v in changed.items()
               if k not in RESUME_MAY_CHANGE]
    if refused:
        raise UserError(f"{', '.join(refused)}: a resumed run keeps its settings but "
                        f"{', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_CHANGE)}; drop "
                        f"{'that flag' if len(refused) == 1 else 'those flags'}, or start a new run")
    for key in ("epochs", "max_steps"):  # a shorter run would cut its schedule short
        if key in changed and (getattr(saved, key) is None or changed[key] < getattr(saved, key)):
            raise UserError(f"--{key.replace('_', '-')} {changed[key]} would shorten the run (it has "
                            f"{getattr(saved, key) or 'no limit'}); on resume it can only be raised")
    cfg = dataclasses.replace(saved, **changed)
    notes = [f"--{k.replace('_', '-')} {v} (was {getattr(saved, k)})" for k, v in changed.items()]
    if {"epochs", "max_steps"} & set(changed) and cfg.schedule == "onecycle":
        notes.append("the onecycle schedule is stretched to the new end as if planned so from the start: "
                     "the learning rate steps up from where it was")
    check_config(cfg)
    return cfg, ckpt, notes


def check_config(cfg):
    """Every mistake in the flags becomes a one-line UserError here, before any work starts."""
    for key in ("epochs", "batch_size", "eval_batch_size", "log_every", "limit_train", "limit_test", "max_steps"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, not {getattr(cfg, key)}")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be positive, not {cfg.lr}")
    if not 0 <= cfg.dropout < 1 or not 0 <= cfg.label_smoothing < 1:
        raise UserError("--dropout and --label-smoothing must be in [0, 1)")
    if not 0 < cfg.target_acc <= 1:
        raise UserError(f"--target-acc is a fraction in (0, 1], not {cfg.target_acc}")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} does not split evenly over {world} ranks")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but CUDA is not available; use --device cpu")
    if not cfg.smoke and not Path(cfg.data).exists():
        raise UserError(f"--data {cfg.data} does not exist; run `make data` (or `make data SRC=/path/to/copy`)")
    if cfg.limit_train is not None and cfg.limit_train < cfg.batch_size:  # known now: say it before a long load
        raise UserError(f"--limit-train {cfg.limit_train} is fewer images than one batch of {cfg.batch_size}; raise "
                        f"--limit-train or lower --batch-size")
    run_dir = Path(cfg.runs) / cfg.name
    if not cfg.resume and (run_dir / "last.pt").exists():
        raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --name")
    existing = next(p for p in [run_dir, *run_dir.parents] if p.exists())  # the run folder is made only when training starts
    try:  # permission bits do not tell (root, read-only mounts, /proc): create a probe and remove it
        if not existing.is_dir():
            raise NotADirectoryError(existing)
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".probe-"))
    except OSError:
        raise UserError(f"cannot write the run folder {run_dir} ({existing} is not a writable folder); "
                        f"pick another --runs or --name") from None


# --- data: each split loaded once ---------------------------------------------------------------

def load_split(cfg, split, limit):
    if cfg.smoke:
        return synthetic_cifar(limit, split=split, seed=cfg.seed)
    images, labels = load_cifar10(cfg.data, split, encoded=cfg.source == "encoded")
    return subset(images, labels, limit, seed=cfg.seed) if limit else (images, labels)


def grid_sample(images, labels, seed):
    """One image of each class (pixels) and the class names: the rows of the augmentation grid."""
    picks = one_per_class(labels, seed)
    pixels = [decode_image(images[i]) if isinstance(images, list) else images[i] for i in picks]
    return np.stack(pixels), [CLASSES[labels[i]] for i in picks]


def make_loaders(cfg, env, train, test):
    if len(train[1]) // env.world < cfg.batch_size // env.world:
        raise UserError(f"{cfg.data} has {len(train[1])} train images, fewer than one batch of {cfg.batch_size} per "
                        f"step; lower --batch-size, or train on more images")
    common = dict(device=env.device, seed=cfg.seed, shard_id=env.rank, num_shards=env.world, dtype=env.dtype,
                  num_threads=env.dali_threads)
    return (make_loader(*train, batch_size=cfg.batch_size // env.world, train=True, augment=Augment(), **common),
            make_loader(*test, batch_size=cfg.eval_batch_size, train=False, **common))


# --- model, optimizer, schedule and run state: fresh, or as saved -------------------------------

def fresh_state():
    return {"epoch": 0, "step_in_epoch": 0, "step": 0, "best_acc": 0.0, "history": [], "train_s": 0.0,
            "wall_s": 0.0, "target_epoch": None, "target_wall_s": None, "partial": None}


def restore(ckpt, model, optimizer, scheduler, env):
    """Weights, optimizer moments, schedule position and RNG as saved; returns the run state."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])  # LambdaLR keeps our factor(): a longer run stretches it
    torch.set_rng_state(ckpt["rng_cpu"])
    if env.device.type == "cuda" and ckpt.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng_cuda"], env.device)
    return ckpt["state"]


def checkpoint(path, model, optimizer, scheduler, state, cfg, env):
    save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng_cpu": torch.get_rng_state(),
                     "rng_cuda": torch.cuda.get_rng_state(env.device) if env.device.type == "cuda" else None,
                     "state": state, "config": dataclasses.asdict(cfg)}, path)


# --- the run ------------------------------------------------------------------------------------

def main(argv=None):
    cfg, ckpt, notes = parse_config(argv)  # 1. configuration, and a resumed run's checkpoint, read once
    if ckpt and run_complete(cfg, ckpt["state"]):
        print(f"run already complete: {cfg.resume} ({ckpt['state']['epoch']}/{cfg.epochs} epochs, {ckpt['state']['step']} "
              f"steps); raise --epochs (or --max-steps) to train further")
        return 0
    stop = StopSignal()  # Ctrl-C quits at once while loading; once armed, it stops after a step
    env = setup_env(cfg)  # 2. device, precision, ranks
    log = Logger(cfg, env) if env.master else NullLogger()
    torch.manual_seed(cfg.seed)
    train, test = load_split(cfg, "train", cfg.limit_train), load_split(cfg, "test", cfg.limit_test)  # 3. data
    train_loader, test_loader = make_loaders(cfg, env, train, test)
    steps_per_epoch, run_dir = len(train_loader), Path(cfg.runs) / cfg.name
    model = build_model(dropout=cfg.dropout).to(env.device, memory_format=torch.channels_last)  # 4. model & co
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch)
    state = restore(ckpt, model, optimizer, scheduler, env) if ckpt else fresh_state()
    check = CompileCheck(model, compiled=False)
    if cfg.compile:  # both graphs (eval, train) built and checked here, not inside epoch 1
        check = compile_checked(model, env, eval_batch=min(cfg.eval_batch_size, test_loader.shard_size),
                                train_batch=cfg.batch_size // env.world, mode=cfg.compile_mode)
    fast_model = check.model
    train_model = torch.nn.parallel.DistributedDataParallel(fast_model) if env.ddp else fast_model

    total = total_steps(cfg, steps_per_epoch)
    recalibrate, short = short_run(cfg, env, model, train, total)

    run_dir.mkdir(parents=True, exist_ok=True)  # only now: a run that fails to start leaves no folder
    stop.arm()  # from here a stop saves where it is
    log.start(run_dir, model, steps_per_epoch, state, notes + [short], check, sizes=(len(train[1]), len(test[1])))
    if not ckpt:
        log.augmentations(*grid_sample(*test, cfg.seed))
    for epoch in range(state["epoch"], math.ceil(total / steps_per_epoch)):  # 5. the epochs
        start = state["step_in_epoch"]
        train_loader.set_epoch(epoch, skip=start)
        try:
            part = train_epoch(train_model, optimizer, train_loader, env, label_smoothing=cfg.label_smoothing,
                               scheduler=scheduler if cfg.schedule == "onecycle" else None, log_every=cfg.log_every,
                               start=start, stop_at=total - epoch * steps_per_epoch, stop=stop,
                               log=lambda step, m: log.step(epoch, epoch * steps_per_epoch + step, m))
        except NonFiniteLoss as e:
            return log.error(f"non-finite loss at epoch {epoch + 1}, step {e.step + 1}; stopped. The last good "
                             f"checkpoint is {run_dir / 'last.pt'} (try a lower --lr)")
        add_part(state, part, start, epoch * steps_per_epoch)
        if stop.requested and part["end"] < steps_per_epoch and state["step"] < total:  # mid-epoch: save it as it is
            if env.master:
                checkpoint(run_dir / "last.pt", model, optimizer, scheduler, state, cfg, env)
            return log.stopped(stop, f"epoch {epoch + 1}, step {part['end']}")
        row, confusion, improved = finish_epoch(cfg, env, fast_model, test_loader, scheduler, state, epoch, recalibrate)
        if env.master:
            checkpoint(run_dir / "last.pt", model, optimizer, scheduler, state, cfg, env)
            if improved:
                checkpoint(run_dir / "best.pt", model, optimizer, scheduler, state, cfg, env)
        log.epoch(row)
        if stop.requested and state["step"] < total:
            return log.stopped(stop, f"the end of epoch {epoch + 1}")
    log.finish(confusion)
    return 0


# The short run the README and the CPU notice suggest, and what it gave (measured, see README).
SHORT_RUN = "python train.py --device cpu --recipe seed --limit-train 2500 --limit-test 1000 --epochs 2 --batch-size 32"
SHORT_RUN_RESULT = "about 32% test accuracy, chance being 10%, in 9 minutes on a 2-core CPU"
SHORT = 500  # steps: fewer, and BatchNorm's running averages (momentum 0.1) lag the still fast-moving weights


def short_run(cfg, env, model, train, total):
    """(BatchNorm re-estimation before each evaluation or None, a note or None) for a run of `total` steps.

    `--bn-reestimate` is resolved here, where the run's length is known, and saved with the config."""
    if cfg.bn_reestimate is None:
        cfg.bn_reestimate = 1000 if total < SHORT else 0
    recalibrate = None
    if cfg.bn_reestimate:
        n = min(cfg.bn_reestimate, len(train[1]))
        loader = make_loader(*subset(*train, n, seed=cfg.seed), batch_size=min(cfg.batch_size // env.world, n), train=False,
                             device=env.device, shard_id=env.rank, num_shards=env.world, dtype=env.dtype,
                             num_threads=env.dali_threads)
        recalibrate = lambda: reestimate_batchnorm(model, loader, env)  # noqa: E731 (the eager model: no new graph)
    if total >= SHORT:
        return recalibrate, None
    planned = RECIPES[cfg.recipe]["epochs"] * (SPLITS["train"] // RECIPES[cfg.recipe]["batch_size"])
    return recalibrate, (f"a short run ({plural(total, 'step')}; the `{cfg.recipe}` recipe plans {planned:,} on the full "
                         f"train set): expect far less than its accuracy"
                         + (f". BatchNorm statistics are re-estimated on {n:,} train images before each evaluation "
                            f"(--bn-reestimate 0 turns that off)" if recalibrate else ""))


def run_complete(cfg, state):
    return state["epoch"] >= cfg.epochs or state["step"] >= (cfg.max_steps or math.inf)


def add_part(state, part, start, first_step):
    """Add a (possibly partial) epoch's totals and time to the run state, which a checkpoint keeps."""
    before = state["partial"] or {"loss_sum": 0.0, "correct": 0.0, "images": 0, "seconds": 0.0, "resumed_at_step": None}
    state["partial"] = {**{k: before[k] + part[k] for k in ("loss_sum", "correct", "images", "seconds")},
                        "resumed_at_step": before["resumed_at_step"] if before["resumed_at_step"] is not None
                        else (start or None)}
    state["step_in_epoch"], state["step"] = part["end"], first_step + part["end"]
    state["train_s"] += part["seconds"]
    state["wall_s"] += part["seconds"]  # time to accuracy counts every part of every epoch


def finish_epoch(cfg, env, model, test_loader, scheduler, state, epoch, recalibrate=None):
    """Reduce the epoch's totals over ranks, [re-estimate BatchNorm,] evaluate, step a per-epoch schedule:
    (row, confusion, improved)."""
    p = state["partial"]
    totals = torch.tensor([p["loss_sum"], p["correct"], p["images"]], dtype=torch.float64, device=env.device)
    t_eval = time.perf_counter()
    if recalibrate:
        recalibrate()
    if env.ddp:
        dist.all_reduce(totals)
        for b in model.buffers():  # evaluate every rank with rank 0's BatchNorm statistics
            dist.broadcast(b, 0)
    loss_sum, correct, images = totals.tolist()  # sync: once per epoch
    test_loss, test_acc, confusion = evaluate(model, test_loader, env)
    if cfg.schedule == "plateau":
        scheduler.step(test_loss)
    eval_s = time.perf_counter() - t_eval
    state["wall_s"] += eval_s
    if env.ddp:
        assert_ranks_agree(model)
    row = {"epoch": epoch + 1, "step": state["step"], "lr": scheduler.optimizer.param_groups[0]["lr"],
           "train_loss": loss_sum / images, "train_acc": correct / images, "test_loss": test_loss,
           "test_acc": test_acc, "img_per_s": images / p["seconds"], "epoch_s": p["seconds"] + eval_s}
    if p["resumed_at_step"] is not None:
        row["resumed_at_step"] = p["resumed_at_step"]  # trained in two sessions; the totals cover the whole epoch
    improved = test_acc > state["best_acc"]
    if test_acc >= cfg.target_acc and state["target_epoch"] is None:
        state["target_epoch"], state["target_wall_s"] = epoch + 1, state["wall_s"]
    state["history"].append(row)
    state["best_acc"] = max(state["best_acc"], test_acc)
    state["epoch"], state["step_in_epoch"], state["partial"] = epoch + 1, 0, None
    return row, confusion, improved


def assert_ranks_agree(model):
    """DDP keeps replicas identical; check it cheaply (one number per rank) after every epoch."""
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().view(1)
    every = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(every, total)
    assert all(torch.equal(t, every[0]) for t in every), f"ranks disagree on the weights: {every}"


# --- what a person sees: console, progress bar, TensorBoard, summary.json (rank 0 only) ---------

# TensorBoard tags. Its dashboard groups them by the part before "/", in alphabetical order: the
# curves (accuracy, loss, lr) come first, then the pictures, the per-class results and the speeds.
STEP_TAGS = {"loss": "loss/train_step", "acc": "accuracy/train_step", "lr": "lr/step", "img_per_s": "throughput/step_img_per_s"}
EPOCH_TAGS = {"train_loss": "loss/train", "test_loss": "loss/test", "train_acc": "accuracy/train", "test_acc": "accuracy/test",
              "lr": "lr/epoch", "img_per_s": "throughput/train_img_per_s", "epoch_s": "time/epoch_s"}


class Logger:
    """Everything a person sees, from rank 0: console lines, the progress bar, TensorBoard, summary.json."""

    def __init__(self, cfg, env):
        self.cfg, self.env = cfg, env
        print("config:", json.dumps(dataclasses.asdict(cfg)))
        print(f"loading {'generated --smoke data' if cfg.smoke else cfg.data} ...", flush=True)

    def start(self, run_dir, model, steps_per_epoch, state, notes, check, sizes):
        """Once data, model and compile are ready: the run folder's writer, the facts, the bar."""
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        cfg, env = self.cfg, self.env
        self.run_dir, self.state = run_dir, state
        self.facts = {**run_facts(env), "params": count_params(model), "compiled": check.compiled,
                      "compile_s": check.seconds if cfg.compile else None, "compile_graphs": check.graphs,
                      "compile_error": check.error, "eager_error": check.eager_error,
                      "train_images": sizes[0], "test_images": sizes[1]}
        self.total = total_steps(cfg, steps_per_epoch)
        self.logs = 0
        self.memory = train_memory_bytes(model, cfg.batch_size // env.world)
        self.writer = SummaryWriter(run_dir, flush_secs=10)  # curves show up while the first epoch runs
        print(f"device: {self.facts['device']} x {env.world}, params {self.facts['params']:,}, "
              f"{steps_per_epoch} steps/epoch of {cfg.batch_size}, {self.total} steps in all"
              + (f", compiled {check.graphs} graphs in {check.seconds:.0f} s (error against fp32 {check.error:.1e}, "
                 f"eager bf16 {check.eager_error:.1e})" if check.compiled else ""))
        print(f"threads: torch {env.threads}, DALI {env.dali_threads} ({env.threads_why})")
        notes = notes + [check.note]
        for note in notes + [warmup_steps(cfg, steps_per_epoch)[1]]:
            if note:
                print(f"note: {note}")
        epochs = math.ceil(self.total / steps_per_epoch) - state["epoch"]
        print(f"training {plural(epochs, 'epoch')}, {plural(self.total - state['step'], 'step')}; run folder {run_dir}",
              flush=True)
        self.bar = tqdm(total=self.total, initial=state["step"], unit="step", dynamic_ncols=True, leave=False)

    def augmentations(self, images, names):
        from pipelines.preview import augment_grid

        self.writer.add_image("pictures/augmentations", augment_grid(images, names=names, draws=6, zoom=3),
                              dataformats="HWC")

    def step(self, epoch, step, m):
        """At log steps: the bar, per-step TensorBoard scalars, and on CPU one notice of the cost."""
        self.bar.set_description(f"epoch {epoch + 1}/{self.cfg.epochs}", refresh=False)
        self.bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['acc']:.1%}", img_s=f"{m['img_per_s']:,.0f}", refresh=False)
        self.bar.update(step + 1 - self.bar.n)
        for key, value in m.items():
            self.writer.add_scalar(STEP_TAGS[key], value, step + 1)
        self.logs += 1
        if self.logs == 2 and self.env.device.type == "cpu":  # the 2nd log: past the first step's start-up
            self.cost_notice(m["img_per_s"], step)

    def cost_notice(self, img_per_s, step):
        seconds = (self.total - step - 1) * self.cfg.batch_size / img_per_s
        if seconds > 900:  # a quarter of an hour: longer than the short run suggested below
            self.bar.write(f"note: on CPU at {img_per_s:,.0f} img/s this run needs about {seconds / 3600:.1f} h more and "
                           f"{self.memory / 1e9:.1f} GB of memory; for a short run that visibly learns try "
                           f"`{SHORT_RUN}` ({SHORT_RUN_RESULT}), and for less memory a smaller --batch-size "
                           f"(scale --lr with it)")

    def epoch(self, row):
        for key, tag in EPOCH_TAGS.items():
            self.writer.add_scalar(tag, row[key], row["epoch"])
        self.writer.add_scalar("accuracy/best_test", self.state["best_acc"], row["epoch"])
        self.summary(complete=False)
        self.bar.write(f"epoch {row['epoch']:3d}/{self.cfg.epochs} | train loss {row['train_loss']:.3f} "
                       f"acc {row['train_acc']:6.2%} | test loss {row['test_loss']:.3f} acc {row['test_acc']:6.2%} | "
                       f"lr {row['lr']:.2e} | {row['img_per_s']:8,.0f} img/s | {row['epoch_s']:5.1f} s"
                       + (f" (resumed at step {row['resumed_at_step']})" if "resumed_at_step" in row else ""))

    def summary(self, complete):
        state = self.state
        h = state["history"]
        write_json({"config": dataclasses.asdict(self.cfg), **self.facts, "complete": complete,
                    "best_acc": state["best_acc"], "final_acc": h[-1]["test_acc"] if h else None,
                    "epochs_run": len(h), "steps": state["step"], "wall_s": state["wall_s"], "train_s": state["train_s"],
                    "mean_train_img_per_s": float(np.mean([e["img_per_s"] for e in h])) if h else None,
                    "target_acc": self.cfg.target_acc, "epoch_to_target": state["target_epoch"],
                    "wall_s_to_target": state["target_wall_s"], "history": h}, self.run_dir / "summary.json")

    def finish(self, confusion):
        from pipelines.preview import confusion_image

        state = self.state
        self.bar.close()
        final, last = state["history"][-1]["test_acc"], state["epoch"]
        for i, name in enumerate(CLASSES):
            self.writer.add_scalar(f"test_class_accuracy/{name}", (confusion[i, i] / confusion[i].sum().clamp_min(1)).item(), last)
        self.writer.add_image("pictures/confusion_matrix", confusion_image(confusion.numpy(), CLASSES), last,
                              dataformats="HWC")
        self.hparams()
        self.writer.close()
        self.summary(complete=True)
        reached = (f"reached {self.cfg.target_acc:.0%} at epoch {state['target_epoch']} ({state['target_wall_s']:.1f} s)"
                   if state["target_epoch"] else f"did not reach {self.cfg.target_acc:.0%}")
        print(f"done: best test acc {state['best_acc']:.2%}, final {final:.2%}, {reached}; {self.run_dir}/summary.json")

    def hparams(self):
        """The resolved settings in TensorBoard's HPARAMS table, beside the final and best test accuracy.

        Its metrics are the `accuracy/test` and `accuracy/best_test` curves themselves (their last
        values), not extra single-point charts; what is not a number is text there ("true", "none")."""
        from torch.utils.tensorboard.summary import hparams

        settings = {**dataclasses.asdict(self.cfg), "compiled": self.facts["compiled"]}
        settings = {k: v if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v).lower()
                    for k, v in settings.items()}
        for summary in hparams(settings, {"accuracy/test": None, "accuracy/best_test": None}):
            self.writer.file_writer.add_summary(summary)

    def stopped(self, stop, where):
        self.bar.close()
        self.writer.close()
        self.summary(complete=False)
        print(f"stopped at {where}, saved; continue with: {resume_command(self.run_dir)}", file=sys.stderr)
        return stop.exit_code

    def error(self, message):
        self.bar.close()
        self.writer.close()
        print(f"error: {message}", file=sys.stderr)
        return 1


def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def resume_command(run_dir):
    """How to continue `run_dir`, written the way this run was started, so that it pastes as it is."""
    flag = f"--resume {shlex.quote(str(run_dir))}"
    if "MAKELEVEL" in os.environ:  # started by `make train` (or `make smoke`)
        return f'make train ARGS="{flag}"'
    if "RANK" in os.environ:
        return f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', 1)} {shlex.quote(sys.argv[0])} {flag}"
    python = os.path.relpath(sys.executable)  # .venv/bin/python, say: as typed, from the checkout
    return f"{shlex.quote(sys.executable if python.startswith('..') else python)} {shlex.quote(sys.argv[0])} {flag}"


class NullLogger:
    """Ranks other than 0 log nothing: every Logger method, doing nothing (and the same exit codes)."""

    def stopped(self, stop, where):
        return stop.exit_code

    def error(self, message):
        return 1

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def exit_rank(code):
    """Leave a torchrun rank without tearing the interpreter down.

    A finished rank could abort (SIGABRT, "terminate called without an active exception") after
    its last line of Python, in 3 of 41 two-rank CPU runs under load, with no Python frame on the
    stack: the signature of a native thread (gloo's or DALI's) reaching for the GIL while the
    interpreter is finalized (see PyTorch PR #179291). So: free what reference cycles still hold
    while Python is alive, close the process group, flush, and exit without finalizing.
    Everything the run writes is closed and renamed by now.
    """
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        code = main()
    except (UserError, DataError) as e:  # the user's to fix: one line, no traceback, exit 2
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        code = 2
    if "RANK" in os.environ:
        exit_rank(code)
    sys.exit(code)
