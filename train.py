"""Train the seed CNN on CIFAR-10: `python train.py` (`make train`), `python train.py --help`.

On CUDA: DALI on the GPU, bf16 autocast, channels_last, torch.compile (checked against eager
before use). On CPU: the same code in fp32, eager. Multi-GPU: `torchrun --nproc_per_node N
train.py`; --batch-size is the global batch, split evenly over the ranks, so the recipe (and its
learning rate) does not change with N.

Writes runs/<name>/: TensorBoard events, last.pt and best.pt (atomic, every epoch), summary.json.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from net import build_model, count_params
from pipelines import CLASSES, Augment, DataError, load_cifar10, make_loader

# --- configuration ------------------------------------------------------------------------------

RECIPES = {
    # SGD + Nesterov with a short warm-up and a linear decay to 0, label smoothing, a large batch:
    # the usual way to reach a fixed accuracy in few epochs. Weight decay skips BN and biases.
    # Chosen from practice, not yet measured on a GPU here (see README).
    "fast": dict(epochs=15, batch_size=512, optimizer="sgd", lr=0.2, weight_decay=5e-4, label_smoothing=0.1,
                 schedule="onecycle", warmup_epochs=2.0, dropout=0.05, eval_batch_size=1000),
    # The original design: Adam 1e-3, ReduceLROnPlateau on test loss, batch 128, 63 epochs.
    "seed": dict(epochs=63, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=0.0, label_smoothing=0.0,
                 schedule="plateau", warmup_epochs=0.0, dropout=0.1, eval_batch_size=1000),
}
# `--smoke`: the whole path end to end in well under two minutes on a CPU, no download.
SMOKE = dict(epochs=1, batch_size=16, eval_batch_size=64, device="cpu", compile=False)
SMOKE_SIZES = {"train": 256, "test": 128}


@dataclass
class Config:
    data: str = field(default="data", metadata={"help": "anything load_cifar10 accepts (`make data` fills data/)"})
    source: str = field(default="raw", metadata={"choices": ["raw", "encoded"],
                        "help": "raw: uint8 arrays resident on device; encoded: JPEG/PNG decoded by DALI every epoch"})
    recipe: str = field(default="fast", metadata={"choices": list(RECIPES), "help": "preset for the fields left unset"})
    epochs: int = field(default=None, metadata={"help": "training epochs"})
    batch_size: int = field(default=None, metadata={"help": "global batch, images per step over all ranks"})
    optimizer: str = field(default=None, metadata={"choices": ["sgd", "adam"]})
    lr: float = field(default=None, metadata={"help": "peak learning rate (sgd: Nesterov, momentum 0.9)"})
    weight_decay: float = field(default=None, metadata={"help": "on conv and linear weights only"})
    label_smoothing: float = field(default=None)
    schedule: str = field(default=None, metadata={"choices": ["onecycle", "plateau"],
                          "help": "onecycle: linear warm-up then linear decay to 0, per step; plateau: x0.5 after 3 epochs without test-loss gain"})
    warmup_epochs: float = field(default=None)
    dropout: float = field(default=None, metadata={"help": "after every conv"})
    eval_batch_size: int = field(default=None, metadata={"help": "1000 divides 10,000: one shape for the compiled model"})
    seed: int = field(default=0, metadata={"help": "model init, shuffling and augmentation all follow from it"})
    device: str = field(default=None, metadata={"choices": ["auto", "cuda", "cpu"], "help": "default: cuda when available"})
    compile: bool = field(default=None, metadata={"help": "torch.compile (default: on with CUDA, off on CPU)"})
    compile_mode: str = field(default="default", metadata={"help": "torch.compile mode, e.g. max-autotune"})
    target_acc: float = field(default=0.85, metadata={"help": "record when test accuracy first reaches this"})
    runs: str = field(default="runs", metadata={"help": "parent folder of run folders"})
    name: str = field(default=None, metadata={"help": "run folder name (default: date-time-recipe)"})
    resume: str = field(default=None, metadata={"help": "continue the run in this folder from its last.pt"})
    log_every: int = field(default=25, metadata={"help": "steps between progress-bar updates (each is a GPU sync)"})
    smoke: bool = field(default=False, metadata={"help": "tiny generated dataset, 1 epoch on CPU: checks the whole path"})


def parse_config(argv=None):
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Config):
        flag, help_ = "--" + f.name.replace("_", "-"), f.metadata.get("help")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            parser.add_argument(flag, type=f.type, default=f.default, choices=f.metadata.get("choices"), help=help_)
    cfg = Config(**vars(parser.parse_args(argv)))
    if cfg.resume:  # the saved configuration, whole: the run goes on exactly as it began
        run_dir = Path(cfg.resume)
        cfg = Config(**load_checkpoint(run_dir / "last.pt", parser)["config"])
        cfg.resume, cfg.runs, cfg.name = str(run_dir), str(run_dir.parent), run_dir.name
    # Unset fields come from --smoke, then from the recipe.
    for key, value in {**RECIPES[cfg.recipe], **(SMOKE if cfg.smoke else {})}.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    cfg.name = cfg.name or time.strftime("%Y%m%d-%H%M%S-") + ("smoke" if cfg.smoke else cfg.recipe)
    check_config(cfg, parser)
    return cfg, parser


def check_config(cfg, parser):
    """Every user mistake becomes an argparse error (exit 2) here, before any work starts."""
    for key in ("epochs", "batch_size", "eval_batch_size", "log_every"):
        if getattr(cfg, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1, not {getattr(cfg, key)}")
    if cfg.lr <= 0:
        parser.error(f"--lr must be positive, not {cfg.lr}")
    if not 0 <= cfg.dropout < 1 or not 0 <= cfg.label_smoothing < 1:
        parser.error("--dropout and --label-smoothing must be in [0, 1)")
    if not 0 < cfg.target_acc <= 1:
        parser.error(f"--target-acc is a fraction in (0, 1], not {cfg.target_acc}")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch_size % world:
        parser.error(f"--batch-size {cfg.batch_size} does not split evenly over {world} ranks")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available; use --device cpu")
    if not cfg.smoke and not Path(cfg.data).exists():
        parser.error(f"--data {cfg.data} does not exist; run `make data` (or `make data SRC=/path/to/copy`)")
    run_dir = Path(cfg.runs) / cfg.name
    if not cfg.resume and (run_dir / "last.pt").exists():
        parser.error(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --name")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=run_dir).close()
    except OSError as e:
        parser.error(f"cannot write the run folder {run_dir} ({e.strerror}); pick another --runs or --name")


# --- device, precision, compile: decided once, here ---------------------------------------------

@dataclass
class Env:
    device: torch.device
    autocast: object  # a context manager factory: bf16 autocast on CUDA, nothing on CPU
    rank: int = 0
    world: int = 1
    ddp: bool = False

    @property
    def master(self):
        return self.rank == 0

    @property
    def name(self):
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"


def setup_env(cfg):
    ddp = "RANK" in os.environ  # started by torchrun
    cuda = cfg.device == "cuda" or (cfg.device in (None, "auto") and torch.cuda.is_available())
    rank, world, local = 0, 1, 0
    if ddp:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        if cuda:
            torch.cuda.set_device(local)  # before anything touches CUDA, or ranks pile onto GPU 0
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    return Env(device=device, autocast=autocast, rank=rank, world=world, ddp=ddp)


def compile_checked(model, x, env, mode):
    """torch.compile, used only if it agrees with eager on `x` (max relative error 1e-2).

    Inductor's max-autotune conv template has returned wrong results (PyTorch issue #173068).
    """
    compiled = torch.compile(model, mode=mode)
    was_training = model.training
    model.eval()
    with torch.no_grad(), env.autocast():
        eager, out = model(x).float(), compiled(x).float()
    model.train(was_training)
    err = ((out - eager).abs().max() / eager.abs().max().clamp_min(1e-6)).item()  # sync: once, at start
    if not err <= 1e-2:
        print(f"warning: compiled model disagrees with eager (max relative error {err:.2e}); training eager")
        return model
    return compiled


# --- one step, one evaluation -------------------------------------------------------------------

def train_step(model, optimizer, x, y, *, label_smoothing=0.0, autocast=contextlib.nullcontext):
    """Forward, backward, update. Returns (loss, correct) as device tensors: no host sync."""
    with autocast():
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.detach().argmax(1) == y).sum()


@torch.no_grad()
def evaluate(model, loader, env):
    """(mean loss, accuracy, confusion matrix [true, predicted]) over all ranks' shards."""
    model.eval()
    loss_sum = torch.zeros((), device=env.device)
    confusion = torch.zeros(100, dtype=torch.long, device=env.device)
    for x, y in loader:
        with env.autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        confusion += torch.bincount(y * 10 + logits.argmax(1), minlength=100)
    model.train()
    if env.ddp:
        dist.all_reduce(loss_sum)
        dist.all_reduce(confusion)
    confusion = confusion.view(10, 10).cpu()  # sync: once per evaluation
    n = confusion.sum().item()
    return loss_sum.item() / n, confusion.diag().sum().item() / n, confusion


# --- checkpoints ------------------------------------------------------------------------------

def save_atomic(obj, path):
    """torch.save to a temporary name beside `path`, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(obj, path):
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def load_checkpoint(path, parser):
    """weights_only=True: tensors and plain data only, no code runs. Bad files exit 2, one line."""
    if not Path(path).exists():
        parser.error(f"no checkpoint at {path}; --resume takes a run folder that holds last.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        Config(**ckpt["config"])
        return ckpt
    except Exception as e:  # truncated zip, foreign pickle, another project's file: all one message
        parser.error(f"cannot resume from {path}: corrupt or incompatible checkpoint ({str(e).splitlines()[0][:120]})")


# --- pictures for TensorBoard -------------------------------------------------------------------

def confusion_image(confusion, classes=CLASSES, cell=44):
    """uint8 HWC heat map of a confusion matrix, rows = true class, row-normalised, with counts."""
    from PIL import Image, ImageDraw

    rates = confusion.double() / confusion.sum(1, keepdim=True).clamp_min(1)
    label_w, n = 80, len(classes)
    img = Image.new("RGB", (label_w + n * cell, label_w + n * cell), "white")
    draw = ImageDraw.Draw(img)
    for i in range(n):
        draw.text((4, label_w + i * cell + cell // 3), classes[i][:10], fill="black")  # true class rows
        draw.text((label_w + i * cell + 2, label_w - 14), classes[i][:6], fill="black")  # predicted columns
        for j in range(n):
            shade = int(255 * (1 - rates[i, j].item()))
            box = (label_w + j * cell, label_w + i * cell, label_w + (j + 1) * cell - 1, label_w + (i + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255))
            draw.text((box[0] + 4, box[1] + cell // 3), str(int(confusion[i, j])), fill="white" if shade < 128 else "black")
    draw.text((4, 4), "true (rows) vs predicted (columns)", fill="black")
    return np.asarray(img)


# --- data ---------------------------------------------------------------------------------------

def smoke_data(split, seed=0):
    """A tiny learnable set: each class its own colour, plus noise."""
    rng = np.random.default_rng(seed + (split == "test"))
    n = SMOKE_SIZES[split]
    labels = np.arange(n) % 10
    palette = np.random.default_rng(seed).integers(30, 225, (10, 3))
    images = palette[labels][:, None, None, :] + rng.normal(0, 25, (n, 32, 32, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


def loaders(cfg, env):
    def load(split):
        if cfg.smoke:
            return smoke_data(split, cfg.seed)
        return load_cifar10(cfg.data, split, encoded=cfg.source == "encoded")

    common = dict(device=str(env.device), seed=cfg.seed, shard_id=env.rank, num_shards=env.world,
                  dtype=torch.bfloat16 if env.device.type == "cuda" else torch.float32)
    train = make_loader(*load("train"), batch_size=cfg.batch_size // env.world, train=True, augment=Augment(), **common)
    test = make_loader(*load("test"), batch_size=cfg.eval_batch_size, train=False, **common)
    return train, test


def make_optimizer(cfg, model):
    decay = [p for p in model.parameters() if p.ndim > 1]  # conv and linear weights
    rest = [p for p in model.parameters() if p.ndim <= 1]  # BN and biases: decay only hurts them
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    return torch.optim.Adam(groups, lr=cfg.lr)


def make_scheduler(cfg, optimizer, steps_per_epoch):
    if cfg.schedule == "plateau":  # stepped once per epoch with the test loss
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=3)
    total, warmup = cfg.epochs * steps_per_epoch, max(1, round(cfg.warmup_epochs * steps_per_epoch))

    def factor(step):  # of the peak lr: 0.1 -> 1 over the warm-up, then linearly to 0 at the end
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except OSError:
        return None


# --- the run ------------------------------------------------------------------------------------

class StopRequested:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves, and exits 130/143."""

    def __init__(self):
        self.signum = None
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self.handle)

    def handle(self, signum, frame):
        self.signum = signum

    @property
    def exit_code(self):
        return 128 + self.signum


def main(argv=None):
    cfg, parser = parse_config(argv)
    env = setup_env(cfg)
    stop = StopRequested()
    run_dir = Path(cfg.runs) / cfg.name
    torch.manual_seed(cfg.seed)
    try:
        train_loader, test_loader = loaders(cfg, env)
    except (DataError, ValueError) as e:
        parser.error(str(e))

    model = build_model(dropout=cfg.dropout).to(env.device, memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    steps_per_epoch = len(train_loader)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch)
    state = {"epoch": 0, "step_in_epoch": 0, "best_acc": 0.0, "history": [], "train_s": 0.0, "wall_s": 0.0,
             "target_epoch": None, "target_wall_s": None}
    if cfg.resume:
        ckpt = load_checkpoint(run_dir / "last.pt", parser)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if env.device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], env.device)
        state = ckpt["state"]
        train_loader.load_state_dict(ckpt["loader"])
    train_loader.set_epoch(state["epoch"], skip=state["step_in_epoch"])

    if env.master:
        print("config:", json.dumps(dataclasses.asdict(cfg)))
        print(f"device: {env.name} x {env.world}, "
              f"params {count_params(model):,}, {steps_per_epoch} steps/epoch of {cfg.batch_size}")
    fast_model = model
    if cfg.compile if cfg.compile is not None else env.device.type == "cuda":
        x0, _ = next(iter(test_loader))
        fast_model = compile_checked(model, x0, env, cfg.compile_mode)
    train_model = torch.nn.parallel.DistributedDataParallel(fast_model) if env.ddp else fast_model

    writer = None
    if env.master:
        from torch.utils.tensorboard import SummaryWriter

        from pipelines.preview import augment_grid

        writer = SummaryWriter(run_dir)
        if not cfg.resume:
            sample = smoke_data("test")[0][:6] if cfg.smoke else load_cifar10(cfg.data, "test")[0][:6]
            writer.add_image("augmentations", augment_grid(sample, draws=6, zoom=3), dataformats="HWC")

    def checkpoint(path, epoch, step_in_epoch):
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng_cpu": torch.get_rng_state(),
                     "rng_cuda": torch.cuda.get_rng_state(env.device) if env.device.type == "cuda" else None,
                     "loader": {"epoch": epoch, "seed": cfg.seed},
                     "state": {**state, "epoch": epoch, "step_in_epoch": step_in_epoch},
                     "config": dataclasses.asdict(cfg)}, path)

    def summary(final_acc):
        h = state["history"]
        write_json_atomic({
            "config": dataclasses.asdict(cfg), "commit": git_commit(),
            "device": env.name,
            "world_size": env.world, "torch": torch.__version__, "dali": dali_version(),
            "params": count_params(model), "best_acc": state["best_acc"], "final_acc": final_acc,
            "epochs_run": len(h), "wall_s": state["wall_s"], "train_s": state["train_s"],
            "mean_train_img_per_s": float(np.mean([e["img_per_s"] for e in h])) if h else None,
            "target_acc": cfg.target_acc, "epoch_to_target": state["target_epoch"],
            "wall_s_to_target": state["target_wall_s"], "history": h,
        }, run_dir / "summary.json")

    from tqdm import tqdm

    if env.master:
        print(f"training {cfg.epochs - state['epoch']} epochs; run folder {run_dir}", flush=True)
    final_acc = None
    for epoch in range(state["epoch"], cfg.epochs):
        wall0 = time.perf_counter()
        sums = torch.zeros(2, device=env.device)  # loss * n, correct: summed on device, no sync
        bad_step = torch.full((), -1, device=env.device)  # first step whose loss was not finite
        first = state["step_in_epoch"]
        bar = tqdm(train_loader, total=steps_per_epoch, initial=first, disable=not env.master, leave=False,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", dynamic_ncols=True)
        step, n = first, 0  # n: images this rank trained on (a host count: no transfer per step)
        for step, (x, y) in enumerate(bar, start=first):
            loss, correct = train_step(train_model, optimizer, x, y, label_smoothing=cfg.label_smoothing,
                                       autocast=env.autocast)
            if cfg.schedule == "onecycle":
                scheduler.step()
            sums += torch.stack([loss * len(y), correct.float()])
            n += len(y)
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step, bad_step)
            if step % cfg.log_every == 0 or step == steps_per_epoch - 1 or stop.signum:
                if bad_step.item() >= 0:  # sync: on log steps only
                    return stop_nonfinite(env, epoch, bad_step.item(), run_dir)
                s = sums.tolist()  # sync: on log steps only
                bar.set_postfix(loss=f"{s[0] / n:.3f}", acc=f"{s[1] / n:.1%}",
                                img_s=f"{n * env.world / max(bar.format_dict['elapsed'], 1e-9):,.0f}")
            if stop.signum:
                break
        if env.device.type == "cuda":
            torch.cuda.synchronize()  # the epoch's work is done before the clock stops
        train_s = time.perf_counter() - wall0
        if stop.signum:
            if env.master:
                checkpoint(run_dir / "last.pt", epoch, step + 1)
                print(f"\nstopped by signal {stop.signum} at epoch {epoch + 1}, step {step + 1}; "
                      f"continue with: python train.py --resume {run_dir}", file=sys.stderr)
            return stop.exit_code
        if env.ddp:
            dist.all_reduce(sums)
            for b in model.buffers():  # evaluate every rank with rank 0's BatchNorm statistics
                dist.broadcast(b, 0)
        n *= env.world  # equal shards: every rank trains on the same number of images
        train_loss, train_acc = (sums / n).tolist()  # sync: once per epoch
        test_loss, test_acc, confusion = evaluate(fast_model, test_loader, env)
        if cfg.schedule == "plateau":
            scheduler.step(test_loss)
        state["train_s"] += train_s
        state["wall_s"] += time.perf_counter() - wall0
        state["step_in_epoch"] = 0
        row = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss, "test_acc": test_acc,
               "img_per_s": n / train_s,  # images this process trained on since the epoch (re)started
               "epoch_s": time.perf_counter() - wall0}
        state["history"].append(row)
        if env.ddp:
            assert_ranks_agree(model)
        if test_acc >= cfg.target_acc and state["target_epoch"] is None:
            state["target_epoch"], state["target_wall_s"] = epoch + 1, state["wall_s"]
        final_acc = test_acc
        if not env.master:
            continue
        improved = test_acc > state["best_acc"]
        state["best_acc"] = max(state["best_acc"], test_acc)
        checkpoint(run_dir / "last.pt", epoch + 1, 0)
        if improved:
            checkpoint(run_dir / "best.pt", epoch + 1, 0)
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
            writer.add_scalar(key.replace("_", "/", 1) if "_" in key else key, row[key], epoch + 1)
        writer.add_scalar("throughput/train_img_per_s", row["img_per_s"], epoch + 1)
        writer.add_scalar("time/epoch_s", row["epoch_s"], epoch + 1)
        summary(final_acc)
        tqdm.write(f"epoch {epoch + 1:3d}/{cfg.epochs} | train loss {train_loss:.3f} acc {train_acc:6.2%} | "
                   f"test loss {test_loss:.3f} acc {test_acc:6.2%} | lr {row['lr']:.2e} | "
                   f"{row['img_per_s']:8,.0f} img/s | {row['epoch_s']:5.1f} s")

    if env.master and final_acc is not None:
        for i, name in enumerate(CLASSES):
            writer.add_scalar(f"test_class/{name}", (confusion[i, i] / confusion[i].sum().clamp_min(1)).item(), cfg.epochs)
        writer.add_image("test/confusion_matrix", confusion_image(confusion), cfg.epochs, dataformats="HWC")
        hparams = {k: v for k, v in dataclasses.asdict(cfg).items() if isinstance(v, (int, float, str, bool))}
        writer.add_hparams(hparams, {"hparam/best_acc": state["best_acc"], "hparam/final_acc": final_acc}, run_name=".")
        writer.close()
        reached = (f"reached {cfg.target_acc:.0%} at epoch {state['target_epoch']} ({state['target_wall_s']:.1f} s)"
                   if state["target_epoch"] else f"did not reach {cfg.target_acc:.0%}")
        print(f"done: best test acc {state['best_acc']:.2%}, final {final_acc:.2%}, {reached}; {run_dir}/summary.json")
    if env.ddp:
        dist.destroy_process_group()
    return 0


def stop_nonfinite(env, epoch, step, run_dir):
    if env.master:
        print(f"error: non-finite loss at epoch {epoch + 1}, step {step + 1}; stopped. "
              f"The last good checkpoint is {run_dir / 'last.pt'} (try a lower --lr)", file=sys.stderr)
    return 1


def assert_ranks_agree(model):
    """DDP keeps replicas identical; check it cheaply (one number per rank) after every epoch."""
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().view(1)
    every = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(every, total)
    assert all(torch.equal(t, every[0]) for t in every), f"ranks disagree on the weights: {every}"


def dali_version():
    import nvidia.dali

    return nvidia.dali.__version__


if __name__ == "__main__":
    sys.exit(main())
