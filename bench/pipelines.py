"""Bench rows for the data pipelines alone: DALI (raw, without augmentation, encoded), the
plain-torch augmenter doing the same three augmentations, the original design's Albumentations
loader; and the costs outside the images (the numpy parameter draws, the host's work per batch
that augmentation adds, an epoch's start)."""
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines import MEAN, STD, Augment, load_cifar10, make_loader, synthetic_cifar
from pipelines.augment import draw_augment, graph_inputs
from pipelines.data import data_format, pixels

from .timing import endless, measure


def bench_data(path, n_encoded, n_synthetic):
    """(raw images, labels, encoded images, description): the real set if there, else synthetic."""
    if not Path(path).exists():
        images, labels = synthetic_cifar(n_synthetic)
        return images, labels, jpeg_encode(images[:n_encoded]), \
            f"synthetic_cifar({n_synthetic}), no CIFAR-10 at {path} (encoded: {n_encoded} of them as JPEG q75)"
    if data_format(path) == "tree":  # encoded files: decode the same ones for the raw rows (one read of the copy)
        blobs, labels = load_cifar10(path, "train", encoded=True)
        return pixels(blobs, range(len(blobs))), labels, blobs, f"CIFAR-10 train split from {path}"
    images, labels = load_cifar10(path, "train")
    return images, labels, jpeg_encode(images[:n_encoded]), \
        f"CIFAR-10 train split from {path} (encoded: its first {n_encoded} images as JPEG q75)"


def jpeg_encode(images, quality=75):
    import io

    from PIL import Image

    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        out.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    return out


def bench_dali(images, labels, device, batch, timing, augment=Augment()):
    loader = make_loader(images, labels, batch_size=batch, train=True, augment=augment, device=device,
                         dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    it = endless(loader)
    return measure(lambda: next(it), images_per_step=batch, **timing)


def bench_draws(batch=512, repeats=5, calls=50):
    """Milliseconds to draw one batch's augmentation parameters with numpy and turn them into what the
    graph reads (the loader's callback: matrices and masks)."""
    aug, times = Augment(), []
    for r in range(repeats):
        t0 = time.perf_counter()
        for i in range(calls):
            graph_inputs(draw_augment(aug, batch, np.random.default_rng([0, r, 0, i])))  # seeded as the loader seeds it
        times.append((time.perf_counter() - t0) / calls * 1e3)
    return {"ms": statistics.median(times), "min": min(times), "max": max(times), "batch": batch}


def bench_host_cost(device, timing, batches=(512, 1024, 2048)):
    """What augmentation adds to a batch's host work, in ms: the loader's graph on 1 x 1 images (the
    image work vanishes; the per-image work of sources, arguments and operators remains), augmented
    minus not, at each batch size. A cost that quadruples when the batch doubles is the signature of
    a per-image argument (DALI re-checks the whole batch's argument for every image)."""
    rows = {}
    for batch in batches:
        images, labels = np.zeros((8 * batch, 1, 1, 3), np.uint8), np.zeros(8 * batch, np.int64)  # 8 batches an epoch
        ms = {name: batch / bench_dali(images, labels, device, batch, timing, augment=aug)["img_per_s"] * 1e3
              for name, aug in (("augmented_ms", Augment()), ("plain_ms", None))}
        rows[str(batch)] = {**ms, "cost_ms": ms["augmented_ms"] - ms["plain_ms"]}
    costs = [r["cost_ms"] for r in rows.values()]
    return {"batches": rows, "growth_per_doubling": [b / a if a > 0 else None for a, b in zip(costs, costs[1:])]}


def bench_epoch_start(images, labels, device, batch, repeats=5):
    """Milliseconds from `iter(loader)` to the first batch: building the pipeline (a new loader's
    first epoch) and resetting it (every later epoch)."""
    build, reset = [], []
    for _ in range(repeats):
        loader = make_loader(images, labels, batch_size=batch, train=True, device=device,
                             dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        for times in (build, reset):
            t0 = time.perf_counter()
            it = iter(loader)
            next(it)
            times.append((time.perf_counter() - t0) * 1e3)
            for _ in it:  # finish the epoch: only a finished one is reset rather than rebuilt
                pass
        assert loader.builds == 1
    return {"build_ms": statistics.median(build), "reset_ms": statistics.median(reset), "batch": batch}


def torch_augment(x, aug, gen):
    """The same three augmentations in plain torch on a device-resident uint8 batch (B, 32, 32, 3)."""
    b, dev = len(x), x.device
    mean, std = (torch.tensor(v, device=dev).view(1, 3, 1, 1) for v in (MEAN, STD))
    x = (x.permute(0, 3, 1, 2).float() - mean) / std
    u = torch.rand(b, 9, device=dev, generator=gen)  # per image: 3 coins and 6 uniforms
    x = torch.where((u[:, 0] < aug.flip_p).view(-1, 1, 1, 1), x.flip(3), x)
    on = (u[:, 1] < aug.ssr_p).float()
    angle = (u[:, 2] * 2 - 1) * math.radians(aug.rotate) * on
    scale = 1 + (u[:, 3] * 2 - 1) * aug.scale * on
    shift = (u[:, 4:6] * 2 - 1) * aug.shift * 2 * on[:, None]  # affine_grid units: the image spans [-1, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # destination -> source
    theta = torch.stack([torch.stack([cos, sin, -shift[:, 0]], 1), torch.stack([-sin, cos, -shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # 0 = mean
    centre = u[:, 6:8] * 32
    ys = torch.arange(32, device=dev).view(1, 32, 1)
    xs = torch.arange(32, device=dev).view(1, 1, 32)
    half = aug.cutout_size / 2
    hole = ((ys - centre[:, 0].view(-1, 1, 1)).abs() < half) & ((xs - centre[:, 1].view(-1, 1, 1)).abs() < half)
    hole &= (u[:, 8] < aug.cutout_p).view(-1, 1, 1)
    x = x.masked_fill(hole[:, None], 0.0)
    return x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


def bench_torch_augment(images, device, batch, timing):
    """The plain-torch augmenter over a device-resident dataset: DALI's peer on every machine."""
    x_all = torch.as_tensor(images).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    aug, n = Augment(), len(images)
    perm = torch.randperm(n, device=device, generator=gen)
    state = {"i": 0}

    def step():
        i = state["i"] % (n // batch)
        state["i"] += 1
        torch_augment(x_all[perm[i * batch:(i + 1) * batch]], aug, gen)

    return measure(step, images_per_step=batch, **timing)


class AlbumentationsSet(torch.utils.data.Dataset):
    """The original design's loader: per-image CPU augmentation in DataLoader workers."""

    def __init__(self, images, labels):
        import albumentations as A

        self.images, self.labels, aug = images, labels, Augment()  # the recipe's numbers, from their one place
        side = (aug.cutout_size, aug.cutout_size)
        self.transform = A.Compose([
            A.HorizontalFlip(p=aug.flip_p),
            A.ShiftScaleRotate(shift_limit=aug.shift, scale_limit=aug.scale, rotate_limit=aug.rotate, p=aug.ssr_p),
            A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=side, hole_width_range=side,
                            fill=tuple(int(round(m)) for m in MEAN), p=aug.cutout_p),
            A.Normalize(mean=[m / 255 for m in MEAN], std=[s / 255 for s in STD]),
        ])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.transform(image=self.images[i])["image"]
        return torch.from_numpy(x.transpose(2, 0, 1)), int(self.labels[i])


def bench_albumentations(images, labels, batch, timing):
    import warnings

    warnings.filterwarnings("ignore", message=".*ShiftScaleRotate.*")
    loader = torch.utils.data.DataLoader(AlbumentationsSet(images, labels), batch_size=batch, shuffle=True,
                                         drop_last=True, num_workers=os.cpu_count(), persistent_workers=True)
    it = endless(loader)
    return measure(lambda: next(it), images_per_step=batch, **timing)
