"""The augmentation recipe (`Augment`), one batch's draws of it (`draw_augment`), and what the DALI
graph reads of them (`graph_inputs`): numpy, no DALI.

The draws are the recipe's parameters per image (a flip, a shift-scale-rotate, a cutout square);
the graph reads them in the two forms that cost it least per image: one destination-to-source
affine matrix per image with the flip folded in (one warp, no per-image mirror argument), and one
mask per image that a multiply applies (no erase operator). They live apart from the graph so
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

    RANGES: ClassVar[dict] = {"flip_p": (0, 1), "ssr_p": (0, 1), "cutout_p": (0, 1), "shift": (0, 1),
                              "scale": (0, 0.99),
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
                 f"cutout {self.cutout_size}x{self.cutout_size} "
                 f"p={self.cutout_p:g}" if self.cutout_p and self.cutout_size else None]
        return ", ".join(p for p in parts if p) or "no augmentation"


def draw_augment(aug, n, rng, size=SIZE):
    """The per-image parameters of one batch of `n` images of size x size.

    flip: int32 (n,), 1 = mirror; matrix: float32 (n, 2, 3), the forward (source -> destination)
    affine map of the shift-scale-rotate, identity where it is not drawn; anchor: float32 (n, 2),
    the cutout centre (y, x), uniform over the image; shape: float32 (n, 2), the hole's (h, w):
    0 x 0 where cutout is not drawn. Coordinates are (x, y) with the origin at the first pixel's
    corner, so the centre of a 32 x 32 image is (16, 16). The image is flipped first, then warped,
    then cut (the order the original design's Albumentations recipe applies them in).
    """
    flip = rng.random(n) < aug.flip_p
    on = rng.random(n) < aug.ssr_p
    angle = np.radians(rng.uniform(-aug.rotate, aug.rotate, n)) * on
    scale = 1.0 + rng.uniform(-aug.scale, aug.scale, n) * on
    tx, ty = rng.uniform(-aug.shift, aug.shift, (2, n)) * size * on
    a, b, c = scale * np.cos(angle), scale * np.sin(angle), size / 2
    # dst = c + t + s R (src - c)  =>  offset = c + t - s R c
    matrix = np.stack([np.stack([a, -b, c + tx - a * c + b * c], 1),
                       np.stack([b, a, c + ty - b * c - a * c], 1)], 1)
    cut = rng.random(n) < aug.cutout_p
    anchor = rng.uniform(0.0, size, (n, 2))
    side = aug.cutout_size * cut
    return {"flip": flip.astype(np.int32), "matrix": matrix.astype(np.float32),
            "anchor": anchor.astype(np.float32), "shape": np.stack([side, side], 1).astype(np.float32)}


def graph_inputs(draws, size=SIZE):
    """What the graph reads of one batch's draws: {"matrix", "mask"}.

    matrix: float32 (n, 2, 3), the destination -> source map of flip-then-warp, which
    `warp_affine` takes as it is (inverse_map=True): the warp's inverse, then the mirror
    x -> size - x where the image is flipped; identity where neither is drawn (an identity warp
    gives the image back exactly). mask: uint8 (n, size, size, 1), 0 in the cutout square, 1
    elsewhere: the square's rows and columns [floor(centre - side / 2), + side), clipped at the
    border, the pixels DALI's `erase` (centered_anchor) cleared.
    """
    m = draws["matrix"].astype(np.float64)
    (a, b), (c, d) = m[:, 0, :2].T, m[:, 1, :2].T
    det = a * d - b * c
    inverse = np.stack([np.stack([d, -b], 1), np.stack([-c, a], 1)], 1) / det[:, None, None]  # 2 x 2, closed form
    matrix = np.concatenate([inverse, -inverse @ m[:, :, 2:]], axis=2)
    flip = draws["flip"].astype(bool)
    matrix[flip, 0] *= -1  # x_src = size - x: the mirror applied after the warp's inverse
    matrix[flip, 0, 2] += size
    start = np.floor(draws["anchor"] - draws["shape"] / 2).astype(np.int64)  # float32, as DALI computes it
    pixels = np.arange(size)
    inside = (pixels >= start[:, :, None]) & (pixels < start[:, :, None] + draws["shape"].astype(np.int64)[:, :, None])
    inside = inside.view(np.uint8)  # (n, rows / columns, size): 1 inside the square's span
    mask = np.empty((len(m), size, size, 1), np.uint8)  # in place: the batch's largest array, made once
    np.multiply(inside[:, 0, :, None], inside[:, 1, None, :], out=mask[..., 0])
    np.subtract(1, mask, out=mask)
    return {"matrix": matrix.astype(np.float32), "mask": mask}
