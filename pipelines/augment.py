"""The augmentation recipe (`Augment`) and one batch's draws of it (`draw_augment`): numpy, no DALI.

The DALI graph (pipelines/dali.py) reads the draws as argument inputs. They live apart from it so
that the configuration, and the scripts that only read one (predict.py, export.py), hold an
`Augment` without loading DALI: most of a second at every start.
"""
import dataclasses
from typing import ClassVar

import numpy as np

from .data import SIZE


@dataclasses.dataclass
class Augment:
    """Per-image train augmentations; defaults = the original design's Albumentations recipe.

    The only place these numbers live: the trainer's flags default to them, and the preview's
    caption and the bench's Albumentations baseline are built from an `Augment`."""
    flip_p: float = 0.5  # horizontal flip
    ssr_p: float = 0.5  # shift-scale-rotate, about the image centre, bilinear, mean fill
    shift: float = 0.0625  # max shift, fraction of the image size, each axis (2 px on 32)
    scale: float = 0.1  # scale uniform in 1 +- scale
    rotate: float = 15.0  # degrees, uniform in +- rotate
    cutout_p: float = 0.5  # one square hole, centre uniform over the image, clipped, mean fill
    cutout_size: int = 16  # pixels

    RANGES: ClassVar[dict] = {"flip_p": (0, 1), "ssr_p": (0, 1), "cutout_p": (0, 1), "shift": (0, 1), "scale": (0, 0.99),
              "rotate": (0, 180), "cutout_size": (0, SIZE)}  # (low, high) of each

    def __post_init__(self):
        for name, (low, high) in self.RANGES.items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"Augment.{name} = {getattr(self, name)} must be in [{low:g}, {high:g}]")

    def describe(self):
        """What is drawn, in words and units: "flip p=0.5, shift-scale-rotate p=0.5 (...), cutout ..."."""
        parts = [f"flip p={self.flip_p:g}" if self.flip_p else None,
                 f"shift-scale-rotate p={self.ssr_p:g} (shift {self.shift * SIZE:g} px, scale 1\u00b1{self.scale:g}, "
                 f"rotate \u00b1{self.rotate:g}\u00b0)" if self.ssr_p else None,
                 f"cutout {self.cutout_size}x{self.cutout_size} p={self.cutout_p:g}" if self.cutout_p and self.cutout_size else None]
        return ", ".join(p for p in parts if p) or "no augmentation"


def draw_augment(aug, n, rng):
    """The per-image parameters of one batch of `n`, as DALI's argument inputs take them.

    flip: int32 (n,), 1 = mirror; matrix: float32 (n, 2, 3), the forward (source -> destination)
    affine map, identity where shift-scale-rotate is not drawn; anchor: float32 (n, 2), the
    cutout centre (y, x), uniform over the image; shape: float32 (n, 2), the hole's (h, w):
    0 x 0 (erases nothing) where cutout is not drawn. Coordinates are (x, y) with the origin at
    the first pixel's corner, so the image centre is (16, 16).
    """
    flip = rng.random(n) < aug.flip_p
    on = rng.random(n) < aug.ssr_p
    angle = np.radians(rng.uniform(-aug.rotate, aug.rotate, n)) * on
    scale = 1.0 + rng.uniform(-aug.scale, aug.scale, n) * on
    tx, ty = rng.uniform(-aug.shift, aug.shift, (2, n)) * SIZE * on
    a, b, c = scale * np.cos(angle), scale * np.sin(angle), SIZE / 2
    # dst = c + t + s R (src - c)  =>  offset = c + t - s R c
    matrix = np.stack([np.stack([a, -b, c + tx - a * c + b * c], 1),
                       np.stack([b, a, c + ty - b * c - a * c], 1)], 1)
    cut = rng.random(n) < aug.cutout_p
    anchor = rng.uniform(0.0, SIZE, (n, 2))
    side = aug.cutout_size * cut
    return {"flip": flip.astype(np.int32), "matrix": matrix.astype(np.float32),
            "anchor": anchor.astype(np.float32), "shape": np.stack([side, side], 1).astype(np.float32)}
