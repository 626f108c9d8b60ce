"""Train the seed CNN on CIFAR-10: `python train.py` (`make train`); `python train.py --help` lists every flag.

On CUDA: DALI on the GPU, bf16 autocast, channels_last, torch.compile (checked against eager
before use). On CPU: the same code in fp32, eager. Multi-GPU: `torchrun --nproc_per_node N
train.py`; --batch-size is the global batch, split evenly over the ranks, so the recipe (and its
learning rate) does not change with N. A script: everything it runs lives in engine/, which the
bench times too.

Writes runs/<name>/: TensorBoard events, last.pt and best.pt (atomic, every epoch), summary.json.
"""
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from engine.checkpoint import init_from, load_checkpoint
from engine.cli import run_main
from engine.config import SHORT, Config, UserError, augment, check, flag_parser, planned_steps, resolve, resumed
from engine.convs import choose_convs, choose_fused
from engine.device import CompileCheck, any_rank, assert_ranks_agree, compile_checked, exit_rank, setup_env
from engine.log import Logger, NullLogger, plural
from engine.loop import EMA, NonFiniteLoss, evaluate, make_optimizer, make_schedule, reestimate_batchnorm, train_epoch
from engine.run import RunFolderLock, RunState, load_split, rank_failed, restore_run, same_data, save_run
from engine.stop import SaveClock, StopSignal
from net import build_model
from pipelines import CLASSES, make_loader, subset
from pipelines.data import fingerprint, pixels
from pipelines.preview import one_per_class


def parse_config(argv=None):
    """(Config, checkpoint or None, notes, the flags typed): the flags, or a resumed run's saved settings and
    checkpoint."""
    given = vars(flag_parser(__doc__.splitlines()[0]).parse_args(argv))  # syntax errors: argparse's usage, exit 2
    if "resume" not in given:
        return check(resolve(Config(**given))), None, [], given
    run_dir = Path(given.pop("resume"))
    ckpt = load_checkpoint(run_dir / "last.pt")  # read once, here
    cfg, notes = resumed(ckpt["config"], given, run_dir)
    return cfg, ckpt, notes, given


# --- data and loaders ---------------------------------------------------------------------------

def make_loaders(cfg, env, train, test, val=None):
    """(train loader, test loader, val loader or None)."""
    if len(train[1]) // env.world < env.batch:
        raise UserError(f"{cfg.data} has {len(train[1])} train images, fewer than one batch of {cfg.batch_size} per "
                        f"step; lower --batch-size, or train on more images")
    evaluated = [make_loader(*images, batch_size=cfg.eval_batch_size, train=False, **env.loader_args(cfg.seed))
                 if images else None for images in (test, val)]
    return make_loader(*train, batch_size=env.batch, train=True, augment=augment(cfg),
                       **env.loader_args(cfg.seed)), *evaluated


def short_run(cfg, env, model, train, total):
    """(BatchNorm re-estimation before each evaluation or None, a note or None) for a run of `total` steps.

    `--bn-reestimate` is resolved here, where the run's length is known, and saved with the config."""
    if cfg.bn_reestimate is None:
        cfg.bn_reestimate = 1000 if total < SHORT else 0
    recalibrate, n = None, min(cfg.bn_reestimate, len(train[1]))
    if n:
        loader = make_loader(*subset(*train, n, seed=cfg.seed), batch_size=min(env.batch, n), train=False,
                             **env.loader_args(cfg.seed))
        recalibrate = lambda m=model: reestimate_batchnorm(m, loader, env)  # noqa: E731 (eager models: no new graph)
    if total >= SHORT:
        return recalibrate, None
    return recalibrate, (f"a short run ({plural(total, 'step')}; the `{cfg.recipe}` recipe plans "
                         f"{planned_steps(cfg.recipe):,} on the full train set): expect far less than its accuracy"
                         + (f". BatchNorm statistics are re-estimated on {n:,} train images before each evaluation "
                            f"(--bn-reestimate 0 turns that off)" if recalibrate else ""))


# --- the run ------------------------------------------------------------------------------------

def main(argv=None):
    cfg, ckpt, notes, typed = parse_config(argv)  # 1. configuration, and a resumed run's checkpoint, read once
    done = RunState(**ckpt["state"]).limit_reached(cfg) if ckpt else None
    if done:
        print(f"run already complete: {cfg.resume} ended at its {done}; raise {done.split()[0]} to train further")
        return 0
    with StopSignal() as stop:  # Ctrl-C quits at once while loading; once armed, it stops after a step
        # 2. device, precision, ranks, threads. A resume keeps the run's thread count: float sums differ across
        # counts, and only the same count ends on the uninterrupted run's weights bit for bit.
        env = setup_env(cfg, threads_kept=bool(ckpt) and cfg.threads is not None and "threads" not in typed)
        cfg.threads = env.threads  # saved with the run
        run_dir = Path(cfg.runs) / cfg.name
        lock = RunFolderLock(run_dir) if env.master else None  # a second process on this folder is refused here
        stop.before_quit = lock and lock.abandon
        try:
            return run(cfg, ckpt, notes, env, stop, run_dir)
        except RuntimeError as e:
            if not env.ddp:
                raise
            return rank_failed(e, env, run_dir)
        finally:
            if lock:
                if not stop.armed:  # the run never started: leave no folder behind
                    lock.abandon()
                lock.release()


def run(cfg, ckpt, notes, env, stop, run_dir):
    log = Logger(cfg, env) if env.master else NullLogger()
    torch.manual_seed(cfg.seed)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")  # 3. data
    val = load_split(cfg, "val") if cfg.val else None  # held out of train: what a sweep chooses by
    data = fingerprint(*train)
    if ckpt:  # other data than the run trained on: refused unless --allow-other-data
        notes.append(same_data(ckpt.get("data"), data, cfg))
    train_loader, test_loader, val_loader = make_loaders(cfg, env, train, test, val)
    steps_per_epoch = len(train_loader)
    model = build_model(dropout=cfg.dropout).to(env.device, memory_format=env.memory_format)  # 4. model & co
    optimizer = make_optimizer(cfg, model)
    schedule = make_schedule(cfg, optimizer, steps_per_epoch)
    state = restore_run(ckpt, model, optimizer, schedule, env) if ckpt else RunState()
    if cfg.init_from and not ckpt:  # fine-tuning: another run's weights, a fresh optimizer (a resume has its own)
        notes.append(init_from(model, cfg.init_from))
    ema = EMA(model, cfg.ema) if cfg.ema else None  # made now: the average starts from the weights in place
    if ema and ckpt:
        ema.load_state_dict(ckpt["ema"])
    # Each depthwise conv's implementation, before compiling: the graphs trace what each layer runs.
    convs = choose_convs(model, env, cfg.conv_impl, batch=env.batch)
    fuse = choose_fused(model, env, cfg.fuse, batch=env.batch, compiled=cfg.compile, mode=cfg.compile_mode)
    compile_check = CompileCheck(model, compiled=False)
    if cfg.compile:  # both graphs (eval, train) built and checked here, not inside epoch 1
        compile_check = compile_checked(model, env, eval_batch=min(cfg.eval_batch_size, test_loader.shard_size),
                                        train_batch=env.batch, mode=cfg.compile_mode)
    train_model = torch.nn.parallel.DistributedDataParallel(compile_check.model) if env.ddp else compile_check.model
    recalibrate, short = short_run(cfg, env, model, train, schedule.total)

    def save(name):  # rank 0 writes; atomically, so a kill at any moment leaves the previous file whole
        if env.master:
            save_run(run_dir / name, model, optimizer, schedule, state, cfg, env, data, ema)

    stop.arm()  # from here a stop saves where it is
    log.start(run_dir, model, schedule, steps_per_epoch, state, notes + [short] + convs.notes, compile_check, convs,
              sizes=(len(train[1]), len(test[1]), len(val[1]) if val else 0), fuse=fuse)
    if not ckpt:
        picks = one_per_class(test[1], cfg.seed)
        log.augmentations(pixels(test[0], picks), [CLASSES[c] for c in test[1][picks]])
    clock = SaveClock(stop, cfg.checkpoint_every * 60)  # what ends a part of an epoch: a stop, or a checkpoint due
    resuming, confusion = ckpt is not None, None  # resuming: until the first part is done
    while state.step < schedule.total:  # 5. the run in parts: to its epoch's end or the run's, or a stop or save
        epoch, first = state.epoch, state.first_step
        start, end = state.next_part(steps_per_epoch, schedule.total)
        train_loader.set_epoch(epoch, skip=start)
        try:
            part = train_epoch(train_model, optimizer, train_loader, env, schedule=schedule, ema=ema,
                               log_every=cfg.log_every,
                               label_smoothing=cfg.label_smoothing, start=start, stop_at=end, stop=clock,
                               log=lambda step, m: log.step(epoch, first + step, m))
        except NonFiniteLoss as e:
            log.error(f"non-finite loss at epoch {epoch + 1}, step {e.step + 1}; stopped. The last good checkpoint is "
                      f"{run_dir / 'last.pt'} (try a lower --lr)")
            return 1
        state.add_part(part, start, resumed=resuming)
        resuming, improved = False, False
        if part["end"] == end:  # the epoch's end, or the run's inside it (--max-steps): evaluate
            row, confusion, improved = finish_epoch(cfg, env, compile_check.model, test_loader, schedule, state, epoch,
                                                    whole=end == steps_per_epoch, recalibrate=recalibrate, ema=ema,
                                                    val_loader=val_loader)
        save("last.pt")  # wherever the part ended: a stop, a checkpoint due, or an epoch's end
        clock.saved()
        if improved:
            save("best.pt")
        if part["end"] == end:
            log.epoch(row, state)
        if any_rank(stop.requested, env) and state.step < schedule.total:  # every rank stops here, or none does
            where = f"epoch {epoch + 1}, step {part['end']}" if part["end"] < end else f"the end of epoch {epoch + 1}"
            log.stopped(state, where)
            return stop.exit_code
    tta = evaluate(compile_check.model, test_loader, env, tta=True)[1] if cfg.tta else None  # beside, not instead
    log.finish(state, confusion, tta)
    return 0


def finish_epoch(cfg, env, model, test_loader, schedule, state, epoch, whole=True, recalibrate=None, ema=None,
                 val_loader=None):
    """Reduce the epoch's totals over ranks, [re-estimate BatchNorm,] evaluate (the weights' average
    too, with --ema; on the --val images too), step a per-epoch schedule, record the epoch in `state`
    (`whole` False: the run ended inside it): (row, confusion, improved)."""
    p = state.partial
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
    averaged = {}
    if val_loader:  # the raw weights only: what the sweep ranks by
        averaged["val_loss"], averaged["val_acc"], _ = evaluate(model, val_loader, env)
    if ema:  # every rank holds the same average (same weights, same steps): nothing to broadcast
        if recalibrate:
            recalibrate(ema.model)
        averaged["ema_test_loss"], averaged["ema_test_acc"], _ = evaluate(ema.model, test_loader, env)
    if whole:  # a per-epoch schedule steps at epochs' ends
        schedule.after_eval(test_loss)
    eval_s = time.perf_counter() - t_eval
    if env.ddp:
        assert_ranks_agree(model)
    row = {"epoch": epoch + 1, "step": state.step, "lr": schedule.lr, "train_loss": loss_sum / images,
           "train_acc": correct / images, "test_loss": test_loss, "test_acc": test_acc, **averaged,
           "img_per_s": images / p["seconds"], "epoch_s": p["seconds"] + eval_s}
    improved = state.end_epoch(row, eval_s, cfg.target_acc, whole=whole)
    return row, confusion, improved


if __name__ == "__main__":
    code = run_main(main, save_advice="; make room (or fix the folder), then resume the run")
    if "RANK" in os.environ:
        exit_rank(code)
    sys.exit(code)
