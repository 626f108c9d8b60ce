"""One DALI graph for CIFAR-10, on GPU or on DALI's CPU operators, and the loader around it.

train: [decode] -> flip -> shift-scale-rotate -> cutout -> normalize, each with its own
probability, per image (the original design's Albumentations recipe); eval: normalize only.
Normalization comes first (crop_mirror_normalize, which also does the flip), so that the
mean-fill of warp_affine and erase is exactly 0: `fill_value` is one scalar, and 0 after
normalization IS the per-channel dataset mean.

Epochs are reproducible from (seed, epoch) alone: each epoch gets a fresh pipeline whose seed
and shuffle derive from both, so a resumed run sees exactly the batches it would have seen.
"""
import dataclasses
import math
import os

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from .data import MEAN, SIZE, STD


@dataclasses.dataclass
class Augment:
    """Per-image train augmentations; defaults = the original design's Albumentations recipe."""
    flip_p: float = 0.5  # horizontal flip
    ssr_p: float = 0.5  # shift-scale-rotate, about the image centre, bilinear, mean fill
    shift: float = 0.0625  # max shift, fraction of the image size, each axis (2 px on 32)
    scale: float = 0.1  # scale uniform in 1 +- scale
    rotate: float = 15.0  # degrees, uniform in +- rotate
    cutout_p: float = 0.5  # one square hole, centre uniform over the image, clipped, mean fill
    cutout_size: int = 16  # pixels

    def __post_init__(self):
        for name in ("flip_p", "ssr_p", "cutout_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Augment.{name} = {getattr(self, name)} must be a probability in [0, 1]")
        for name in ("shift", "scale", "rotate", "cutout_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"Augment.{name} = {getattr(self, name)} must be >= 0")
        if self.scale >= 1:
            raise ValueError(f"Augment.scale = {self.scale} must be < 1 (scale factor 1 +- scale)")


def _uniform(lo, hi):
    """Per-sample uniform in [lo, hi); a constant when the range is empty (DALI refuses it)."""
    return fn.random.uniform(range=(lo, hi)) if hi > lo else float(lo)


def _ssr_matrix(aug):
    """Per-sample 2x3 forward (source -> destination) affine matrices, identity when not drawn.

    Built with DALI arithmetic rather than fn.transforms.*, which cost ~1.6 ms per batch of 256
    on the CPU side of a GPU pipeline (NOTES-DALI.md). Coordinates are (x, y) with the origin at
    the first pixel's corner, so the centre is (16, 16).
    """
    on = fn.cast(fn.random.coin_flip(probability=aug.ssr_p), dtype=types.FLOAT)
    angle = _uniform(-aug.rotate, aug.rotate) * (math.pi / 180.0) * on
    scale = 1.0 + _uniform(-aug.scale, aug.scale) * on
    tx = _uniform(-aug.shift, aug.shift) * SIZE * on
    ty = _uniform(-aug.shift, aug.shift) * SIZE * on
    a, b = scale * dmath.cos(angle), scale * dmath.sin(angle)
    c = SIZE / 2
    # dst = c + t + s R (src - c)  =>  offset = c + t - s R c
    row0 = fn.stack(a, -b, c + tx - a * c + b * c)
    row1 = fn.stack(b, a, c + ty - b * c - a * c)
    return fn.stack(row0, row1)


@pipeline_def(enable_conditionals=False)
def cifar_graph(source, *, device, encoded, train, augment, mean, std, half):
    """The whole graph. device: "cpu" or "gpu"; source yields (images or encoded bytes, labels)."""
    if encoded:
        blobs, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True)
        images = fn.decoders.image(blobs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
        labels = labels.gpu() if device == "gpu" else labels
    else:  # raw uint8 HWC, already on `device` (a CUDA tensor gathered on the GPU, or numpy)
        images, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                            device=device, layout=["HWC", ""])
    aug = augment if train else None
    flip = fn.random.coin_flip(probability=aug.flip_p) if aug and aug.flip_p > 0 else 0
    images = fn.crop_mirror_normalize(images, mirror=flip, mean=list(mean), std=list(std),
                                      dtype=types.FLOAT, output_layout="HWC")
    if aug and aug.ssr_p > 0:  # zero ranges still warp (by the identity): what the tests check
        images = fn.warp_affine(images, matrix=_ssr_matrix(aug), inverse_map=False, fill_value=0.0,
                                interp_type=types.INTERP_LINEAR)
    if aug and aug.cutout_p > 0 and aug.cutout_size > 0:
        # A hole of size 0 erases nothing: that is how a sample skips cutout.
        side = aug.cutout_size * fn.cast(fn.random.coin_flip(probability=aug.cutout_p), dtype=types.FLOAT)
        centre = fn.random.uniform(range=(0.0, float(SIZE)), shape=2)  # (y, x)
        images = fn.erase(images, anchor=centre, shape=fn.stack(side, side), axis_names="HW",
                          centered_anchor=True, fill_value=0.0)
    if half:
        images = fn.cast(images, dtype=types.FLOAT16)  # halves the bytes handed to torch
    return images, labels


class Loader:
    """Batches of one shard of CIFAR-10 through `cifar_graph`, one epoch per `iter()`.

    images: uint8 (N, 32, 32, 3) for the raw source, or a list of encoded image bytes (the
    encoded source, decoded by DALI every epoch), as `load_cifar10` returns them.
    train=True: shuffled from (seed, epoch), the partial last batch dropped, `augment` applied
    (None: no augmentation); train=False: every image once in order, the partial last batch
    kept, no augmentation. Yields (x, y): x (B, 3, 32, 32) in channels_last memory on `device`
    in `dtype`, y int64 (B,).
    """

    def __init__(self, images, labels, *, batch_size, train, device="cuda", augment=Augment(), seed=0,
                 shard_id=0, num_shards=1, dtype=torch.float32, mean=MEAN, std=STD, num_threads=None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
        if str(device) not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
            raise ValueError(f"device must be 'cuda' or 'cpu', not {device!r}")
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available; use device='cpu'")
        if num_shards < 1 or not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be in [0, num_shards), got shard_id={shard_id}, num_shards={num_shards}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, not {dtype}")
        if augment is not None and not isinstance(augment, Augment):
            raise ValueError(f"augment must be an Augment or None, not {type(augment).__name__}")
        self.encoded = isinstance(images, list)
        if not self.encoded:
            images = np.ascontiguousarray(images)
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (SIZE, SIZE, 3):
                raise ValueError(f"images must be uint8 (N, 32, 32, 3), not {images.dtype} {images.shape}")
        self.batch_size, self.train, self.augment = batch_size, train, augment
        self.device, self.dtype, self.mean, self.std = device, dtype, mean, std
        self.seed, self.shard_id, self.num_shards = seed, shard_id, num_shards
        self.num_threads = num_threads or min(4, os.cpu_count() or 1)
        self.epoch, self.skip = 0, 0
        self.n = len(labels)
        if device.type == "cuda" and not self.encoded:
            # Resident for the whole run (150 MB): batches are gathered on the GPU, no host trip.
            self.images = torch.as_tensor(images).to(device)
            self.labels = torch.as_tensor(labels).to(device)
        else:
            self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.shard_size = len(self._shard_indices(0))
        if train and self.shard_size < batch_size:
            raise ValueError(f"shard {shard_id} has {self.shard_size} images, fewer than one batch of {batch_size}")

    def _shard_indices(self, epoch):
        """This shard's slice of the epoch's permutation: disjoint across shards, covering all."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.train else np.arange(self.n)
        if self.train:  # equal shards, so every rank runs the same number of steps
            per = self.n // self.num_shards
            return order[self.shard_id * per:(self.shard_id + 1) * per]
        return np.array_split(order, self.num_shards)[self.shard_id]

    def __len__(self):
        return self.shard_size // self.batch_size if self.train else -(-self.shard_size // self.batch_size)

    def set_epoch(self, epoch, skip=0):
        """The next `iter()` runs `epoch`, starting after its first `skip` batches (a resumed run)."""
        self.epoch, self.skip = epoch, skip

    def _source(self, indices):
        batches = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)][self.skip:len(self)]
        if self.device.type == "cuda" and not self.encoded:
            batches = [torch.as_tensor(b).to(self.device) for b in batches]  # uploaded once per epoch

        def source(info):
            if info.iteration >= len(batches):
                raise StopIteration
            idx = batches[info.iteration]
            if self.encoded:
                return [self.images[i] for i in idx], self.labels[idx]
            return self.images[idx], self.labels[idx]

        return source

    def __iter__(self):
        on_gpu = self.device.type == "cuda"
        pipe = cifar_graph(
            self._source(self._shard_indices(self.epoch)),
            device="gpu" if on_gpu else "cpu", encoded=self.encoded, train=self.train, augment=self.augment,
            mean=self.mean, std=self.std, half=self.dtype in (torch.float16, torch.bfloat16),
            batch_size=self.batch_size, num_threads=self.num_threads,
            device_id=torch.cuda.current_device() if on_gpu and self.device.index is None else self.device.index,
            # The augmentation draws of epoch e on shard r depend on (seed, e, r) only.
            seed=int(np.random.default_rng([self.seed, self.epoch, self.shard_id]).integers(2**31 - 1)),
            prefetch_queue_depth=2, exec_dynamic=True,
        )
        batches = DALIGenericIterator(pipe, ["x", "y"], last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
        self.epoch, self.skip = self.epoch + 1, 0
        for batch in batches:
            x, y = batch[0]["x"], batch[0]["y"]
            # HWC -> NCHW view: the memory stays HWC, which is exactly channels_last. No copy.
            x = x.permute(0, 3, 1, 2)
            if x.dtype != self.dtype:
                x = x.to(self.dtype)  # bf16: DALI has no bfloat16 type, convert from its fp16
            yield x, y.view(-1).long()


make_loader = Loader  # the front door's name (`from pipelines import make_loader`), one signature
