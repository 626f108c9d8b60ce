"""A picture of the train augmentations: `python -m pipelines.preview --data DIR --out aug.png`.

Each row is one image: the original, then several augmented draws through the real DALI
graph, un-normalized, scaled up so that a person can check them by eye.
"""
import argparse
import sys

import numpy as np

from .dali import CIFAR10_MEAN, CIFAR10_STD, Augment, make_loader
from .data import DataError, load_cifar10


def augment_grid(images, augment=None, *, draws=7, seed=0, zoom=4, gap=2):
    """uint8 (H, W, 3) grid: a row per image of `images`, original first, then `draws` draws."""
    augment = Augment() if augment is None else augment
    images = np.asarray(images, dtype=np.uint8)
    n = len(images)
    repeated = np.repeat(images, draws, axis=0)
    ids = np.arange(len(repeated))  # labels carry positions, so the shuffle can be undone
    out = np.zeros(repeated.shape, np.float32)
    loader = make_loader(repeated, ids, batch_size=len(repeated), train=True, augment=augment, seed=seed, device="cpu")
    for x, y in loader:
        out[y.numpy()] = x.permute(0, 2, 3, 1).float().numpy()
    augmented = np.clip(out * np.array(CIFAR10_STD) + np.array(CIFAR10_MEAN), 0, 255).round().astype(np.uint8)
    tiles = np.concatenate([images[:, None], augmented.reshape(n, draws, 32, 32, 3)], axis=1)  # (n, 1+draws, ...)
    tiles = tiles.repeat(zoom, axis=2).repeat(zoom, axis=3)  # nearest-neighbour zoom: pixels stay visible
    s = 32 * zoom + gap
    grid = np.full((n * s + gap, (1 + draws) * s + gap + gap, 3), 255, np.uint8)
    for r in range(n):
        for c in range(1 + draws):
            left = c * s + gap + (gap if c else 0)  # a wider gap after the original column
            grid[r * s + gap:(r + 1) * s, left:left + 32 * zoom] = tiles[r, c]
    return grid


def save_png(array, path):
    from PIL import Image

    Image.fromarray(array).save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipelines.preview", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data", help="anything load_cifar10 accepts (default: data)")
    parser.add_argument("--out", default="aug.png", help="PNG to write (default: aug.png)")
    parser.add_argument("--images", type=int, default=8, help="rows: images shown (default: 8)")
    parser.add_argument("--draws", type=int, default=7, help="augmented draws per image (default: 7)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.images < 1 or args.draws < 1:
        parser.error("--images and --draws must be at least 1")
    try:
        images, _ = load_cifar10(args.data, "test")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    pick = np.random.default_rng(args.seed).choice(len(images), min(args.images, len(images)), replace=False)
    grid = augment_grid(images[pick], draws=args.draws, seed=args.seed)
    save_png(grid, args.out)
    print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]}): original, then {args.draws} augmented draws per row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
