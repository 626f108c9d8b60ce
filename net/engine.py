"""The training engine: what train.py runs and the bench times, defined once.

- configuration: `Config` (one dataclass, one field per train.py flag), `RECIPES`, `resolve`;
- the device decision: `Env`, `setup_env` (device, bf16 autocast, DDP), `compile_checked`;
- the work: `train_step`, `train_epoch` (the whole loop of one epoch), `evaluate`;
- the recipe's parts: `make_optimizer`, `make_scheduler`;
- around a run: atomic checkpoints read with weights_only, `StopSignal` (Ctrl-C), `run_facts`.

Nothing here prints or logs: train.py's logger does, and the bench passes no logger.
"""
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


class UserError(Exception):
    """A mistake in the user's flags, files or folders: the message is one line, with the fix."""


# --- configuration ------------------------------------------------------------------------------

RECIPES = {
    # SGD + Nesterov with a short warm-up and a linear decay to 0, label smoothing, a large batch:
    # the usual way to reach a fixed accuracy in few epochs. Weight decay skips BN and biases.
    # Chosen from practice, not yet measured on a GPU here (see README).
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
    warmup_epochs: float = field(default=None, metadata={"help": "onecycle warm-up; at most a tenth of a short run"})
    dropout: float = field(default=None, metadata={"help": "after every conv"})
    eval_batch_size: int = field(default=None, metadata={"help": "1000 divides 10,000: one shape for the compiled model"})
    limit_train: int = field(default=None, metadata={"help": "train on a class-balanced sample of this many images"})
    limit_test: int = field(default=None, metadata={"help": "evaluate on a class-balanced sample of this many images"})
    max_steps: int = field(default=None, metadata={"help": "stop after this many optimizer steps; the schedule ends there"})
    seed: int = field(default=0, metadata={"help": "model init, sampling, shuffling and augmentation all follow from it"})
    device: str = field(default=None, metadata={"choices": ["cuda", "cpu"], "help": "default: cuda when available"})
    compile: bool = field(default=None, metadata={"help": "torch.compile (default: on with CUDA, off on CPU)"})
    compile_mode: str = field(default="default", metadata={"help": "torch.compile mode, e.g. max-autotune"})
    threads: int = field(default=None, metadata={"help": "torch's CPU threads (default on CPU: the cores idle at start)"})
    bn_reestimate: int = field(default=None, metadata={
        "help": "re-estimate BatchNorm statistics on this many train images before each evaluation, 0 to never "
                "(default: 1000 in runs of under 500 steps, whose running averages lag the weights)"})
    target_acc: float = field(default=0.85, metadata={"help": "record when test accuracy first reaches this"})
    runs: str = field(default="runs", metadata={"help": "parent folder of run folders"})
    name: str = field(default=None, metadata={"help": "run folder name (default: date-time-recipe)"})
    resume: str = field(default=None, metadata={"help": "continue the run in this folder from its last.pt"})
    log_every: int = field(default=None, metadata={"help": "steps between logs, each a host sync (default: 25 on cuda, 1 on cpu)"})
    smoke: bool = field(default=False, metadata={"help": "tiny generated dataset, 1 epoch on CPU: checks the whole path"})


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


# --- device, precision, compile: decided once, here ---------------------------------------------

@dataclass
class Env:
    device: torch.device
    autocast: object = contextlib.nullcontext  # a context factory: bf16 autocast on CUDA, nothing on CPU
    dtype: torch.dtype = torch.float32  # of the batches the loader hands the model: bf16 on CUDA (half the bytes)
    rank: int = 0
    world: int = 1
    ddp: bool = False
    threads: int = None  # torch's intra-op CPU threads (None: as torch set them)
    dali_threads: int = 1  # DALI's CPU threads: its CPU operators, and on a GPU the CPU side of the graph
    threads_why: str = ""  # how the counts were chosen, for the start line

    @property
    def master(self):
        return self.rank == 0

    @property
    def name(self):
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def setup_env(cfg):
    """Device, precision and ranks for `cfg.device` ("cuda" or "cpu"); torchrun's variables mean DDP."""
    ddp, cuda = "RANK" in os.environ, cfg.device == "cuda"
    rank, world, local = 0, 1, 0
    if ddp:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        if cuda:
            torch.cuda.set_device(local)  # before anything touches CUDA, or ranks pile onto GPU 0
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        configure_cuda()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cores, idle = len(os.sched_getaffinity(0)), idle_cores()
    if cuda:  # the GPU does the work; DALI's CPU side (callbacks, argument inputs) gets a few threads
        threads, dali_threads = cfg.threads or torch.get_num_threads(), max(1, min(4, cores // local_world))
    else:
        # The model is ~1000x the pipeline's CPU work: torch gets the cores and DALI one thread. Only
        # the cores idle now: torch's threads wait for each other at every op, so one thread short of
        # a core (another busy process) cost 2.3x here (6-7 against 16 img/s; 11 with one thread).
        threads, dali_threads = cfg.threads or max(1, idle // local_world), 1
    torch.set_num_threads(threads)
    why = f"{cores} cores, {idle} idle at start" + (f", {local_world} ranks on this machine" if local_world > 1 else "")
    return Env(device=torch.device(f"cuda:{local}" if cuda else "cpu"), autocast=bf16_autocast if cuda else contextlib.nullcontext,
               dtype=torch.bfloat16 if cuda else torch.float32, rank=rank, world=world, ddp=ddp, threads=threads,
               dali_threads=dali_threads, threads_why=why + (", --threads given" if cfg.threads else ""))


def idle_cores(seconds=0.2):
    """How many of the cores this process may use were idle over `seconds` (/proc/stat; all of them
    where that cannot be read): a busy process elsewhere takes a core from our threads."""
    allowed = len(os.sched_getaffinity(0))

    def idle_and_total():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, all

    try:
        idle0, total0 = idle_and_total()
        time.sleep(seconds)
        idle1, total1 = idle_and_total()
    except (OSError, ValueError, IndexError):
        return allowed
    busy = round((1 - (idle1 - idle0) / max(1, total1 - total0)) * (os.cpu_count() or allowed))
    return max(1, min(allowed, (os.cpu_count() or allowed) - busy))


def configure_cuda():
    """The CUDA settings training runs with (the bench calls this too, so it times the same thing)."""
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    # TF32 through the legacy flags only: mixing them with the new fp32_precision API makes Inductor raise.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def bf16_autocast():
    """The CUDA precision: matmuls and convs in bf16 (no loss scaling needed), reductions in fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16)


@dataclass
class CompileCheck:
    """What `compile_checked` found. `model` is what to run; `compiled` is the one flag read everywhere."""
    model: torch.nn.Module
    compiled: bool
    seconds: float = 0.0  # compiling and running every graph the trainer needs
    graphs: int = 0  # Dynamo graphs built: the trainer needs exactly two (eval forward; train forward + backward)
    error: float = None  # max |compiled - fp32 eager| / max |fp32 eager|, eval forward
    eager_error: float = None  # the same for eager at the training precision: what rounding alone costs
    note: str = None  # why it fell back to eager, for the log


def relative_error(out, reference):
    return ((out.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-6)).item()  # sync: at start


def compile_checked(model, env, *, eval_batch, train_batch, mode="default", compiler=None):
    """torch.compile with static shapes, used only if every graph the trainer needs compiles and agrees.

    Both graphs are built and run here, not lazily inside the first step: the eval forward at
    `eval_batch` (compared, with eager at the training precision, against an fp32 eager
    reference: accepted when the compiled error is at most twice eager's plus 1e-4), and a
    training forward + backward at `train_batch` (loss and gradients must be finite; dropout
    draws differ between Inductor and eager, so its values are not compared). The training pass
    runs on `model` itself, whose weights, BatchNorm statistics, gradients and RNG are restored
    after, so the graph built is the one the trainer will hit. Any compiler exception, or a
    disagreement, means eager with a note; under DDP all ranks run eager if any rank rejects.
    `compiler` stands in for torch.compile (the tests pass failing and wrong ones).

    dynamic=False: evaluation and training run different batch sizes, and a second shape would
    otherwise turn the graph into a dynamic-shape one. Past Dynamo's recompile limit torch
    would silently run eager; here it is an error. Inductor's max-autotune conv template has
    returned wrong results (PyTorch issue #173068): hence the comparison.
    """
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # a graph per new shape is a bug, not a fallback
    counters = torch._dynamo.utils.counters["stats"]
    graphs_before, t0 = counters["unique_graphs"], time.perf_counter()
    check = CompileCheck(model=model, compiled=False)
    gen = torch.Generator(device=env.device).manual_seed(0)

    def batch(n):  # inputs as the loader hands them: the training dtype, channels_last
        x = torch.randn(n, 3, 32, 32, device=env.device, generator=gen).to(env.dtype)
        return x.contiguous(memory_format=torch.channels_last)

    was_training, fast = model.training, None
    saved = {k: v.clone() for k, v in model.state_dict().items()}  # the check's training pass moves BN statistics
    rng = torch.get_rng_state(), torch.cuda.get_rng_state(env.device) if env.device.type == "cuda" else None
    try:
        fast = (compiler or torch.compile)(model, mode=mode, dynamic=False)
        model.eval()
        x = batch(eval_batch)
        with torch.no_grad():
            reference = model(x.float())
            with env.autocast():
                eager, out = model(x), fast(x)
        check.error, check.eager_error = relative_error(out, reference), relative_error(eager, reference)
        model.train()
        x, y = batch(train_batch), torch.randint(0, 10, (train_batch,), device=env.device, generator=gen)
        with env.autocast():
            loss = F.cross_entropy(fast(x), y)
        loss.backward()
        grads_finite = torch.stack([torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None])
        finite = bool(torch.isfinite(loss) & grads_finite.all())  # sync: once, at start
        if not finite:
            check.note = "the compiled training step gave a non-finite loss or gradient"
        elif check.error > 2 * check.eager_error + 1e-4:
            check.note = (f"the compiled model disagrees with eager (relative error {check.error:.2e} against fp32, "
                          f"eager at training precision {check.eager_error:.2e})")
        else:
            check.model, check.compiled = fast, True
    except Exception as e:  # any compiler failure: train eager rather than not at all
        first = (str(e).strip().splitlines() or [""])[0][:200]
        check.note = f"torch.compile failed ({type(e).__name__}: {first})"
    finally:  # the model leaves the check as it came in
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], env.device)
    if env.ddp:  # one verdict for all ranks, or DDP would pair a compiled rank with an eager one: compiled
        verdict = torch.tensor([int(check.compiled)], device=env.device)  # only where every rank accepted
        dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
        if check.compiled and not verdict.item():
            check.compiled, check.model, check.note = False, model, "another rank rejected the compiled model"
    check.seconds, check.graphs = time.perf_counter() - t0, counters["unique_graphs"] - graphs_before
    if check.note:
        check.note += "; training eager"
    return check


# --- the recipe's parts ---------------------------------------------------------------------------

def make_optimizer(cfg, model):
    decay = [p for p in model.parameters() if p.ndim > 1]  # conv and linear weights
    rest = [p for p in model.parameters() if p.ndim <= 1]  # BN and biases: decay only hurts them
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    return torch.optim.Adam(groups, lr=cfg.lr)


def total_steps(cfg, steps_per_epoch):
    return min(cfg.epochs * steps_per_epoch, cfg.max_steps or float("inf"))


def warmup_steps(cfg, steps_per_epoch):
    """(steps, note): the recipe's warm-up, or a tenth of the run when it would fill more than half."""
    total, warmup = total_steps(cfg, steps_per_epoch), max(1, round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule != "onecycle" or warmup <= total // 2:
        return warmup, None
    short = max(1, total // 10)
    return short, (f"the {cfg.warmup_epochs:g}-epoch warm-up ({warmup} steps) would fill most of this {total}-step "
                   f"run: warming up over {short} step{'s' * (short != 1)} instead, then decaying to 0")


def make_scheduler(cfg, optimizer, steps_per_epoch):
    """onecycle: a LambdaLR stepped per step; plateau: ReduceLROnPlateau stepped per epoch on test loss."""
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=3)
    total, (warmup, _) = total_steps(cfg, steps_per_epoch), warmup_steps(cfg, steps_per_epoch)

    def factor(step):  # of the peak lr: 0.1 -> 1 over the warm-up, then linearly to 0 at the end
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- one step, one epoch, one evaluation ----------------------------------------------------------

class NonFiniteLoss(RuntimeError):
    def __init__(self, step):
        super().__init__(f"non-finite loss at step {step + 1}")
        self.step = step


def train_step(model, optimizer, x, y, *, label_smoothing=0.0, autocast=contextlib.nullcontext):
    """Forward, backward, update. Returns (loss, correct) as device tensors: no host sync."""
    with autocast():
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.detach().argmax(1) == y).sum()


def train_epoch(model, optimizer, loader, env, *, scheduler=None, label_smoothing=0.0, log_every=25,
                start=0, stop_at=None, stop=None, log=None):
    """One epoch of `loader`, numbered from step `start`, ending before step `stop_at` if given.

    The loop train.py runs and the bench times. Per step: `train_step`, then `scheduler.step()`
    when a per-step scheduler is given; loss and accuracy add up on the device. The host syncs
    only on log steps (every `log_every`-th and the last): there it raises NonFiniteLoss if any
    loss so far was not finite, and calls `log(step, metrics)` with the window since the last
    log step. After the step in which `stop.requested` turns true (Ctrl-C), it returns early.

    Returns this call's host totals {"loss_sum", "correct", "images", "steps", "seconds", "end"}
    for this rank: the caller adds an earlier part of a resumed epoch and reduces over ranks.
    """
    t0 = last_t = time.perf_counter()
    sums = torch.zeros(2, device=env.device)  # loss * images, correct: summed on device, no sync
    bad_step = torch.full((), -1, device=env.device)  # the first step whose loss was not finite
    last_sums, images, last_images, step = [0.0, 0.0], 0, 0, start - 1
    end = len(loader) if stop_at is None else min(len(loader), stop_at)
    for step, (x, y) in enumerate(loader, start=start):
        loss, correct = train_step(model, optimizer, x, y, label_smoothing=label_smoothing, autocast=env.autocast)
        if scheduler is not None:
            scheduler.step()
        sums += torch.stack([loss * len(y), correct.float()])
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step, bad_step)
        images += len(y)  # a host count: no transfer per step
        last = step + 1 >= end or (stop is not None and stop.requested)
        if step % log_every == 0 or last:
            *now, bad = torch.cat([sums, bad_step.view(1).float()]).tolist()  # sync: log steps only
            if bad >= 0:
                raise NonFiniteLoss(int(bad))
            if log is not None:
                n, t = images - last_images, time.perf_counter()
                log(step, {"loss": (now[0] - last_sums[0]) / n, "acc": (now[1] - last_sums[1]) / n,
                           "lr": optimizer.param_groups[0]["lr"], "img_per_s": n * env.world / (t - last_t)})
                last_t = t
            last_sums, last_images = now, images
        if last:
            break
    env.sync()  # the epoch's work is done before the clock stops
    return {"loss_sum": last_sums[0], "correct": last_sums[1], "images": images, "steps": step + 1 - start,
            "seconds": time.perf_counter() - t0, "end": step + 1}


@torch.no_grad()
def reestimate_batchnorm(model, loader, env):
    """BatchNorm running statistics recomputed as plain averages over `loader`'s batches.

    A short run leaves them behind the weights: with momentum 0.1 they average over the last
    ~10 steps, while the weights still move fast. BatchNorm runs in training mode here (batch
    statistics), Dropout in eval mode, as evaluation will see it. Use the eager model: a
    compiled one would build a graph for this pass.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    for x, _ in loader:
        with env.autocast():
            model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


@torch.no_grad()
def evaluate(model, loader, env, num_classes=10):
    """(mean loss, accuracy, confusion matrix [true, predicted]) over all ranks' shards."""
    model.eval()
    loss_sum = torch.zeros((), device=env.device)
    confusion = torch.zeros(num_classes**2, dtype=torch.long, device=env.device)
    for x, y in loader:
        with env.autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        # index_add_, not bincount: CUDA bincount reads min and max, two host syncs per batch
        confusion.index_add_(0, y * num_classes + logits.argmax(1), torch.ones_like(y))
    model.train()
    if env.ddp:
        dist.all_reduce(loss_sum)
        dist.all_reduce(confusion)
    confusion = confusion.view(num_classes, num_classes).cpu()  # sync: once per evaluation
    n = confusion.sum().item()
    return loss_sum.item() / n, confusion.diag().sum().item() / n, confusion


# --- files: atomic writes, checkpoints read with weights_only -----------------------------------

UMASK = os.umask(0o022)
os.umask(UMASK)  # read once: os.umask can only be read by setting it


def write_atomic(path, write):
    """`write(tmp)` to a temporary name beside `path`, then rename: never a half-written file.

    The file gets the mode any new file of the user's would (mkstemp's temporary is 0600)."""
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(obj, path):
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_json(obj, path):
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2)))


CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "rng_cpu", "state", "config"}


def load_checkpoint(path):
    """A checkpoint this project wrote, read with weights_only=True (tensors and plain data only).

    Anything else raises UserError: one line naming the file and what to do.
    """
    path = Path(path)
    fix = "pass a run folder that train.py wrote, or start a new run without --resume"
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; {fix}")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes), not a checkpoint; {fix}")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols: the error below says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own messages run to many lines: name the kind of problem
        code = "GLOBAL" in str(e) or "Unsupported global" in str(e)  # a class or function to import: refused
        why = "it holds objects other than tensors and plain data, refused unread" if code else "not a readable torch.save file"
        raise UserError(f"{path}: {why}; {fix}") from None
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= set(ckpt):
        raise UserError(f"{path} is not a checkpoint of this project (no model, optimizer and config); {fix}")
    unknown = set(ckpt["config"]) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise UserError(f"{path} was written by another version (unknown settings {sorted(unknown)}); {fix}")
    return ckpt


# --- stopping on request --------------------------------------------------------------------------

class StopSignal:
    """Ctrl-C and SIGTERM, handled the way a long job should be.

    Once `arm()`ed (training), the first signal prints a notice at once and sets `requested`:
    the loop finishes its step and the trainer saves and exits 130 (143 for SIGTERM). A second
    signal quits at once with that code; the last checkpoint, written atomically, stays good.
    Before `arm()` (loading data, compiling) there is nothing to save, and the first quits.

    Python runs signal handlers only between bytecodes, so a handler would wait for a long C++
    call (a 12 s backward pass on CPU) to return. The C-level handler writes every signal to a
    wake-up socket at once, and a watcher thread acts on it from there.
    """

    def __init__(self, out=sys.stderr):
        self.signum, self.armed, self.out = None, False, out
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        signal.set_wakeup_fd(writer.fileno())  # the main thread only, as for signal.signal
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda signum, frame: None)  # the watcher acts; this keeps Python's C handler in place
        self._sockets = reader, writer  # kept alive with self
        threading.Thread(target=self._watch, args=(reader,), daemon=True, name="stop-signal").start()

    @property
    def requested(self):
        return self.signum is not None

    @property
    def exit_code(self):
        return 128 + self.signum

    def arm(self):
        self.armed = True

    def _watch(self, reader):
        while data := reader.recv(1):  # empty once the socket is closed
            signum = data[0]
            if signum not in (signal.SIGINT, signal.SIGTERM):
                continue  # another handler's signal (SIGCHLD, say) shares the socket
            if self.armed and self.signum is None:
                self.signum = signum
                print("\nstopping after this step (Ctrl-C again to quit now)", file=self.out, flush=True)
                continue
            what = "quitting now; the last checkpoint is kept" if self.armed else "interrupted before training; nothing saved"
            print(f"\n{what}", file=self.out, flush=True)
            os._exit(128 + signum)  # from this thread: the main one may be inside a long C++ call


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
