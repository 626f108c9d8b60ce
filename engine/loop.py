"""The work: the optimizer and schedule of a recipe, one step, one epoch, one evaluation.

`train_epoch` is the loop train.py runs and the bench times; it syncs the host only on log
steps. Nothing here prints: callers pass a `log` callback (the bench passes none).
"""
import contextlib
import copy
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import total_steps
from .device import any_rank


def make_optimizer(cfg, model):
    decay = [p for p in model.parameters() if p.ndim > 1]  # conv and linear weights
    rest = [p for p in model.parameters() if p.ndim <= 1]  # BN and biases: decay only hurts them
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    return {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer](groups, lr=cfg.lr)


@dataclass
class Schedule:
    """The learning-rate schedule, and the one place that knows how it steps.

    onecycle: a LambdaLR stepped after every optimizer step (`after_step`); plateau:
    ReduceLROnPlateau stepped once per epoch on the test loss (`after_eval`). The loop calls both
    hooks and each does nothing for the other kind.
    """
    scheduler: object
    per_step: bool
    total: int  # optimizer steps in the run
    note: str = None  # a warm-up shortened to fit a short run: said at start

    def after_step(self):
        if self.per_step:
            self.scheduler.step()

    def after_eval(self, test_loss):
        if not self.per_step:
            self.scheduler.step(test_loss)

    @property
    def lr(self):
        return self.scheduler.optimizer.param_groups[0]["lr"]

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state):
        self.scheduler.load_state_dict(state)  # LambdaLR keeps our factor(): a longer run stretches it


def make_schedule(cfg, optimizer, steps_per_epoch):
    total = total_steps(cfg, steps_per_epoch)
    if cfg.schedule == "plateau":
        return Schedule(torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=3), False, total)
    warmup, note = max(1, round(cfg.warmup_epochs * steps_per_epoch)), None
    if warmup > total // 2:  # the recipe's warm-up would fill most of a short run: a tenth of it instead
        short = max(1, total // 10)
        warmup, note = short, (f"the {cfg.warmup_epochs:g}-epoch warm-up ({warmup} steps) would fill most of this "
                               f"{total}-step run: warming up over {short} step{'s' * (short != 1)} instead, then "
                               "decaying to 0")

    def factor(step):  # of the peak lr: 0.1 -> 1 over the warm-up, then linearly to 0 at the end
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return Schedule(torch.optim.lr_scheduler.LambdaLR(optimizer, factor), True, total, note)


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


class EMA:
    """An exponential moving average of a model's weights and BatchNorm statistics (`--ema DECAY`).

    `update()` after every optimizer step folds in `source` (the eager model, whatever wrapper
    trains it); `model` is the average, an eager copy that is evaluated beside the raw weights.
    The decay warms up as min(decay, (1 + t) / (10 + t)) over the first updates t, so that the
    average of a short run is not mostly its initial weights. BatchNorm's running statistics
    are averaged like the weights (they describe the activations of the weights averaged), and
    its integer batch count is copied.
    """

    def __init__(self, source, decay):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(source).eval()
        self.model.requires_grad_(False)
        pairs = list(zip(self.model.state_dict().values(), source.state_dict().values()))  # views, updated in place
        self.floats = [list(t) for t in zip(*[(a, s) for a, s in pairs if a.is_floating_point()])]
        self.counts = [(a, s) for a, s in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(*self.floats, 1 - decay)  # one fused kernel per dtype on a GPU, not one per tensor
        for averaged, current in self.counts:
            averaged.copy_(current)

    def state_dict(self):
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


def train_epoch(model, optimizer, loader, env, *, schedule=None, ema=None, label_smoothing=0.0, log_every=25,
                start=0, stop_at=None, stop=None, log=None):
    """One epoch of `loader`, numbered from step `start`, ending before step `stop_at` if given.

    The loop train.py runs and the bench times. Per step: `train_step`, then the schedule's
    `after_step()` and the weight average's `update()` (when there is one); loss and accuracy add up on the device. The
    host syncs
    only on log steps (every `log_every`-th and the last): there it raises NonFiniteLoss if any
    loss so far was not finite, and calls `log(step, metrics)` with the window since the last
    log step. After the step in which `stop.requested` turns true (Ctrl-C, or a checkpoint due),
    it returns early. Under DDP `stop` is read on log steps only, and the ranks return at the
    first log step where any of them was asked to: all at the same step.

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
        if schedule is not None:
            schedule.after_step()
        if ema is not None:
            ema.update()
        sums += torch.stack([loss * len(y), correct.float()])
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step, bad_step)
        images += len(y)  # a host count: no transfer per step
        log_step = step % log_every == 0 or step + 1 >= end
        halt = stop is not None and (log_step or not env.ddp) and stop.requested
        if env.ddp and log_step and stop is not None:
            halt = any_rank(halt, env)
        last = step + 1 >= end or halt
        if log_step or last:
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
def evaluate(model, loader, env, num_classes=10, tta=False):
    """(mean loss, accuracy, confusion matrix [true, predicted]) over all ranks' shards.

    tta: flip test-time augmentation, the logits of each image and its mirror averaged (the
    mirror is one of the training augmentations, so the model has seen such images)."""
    model.eval()
    loss_sum = torch.zeros((), device=env.device)
    confusion = torch.zeros(num_classes**2, dtype=torch.long, device=env.device)
    for x, y in loader:
        with env.autocast():
            logits = model(x)
            if tta:
                logits = (logits.float() + model(x.flip(3)).float()) / 2
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
