"""Evaluate a trained run: `python evaluate.py runs/<name>` (`make eval RUN=runs/<name>`).

Test accuracy of the run's best.pt (or last.pt) on its own test set (the same sample, the same
precision), beside the accuracy the trainer logged for that checkpoint; with --tta also with
flip test-time augmentation, side by side, never one in place of the other. Prints a per-class
table and writes the confusion matrix as a PNG beside the checkpoint.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from engine.checkpoint import add_run_flags, load_weights
from engine.cli import run_main
from engine.device import setup_env
from engine.loop import evaluate
from engine.run import load_split
from net import build_model
from pipelines import CLASSES, make_loader
from pipelines.preview import confusion_image, save_png


def main(argv=None):
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.splitlines()[0])
    add_run_flags(parser)
    parser.add_argument("--data", help="CIFAR-10 to test on (default: the run's own --data)")
    parser.add_argument("--tta", action="store_true", help="also with flip test-time augmentation")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    weights, which, ckpt, cfg = load_weights(args.run, args.checkpoint, args.weights)
    cfg = dataclasses.replace(cfg, device=args.device, data=args.data or cfg.data, threads=None)
    env = setup_env(cfg)  # the trainer's precision on this device: bf16 autocast on CUDA, fp32 on CPU
    model = build_model(dropout=cfg.dropout).to(env.device, memory_format=env.memory_format)
    model.load_state_dict(weights)
    images, labels = load_split(cfg, "test")  # the same sample the trainer evaluated
    loader = make_loader(images, labels, batch_size=cfg.eval_batch_size, train=False, **env.loader_args(cfg.seed))
    _, acc, confusion = evaluate(model, loader, env)
    state = ckpt["state"]  # the row this checkpoint was saved at, unless it was saved inside an epoch
    logged = state["history"][-1] if state["history"] and state["history"][-1]["step"] == state["step"] else None
    where = f"epoch {logged['epoch']}, step {logged['step']}" if logged else f"step {state['step']}, inside an epoch"
    print(f"{args.run}/{args.checkpoint}.pt, {'the weight average' if which == 'ema' else 'its weights'} ({where}), "
          f"{len(labels):,} test images"
          f"{' (generated --smoke data)' if cfg.smoke else ' from ' + str(cfg.data)}, {env.name}")
    key = "ema_test_acc" if which == "ema" else "test_acc"
    print(f"test accuracy: {acc:.2%}" + (f" (the trainer logged {logged[key]:.2%} for this checkpoint)"
                                         if logged and args.data is None else ""))
    per_class = {"plain": confusion}
    if args.tta:
        _, tta_acc, per_class["flip TTA"] = evaluate(model, loader, env, tta=True)
        print(f"with flip TTA: {tta_acc:.2%} ({tta_acc - acc:+.2%})")
    print()
    print(f"{'class':<12}" + "".join(f"{k:>10}" for k in per_class))
    for i, name in enumerate(CLASSES):
        shares = ((c[i, i] / c[i].sum().clamp_min(1)).item() for c in per_class.values())
        print(f"{name:<12}" + "".join(f"{share:>10.1%}" for share in shares))
    png = Path(args.run) / f"{args.checkpoint}.confusion.png"
    save_png(confusion_image(confusion.numpy(), CLASSES), png)
    print(f"\nconfusion matrix: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
