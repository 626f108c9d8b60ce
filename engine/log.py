"""What a person sees, from rank 0: console lines, the progress bar, TensorBoard, summary.json.

`Logger` reads the run's state where it is passed in and changes nothing; `NullLogger` is its
silent twin for the other ranks. TensorBoard's dashboard groups tags by the part before "/", in
alphabetical order: the curves (accuracy, loss, lr) come first, then the pictures, the
per-class results and the speeds.
"""
import dataclasses
import json
import math
import os
import shlex
import sys

import numpy as np

from net import count_params
from net.model import train_memory_bytes
from pipelines import CLASSES

from .checkpoint import write_json
from .config import SHORT_RUN, SHORT_RUN_RESULT, augment
from .run import run_facts

STEP_TAGS = {"loss": "loss/train_step", "acc": "accuracy/train_step", "lr": "lr/step",
             "img_per_s": "throughput/step_img_per_s"}
EPOCH_TAGS = {"train_loss": "loss/train", "test_loss": "loss/test", "train_acc": "accuracy/train",
              "test_acc": "accuracy/test", "val_loss": "loss/val", "val_acc": "accuracy/val",  # with --val
              "ema_test_loss": "loss/test_ema", "ema_test_acc": "accuracy/test_ema",  # with --ema
              "lr": "lr/epoch", "img_per_s": "throughput/train_img_per_s", "epoch_s": "time/epoch_s"}
COST_NOTICE_S = 900  # a CPU run longer than a quarter of an hour is told of the short run below


class Logger:
    def __init__(self, cfg, env):
        self.cfg, self.env = cfg, env
        print("config:", json.dumps(dataclasses.asdict(cfg)))
        print(f"loading {'generated --smoke data' if cfg.smoke else cfg.data} ...", flush=True)

    def start(self, run_dir, model, schedule, steps_per_epoch, state, notes, check, convs, sizes, fuse):
        """Once data, model and compile are ready: the run folder's writer, the facts, the bar."""
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        cfg, env = self.cfg, self.env
        self.run_dir, self.total, self.logs = run_dir, schedule.total, 0
        self.facts = {**run_facts(env), "params": count_params(model), "compiled": check.compiled,
                      "compile_s": check.seconds, "compile_graphs": check.graphs, "compile_error": check.error,
                      "eager_error": check.eager_error, "convs": convs.impl, "conv_errors": convs.errors,
                      "conv_ms": convs.ms, "conv_tiles": convs.tiles,
                      "fused": fuse.fused, "fuse": fuse.line(),
                      "train_images": sizes[0], "test_images": sizes[1], "val_images": sizes[2]}
        self.memory = train_memory_bytes(model, env.batch)
        self.writer = SummaryWriter(run_dir, flush_secs=10)  # curves show up while the first epoch runs
        print(f"device: {self.facts['device']} x {env.world}, {env.precision_and_layout}, params "
              f"{self.facts['params']:,}, {steps_per_epoch} steps/epoch of {cfg.batch_size}, {self.total} steps in all"
              + (f", compiled {check.graphs} graphs in {check.seconds:.0f} s (error against fp32 {check.error:.1e}, "
                 f"eager bf16 {check.eager_error:.1e})" if check.compiled else ""))
        print(f"convs: {convs.line()}")
        if convs.tiles_line():
            print(f"conv tiles: {convs.tiles_line()}")
        print(f"fused: {fuse.line()}")
        print(f"threads: torch {env.threads}, DALI {env.dali_threads} ({env.threads_why})")
        print(f"data: {sizes[0]:,} train images"
              + (f", {sizes[2]:,} held out of them for validation (--val)" if sizes[2] else "")
              + f", {sizes[1]:,} test images")
        print(f"augmentation: {augment(cfg).describe()}")
        for note in notes + [check.note, schedule.note]:
            if note:
                print(f"note: {note}")
        # this one's rest, then whole
        epochs = math.ceil((self.total - state.step + state.step_in_epoch) / steps_per_epoch)
        print(f"training {plural(epochs, 'epoch')}, {plural(self.total - state.step, 'step')}; run folder {run_dir}",
              flush=True)
        self.bar = tqdm(total=self.total, initial=state.step, unit="step", dynamic_ncols=True, leave=False)

    def augmentations(self, images, names):
        from pipelines.preview import augment_grid

        self.writer.add_image("pictures/augmentations", augment_grid(images, augment(self.cfg), names=names, draws=6,
                                                                     zoom=3), dataformats="HWC")

    def step(self, epoch, step, m):
        """At log steps: the bar, per-step TensorBoard scalars, and on CPU one notice of the cost."""
        self.bar.set_description(f"epoch {epoch + 1}/{self.cfg.epochs}", refresh=False)
        self.bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['acc']:.1%}", img_s=f"{m['img_per_s']:,.0f}",
                             refresh=False)
        self.bar.update(step + 1 - self.bar.n)
        for key, value in m.items():
            self.writer.add_scalar(STEP_TAGS[key], value, step + 1)
        self.logs += 1
        if self.logs == 2 and self.env.device.type == "cpu":  # the 2nd log: past the first step's start-up
            self.cost_notice(m["img_per_s"], step)

    def cost_notice(self, img_per_s, step):
        seconds = (self.total - step - 1) * self.cfg.batch_size / img_per_s
        if seconds > COST_NOTICE_S:
            self.bar.write(f"note: on CPU at {img_per_s:,.0f} img/s this run needs about {seconds / 3600:.1f} h more "
                           f"and {self.memory / 1e9:.1f} GB of memory; for a short run that visibly learns try "
                           f"`{SHORT_RUN}` ({SHORT_RUN_RESULT}), and for less memory a smaller --batch-size "
                           f"(scale --lr with it)")

    def epoch(self, row, state):
        for key, tag in EPOCH_TAGS.items():
            if key in row:
                self.writer.add_scalar(tag, row[key], row["epoch"])
        self.writer.add_scalar("accuracy/best_test", state.best_acc, row["epoch"])
        self.summary(state, complete=False)
        self.bar.write(f"epoch {row['epoch']:3d}/{self.cfg.epochs} | train loss {row['train_loss']:.3f} "
                       f"acc {row['train_acc']:6.2%} | "
                       + (f"val acc {row['val_acc']:6.2%} | " if "val_acc" in row else "")
                       + f"test loss {row['test_loss']:.3f} acc {row['test_acc']:6.2%} | "
                       + (f"ema acc {row['ema_test_acc']:6.2%} | " if "ema_test_acc" in row else "")
                       + f"lr {row['lr']:.2e} | {row['img_per_s']:8,.0f} img/s | {row['epoch_s']:5.1f} s"
                       + (f" (resumed at step {row['resumed_at_step']})" if "resumed_at_step" in row else "")
                       + (f" (the run's end, step {row['step']}, inside the epoch)" if row.get("partial") else ""))

    def summary(self, state, complete, tta=None):
        h = state.history
        write_json({"config": dataclasses.asdict(self.cfg), **self.facts, "complete": complete,
                    "best_acc": state.best_acc, "best_weights": state.best_weights,
                    "final_acc": h[-1]["test_acc"] if h else None, "final_tta_acc": tta,
                    "final_ema_acc": h[-1].get("ema_test_acc") if h else None,
                    "final_val_acc": h[-1].get("val_acc") if h else None,
                    "epochs_run": len(h), "steps": state.step, "wall_s": state.wall_s, "train_s": state.train_s,
                    "mean_train_img_per_s": float(np.mean([e["img_per_s"] for e in h])) if h else None,
                    "target_acc": self.cfg.target_acc, "epoch_to_target": state.target_epoch,
                    "wall_s_to_target": state.target_wall_s, "history": h}, self.run_dir / "summary.json")

    def finish(self, state, confusion, tta=None):
        from pipelines.preview import confusion_image

        self.bar.close()
        final, last = state.history[-1]["test_acc"], state.epoch
        for i, name in enumerate(CLASSES):
            self.writer.add_scalar(f"test_class_accuracy/{name}",
                                   (confusion[i, i] / confusion[i].sum().clamp_min(1)).item(), last)
        self.writer.add_image("pictures/confusion_matrix", confusion_image(confusion.numpy(), CLASSES), last,
                              dataformats="HWC")
        self.hparams()
        self.writer.close()
        self.summary(state, complete=True, tta=tta)
        reached = (f"reached {self.cfg.target_acc:.0%} at epoch {state.target_epoch} ({state.target_wall_s:.1f} s)"
                   if state.target_epoch else f"did not reach {self.cfg.target_acc:.0%}")
        print(f"done: best test acc {state.best_acc:.2%}, final {final:.2%}"
              + (f" ({tta:.2%} with flip TTA)" if tta is not None else "") + f", {reached}; "
                                                                             f"{self.run_dir}/summary.json")

    def hparams(self):
        """The resolved settings in TensorBoard's HPARAMS table, beside the final and best test accuracy.

        Its metrics are the `accuracy/test` and `accuracy/best_test` curves themselves (their last
        values), not extra single-point charts; what is not a number is text there ("true", "none")."""
        from torch.utils.tensorboard.summary import hparams

        settings = {**dataclasses.asdict(self.cfg), "compiled": self.facts["compiled"], "fused": self.facts["fused"],
                    "convs": " ".join(f"{name}={impl}" for name, impl in self.facts["convs"].items())}
        settings = {k: str(v).lower() if v is None or isinstance(v, bool) else v for k, v in settings.items()}
        for summary in hparams(settings, {"accuracy/test": None, "accuracy/best_test": None}):
            self.writer.file_writer.add_summary(summary)

    def stopped(self, state, where):
        self.bar.close()
        self.writer.close()
        self.summary(state, complete=False)
        print(f"stopped at {where}, saved; continue with: {resume_command(self.run_dir)}", file=sys.stderr)

    def error(self, message):
        self.bar.close()
        self.writer.close()
        print(f"error: {message}", file=sys.stderr)


class NullLogger:
    """Ranks other than 0 log nothing: every Logger method, doing nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


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
