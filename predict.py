"""Classify image files with a trained run: `python predict.py runs/<name> a.png b.jpg`
(`make predict RUN=runs/<name> IMAGES="a.png b.jpg"`).

For each file, the top classes with their probabilities, as a table. An image that is not
32x32 is resized to it (bilinear, with a note); a file that cannot be read is named in one line
and the others are still classified (exit 1 if any could not be).
"""
import argparse
import sys

import numpy as np
import torch

from engine.checkpoint import add_run_flags, load_weights
from engine.cli import run_main
from engine.device import memory_format
from net import build_model
from pipelines import CLASSES, MEAN, SIZE, STD


def read_image(path):
    """(uint8 (32, 32, 3) pixels, a note or None); OSError or ValueError for a file Pillow cannot read."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size == (SIZE, SIZE):
            return np.array(im), None
        note = f"{im.size[0]}x{im.size[1]}, resized to {SIZE}x{SIZE}"
        return np.array(im.resize((SIZE, SIZE), Image.Resampling.BILINEAR)), note


def main(argv=None):
    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__.splitlines()[0])
    add_run_flags(parser)
    parser.add_argument("images", nargs="+", help="image files (anything Pillow reads)")
    parser.add_argument("--top", type=int, default=3, choices=range(1, 11), metavar="K",
                        help="classes shown (default: 3)")
    args = parser.parse_args(argv)
    weights, _, _, cfg = load_weights(args.run, args.checkpoint, args.weights)
    layout = memory_format(cfg.channels_last)  # the run's, as it trained
    model = build_model(dropout=cfg.dropout).eval().to(memory_format=layout)  # on CPU, fp32: a handful of images
    model.load_state_dict(weights)

    rows, notes, failed = [], [], 0
    for path in args.images:
        try:
            pixels, note = read_image(path)
        except (OSError, ValueError) as e:  # missing, unreadable, not an image: say which, go on with the rest
            print(f"error: {path}: cannot read it as an image ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                  file=sys.stderr)
            failed += 1
            continue
        if note:
            notes.append(f"note: {path}: {note}")
        x = (torch.from_numpy(pixels).float() - torch.tensor(MEAN)) / torch.tensor(STD)  # as the DALI graph normalizes
        with torch.no_grad():
            probs = model(x.permute(2, 0, 1)[None].contiguous(memory_format=layout)).softmax(1)[0]
        top = probs.topk(args.top)
        rows.append((path, [f"{CLASSES[i]} {p:.1%}" for p, i in zip(top.values.tolist(), top.indices.tolist())]))
    if rows:
        width = max(len(path) for path, _ in rows)
        cell = max(len(c) for _, cells in rows for c in cells)
        ordinal = ["1st", "2nd", "3rd"] + [f"{k}th" for k in range(4, 11)]
        print(f"{'file':<{width}}  " + "  ".join(f"{ordinal[k]:<{cell}}" for k in range(args.top)).rstrip())
        for path, cells in rows:
            print(f"{path:<{width}}  " + "  ".join(f"{c:<{cell}}" for c in cells).rstrip())
    for note in notes:
        print(note)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
