"""Pictures a person checks by eye, drawn with Pillow; the trainer logs both to TensorBoard.

- `augment_grid`, also `python -m pipelines.preview --data DIR --out aug.png`: one row per class
  (an image of it), the original framed and headed "original", then augmented draws through
  the real DALI graph, un-normalized and scaled up;
- `confusion_image`: the test confusion matrix, large enough to read at TensorBoard's card
  size, with every class name whole.
"""
import argparse
import os
import sys

import numpy as np

from .augment import Augment
from .dali import make_loader
from .data import CLASSES, MEAN, STD, DataError, load_cifar10

HEADER = 24  # px: the strip with the column titles, one line high
LINE = 18  # px: each further line of the caption
FRAME = (220, 40, 40)  # the original column's frame: it tells originals from draws at a glance


def font(size):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow's built-in scalable font: no file to find


def one_per_class(labels, seed=0):
    """Index of one random image of each class present, in class order."""
    rng = np.random.default_rng(seed)
    return np.array([rng.choice(np.flatnonzero(labels == c)) for c in np.unique(labels)])


def augment_grid(images, augment=None, *, names=None, draws=7, seed=0, zoom=4, gap=2):
    """uint8 (H, W, 3) picture: a row per image, its original first (framed), then `draws` draws.

    names: a label per row, written in a left margin (the class names, say).
    """
    from PIL import Image, ImageDraw

    augment = Augment() if augment is None else augment
    images = np.asarray(images, dtype=np.uint8)
    n = len(images)
    repeated = np.repeat(images, draws, axis=0)
    ids = np.arange(len(repeated))  # labels carry positions, so the shuffle can be undone
    out = np.zeros(repeated.shape, np.float32)
    loader = make_loader(repeated, ids, batch_size=len(repeated), train=True, augment=augment, seed=seed, device="cpu")
    for x, y in loader:
        out[y.numpy()] = x.permute(0, 2, 3, 1).float().numpy()
    augmented = np.clip(out * np.array(STD) + np.array(MEAN), 0, 255).round().astype(np.uint8)
    tiles = np.concatenate([images[:, None], augmented.reshape(n, draws, 32, 32, 3)], axis=1)  # (n, 1+draws, ...)
    tiles = tiles.repeat(zoom, axis=2).repeat(zoom, axis=3)  # nearest-neighbour zoom: pixels stay visible

    text = font(14)
    margin = 8 + max((int(text.getlength(s)) for s in names), default=0) if names is not None else 0
    s = 32 * zoom + gap
    frame = 2  # px around the original, and the extra gap after its column
    width = margin + (1 + draws) * s + gap + 2 * frame
    left = [margin + gap + frame + c * s + (2 * frame if c else 0) for c in range(1 + draws)]
    caption = wrap(f"{draws} draws: {augment.describe()}", text, width - left[1] - 4)
    header = HEADER + LINE * (len(caption) - 1)
    grid = np.full((header + n * s + gap, width, 3), 255, np.uint8)
    for r in range(n):
        top = header + gap + r * s
        grid[top - frame:top + 32 * zoom + frame, left[0] - frame:left[0] + 32 * zoom + frame] = FRAME
        for c in range(1 + draws):
            grid[top:top + 32 * zoom, left[c]:left[c] + 32 * zoom] = tiles[r, c]
    picture = Image.fromarray(grid)
    draw = ImageDraw.Draw(picture)
    draw.text((left[0], 4), "original", fill=FRAME, font=text)
    for i, line in enumerate(caption):
        draw.text((left[1], 4 + i * LINE), line, fill="black", font=text)
    for r, name in enumerate(names if names is not None else []):
        draw.text((4, header + gap + r * s + 16 * zoom - 8), name, fill="black", font=text)
    return np.asarray(picture)


def wrap(caption, text_font, width):
    """The caption in lines no wider than `width` px, broken after its commas."""
    lines = []
    for part in caption.replace(", ", ",\n").splitlines():
        if lines and text_font.getlength(lines[-1] + " " + part) <= width:
            lines[-1] += " " + part
        else:
            lines.append(part)
    return lines


def confusion_image(confusion, classes, cell=52):
    """uint8 HWC heat map of a confusion matrix: rows true class, columns predicted, row-normalised.

    Each cell shows its count; the shade is the fraction of the row. Column names are written
    vertically, so that long names ("automobile") fit whole over a narrow column.
    """
    from PIL import Image, ImageDraw

    confusion = np.asarray(confusion)
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    text, small = font(16), font(14)
    label = 12 + max(int(text.getlength(c)) for c in classes)  # room for the longest name, row and column
    n, top = len(classes), 30 + label
    img = Image.new("RGB", (label + n * cell + 10, top + n * cell + 10), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 6), "true class (rows) vs predicted (columns), shade = fraction of the row", fill="black", font=small)
    for i, name in enumerate(classes):
        draw.text((label - 6 - text.getlength(name), top + i * cell + cell // 2 - 9), name, fill="black", font=text)
        column = Image.new("RGB", (label, cell), "white")  # drawn across, then turned upright
        ImageDraw.Draw(column).text((6, cell // 2 - 9), name, fill="black", font=text)
        img.paste(column.rotate(90, expand=True), (label + i * cell, 30))
        for j in range(n):
            shade = int(255 * (1 - rates[i, j]))
            box = (label + j * cell, top + i * cell, label + (j + 1) * cell - 2, top + (i + 1) * cell - 2)
            draw.rectangle(box, fill=(shade, shade, 255), outline=(90, 90, 90) if i == j else None)
            count = str(int(confusion[i, j]))
            draw.text((box[0] + (cell - small.getlength(count)) / 2, box[1] + cell // 2 - 9), count,
                      fill="white" if shade < 128 else "black", font=small)
    return np.asarray(img)


def save_png(array, path):
    """Written to a temporary name, then renamed: an interrupted write leaves no broken PNG."""
    from PIL import Image

    tmp = f"{path}.tmp"
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipelines.preview", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data", help="anything load_cifar10 accepts (default: data)")
    parser.add_argument("--out", default="aug.png", help="PNG to write (default: aug.png)")
    parser.add_argument("--draws", type=int, default=7, help="augmented draws per image (default: 7)")
    parser.add_argument("--seed", type=int, default=0, help="which image of each class, and the draws")
    args = parser.parse_args(argv)
    if args.draws < 1:
        parser.error("--draws must be at least 1")
    try:
        images, labels = load_cifar10(args.data, "test")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pick = one_per_class(labels, args.seed)
    grid = augment_grid(images[pick], names=[CLASSES[c] for c in labels[pick]], draws=args.draws, seed=args.seed)
    save_png(grid, args.out)
    print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]}): one image per class, original, then {args.draws} draws")
    return 0


if __name__ == "__main__":
    sys.exit(main())
