"""One DALI graph for CIFAR-10, on GPU or on DALI's CPU operators, and the loader around it.

train: [decode] -> normalize -> one warp (flip and shift-scale-rotate) -> cutout, each with its
own probability, per image (the original design's Albumentations recipe); eval: normalize only.
Normalization comes first, so that the fill of the warp and of the cutout is exactly 0:
`fill_value` is one scalar, and 0 after normalization IS the per-channel dataset mean.

What a batch costs outside the images (../shared/NOTES-DALI.md has the measurements):
- The per-image parameters are drawn with numpy in one source callback (pipelines/augment.py),
  not by DALI random/arithmetic operators: argument inputs live on the CPU even in a GPU graph,
  and DALI runs its CPU operators one after another.
- The graph reads them in the forms that cost least per image: no per-image operator argument
  (reading one re-checks the whole batch's argument for every image, a host cost quadratic in the
  batch), but the flip folded into one destination-to-source matrix per image, handed to
  `warp_affine` as its second input (on the GPU, uninverted), and the cutout as a multiply by a
  per-image mask. Images that draw neither flip nor warp get the identity, which gives them back
  exactly: one path for every image, no conditionals.
- Each loader builds its pipeline once and resets it per epoch: a build costs 50-60 ms on CPU
  and more on a GPU (streams, pinned buffers, the nvJPEG decoder), and DALI's pool never shrinks.
- Batches are handed over stream-ordered: `pipe.run(torch's stream)` binds DALI's outputs to
  torch's current stream instead of waiting for them on the host (DALIGenericIterator waits), and
  the copy into torch's memory (also the cast to the model's dtype) is queued on that stream;
  DALI's buffer is held until that copy has run, since DLPack gives DALI its buffer back as soon
  as Python drops it, with no ordering against torch's stream.

Epochs are reproducible from (seed, epoch) alone, and each batch from (seed, epoch, shard,
batch index): a run resumed in the middle of an epoch sees exactly the batches, augmentation
included, that an uninterrupted run would have seen.
"""
import collections
import os

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from .augment import Augment, draw_augment, graph_inputs
from .data import MEAN, SIZE, STD, is_encoded


def used_draws(aug):
    """The `graph_inputs` the graph reads for `aug`: DALI warns about unused ones."""
    if aug is None:
        return ()
    warp, cutout = aug.flip_p > 0 or aug.ssr_p > 0, aug.cutout_p > 0 and aug.cutout_size > 0
    return ("matrix",) * warp + ("mask",) * cutout


@pipeline_def(enable_conditionals=False)
def cifar_graph(data, draws, *, device, encoded, augment, mean, std):
    """The whole graph. device: "cpu" or "gpu"; data yields (images or encoded bytes, labels) per
    batch, draws the `used_draws(augment)` inputs of the same batch (augment None: none).
    Emits float32 HWC: the loader's copy into torch is also the one cast to the model's dtype."""
    if encoded:
        blobs, labels = fn.external_source(source=data, num_outputs=2, batch=True, batch_info=True)
        images = fn.decoders.image(blobs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
        labels = labels.gpu() if device == "gpu" else labels
    else:  # raw uint8 HWC, already on `device` (a CUDA tensor gathered on the GPU, or numpy)
        images, labels = fn.external_source(source=data, num_outputs=2, batch=True, batch_info=True,
                                            device=device, layout=["HWC", ""])
    names = used_draws(augment)
    # One source for both: each source output is a copy per batch. Drawn on the CPU; on a GPU graph
    # both go over as data inputs (a matrix and a mask per image), not as per-image arguments.
    inputs = fn.external_source(source=draws, num_outputs=len(names), batch=True, batch_info=True,
                                layout=[{"matrix": "", "mask": "HWC"}[n] for n in names]) if names else []
    arg = {n: x.gpu() if device == "gpu" else x for n, x in zip(names, inputs)}
    images = fn.crop_mirror_normalize(images, mean=list(mean), std=list(std), dtype=types.FLOAT, output_layout="HWC")
    if "matrix" in arg:  # zero ranges and no flip still warp, by the identity: what the tests check
        images = fn.warp_affine(images, arg["matrix"], fill_value=0.0, interp_type=types.INTERP_LINEAR)
    if "mask" in arg:
        images = images * arg["mask"]
    return images, labels


class Loader:
    """Batches of one shard of CIFAR-10 through `cifar_graph`, one epoch per `iter()`.

    images: uint8 (N, 32, 32, 3) for the raw source, or a list of encoded image bytes (the
    encoded source, decoded by DALI every epoch), as `load_cifar10` returns them.
    train=True: shuffled from (seed, epoch), the partial last batch dropped, `augment` applied
    (None: no augmentation); train=False: every image once in order, the partial last batch
    kept, no augmentation. Yields (x, y): x (B, 3, 32, 32) on `device` in `dtype` and
    `memory_format` (channels_last, as DALI writes it, or NCHW at the cost of a transpose), y
    int64 (B,). The pipeline is built on the first `iter()` and reset after each full epoch
    (`builds` counts the builds); an epoch left unfinished costs one rebuild.
    """

    def __init__(self, images, labels, *, batch_size, train, device="cuda", augment=Augment(), seed=0,
                 shard_id=0, num_shards=1, dtype=torch.float32, memory_format=torch.channels_last, mean=MEAN, std=STD,
                 num_threads=None):
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
        if memory_format not in (torch.channels_last, torch.contiguous_format):
            raise ValueError("memory_format must be torch.channels_last or torch.contiguous_format, not "
                             f"{memory_format}")
        if augment is not None and not isinstance(augment, Augment):
            raise ValueError(f"augment must be an Augment or None, not {type(augment).__name__}")
        self.encoded, self.size = is_encoded(images), SIZE
        if not self.encoded:
            images = np.ascontiguousarray(images)
            square = images.ndim == 4 and images.shape[3] == 3 and images.shape[1] == images.shape[2]
            if images.dtype != np.uint8 or not square:
                raise ValueError(f"images must be uint8 (N, 32, 32, 3), not {images.dtype} {images.shape}")
            self.size = images.shape[1]  # 32: CIFAR; the bench's host-cost rows use 1 x 1 images
        self.batch_size, self.train, self.augment = batch_size, train, augment if train else None
        self.device, self.dtype, self.memory_format, self.mean, self.std = device, dtype, memory_format, mean, std
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
        self.builds = 0  # pipelines built so far: one per loader, unless an epoch is left unfinished
        self._batches, self._first, self._epoch_now = [], 0, 0  # the plan of the epoch being served
        self._pipe, self._finished = None, True

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

    # The two source callbacks. DALI calls them ahead of use (prefetch), with the iteration
    # number within the current epoch; both read the plan that `__iter__` set before the epoch.

    def _data(self, info):
        if info.iteration >= len(self._batches):
            raise StopIteration
        idx = self._batches[info.iteration]
        if self.encoded:
            return [self.images[i] for i in idx], self.labels[idx]
        return self.images[idx], self.labels[idx]  # on the GPU: a gather on torch's stream, which DALI copies on

    def _draws(self, info):
        if info.iteration >= len(self._batches):
            raise StopIteration
        index = self._first + info.iteration  # the batch's index in its epoch: resumed runs replay it exactly
        rng = np.random.default_rng([self.seed, self._epoch_now, self.shard_id, index])
        d = graph_inputs(draw_augment(self.augment, len(self._batches[info.iteration]), rng, self.size), self.size)
        return tuple(d[name] for name in used_draws(self.augment))

    def _build(self):
        on_gpu = self.device.type == "cuda"
        self.builds += 1
        return cifar_graph(
            self._data, self._draws, device="gpu" if on_gpu else "cpu", encoded=self.encoded, augment=self.augment,
            mean=self.mean, std=self.std, batch_size=self.batch_size, num_threads=self.num_threads,
            device_id=(self.device.index if self.device.index is not None else torch.cuda.current_device()) if on_gpu
            else None,
            seed=self.seed, prefetch_queue_depth=2, exec_dynamic=True)

    def __iter__(self):
        indices = self._shard_indices(self.epoch)
        if self.device.type == "cuda" and not self.encoded:
            indices = torch.from_numpy(indices).to(self.device)  # one upload per epoch: the batches are views
        self._batches = [indices[i:i + self.batch_size] for i in range(0, len(indices),
                                                                       self.batch_size)][self.skip:len(self)]
        self._first, self._epoch_now = self.skip, self.epoch
        self.epoch, self.skip = self.epoch + 1, 0
        if self._pipe is None or not self._finished:
            self._pipe = None  # an unfinished epoch's prefetched batches are stale: build anew
            self._pipe = self._build()
        else:
            self._pipe.reset()  # the plan above is in place: DALI's prefetch for this epoch reads it
        self._finished = False
        return self._handoff(self._pipe)

    def _batches_of(self, pipe):
        """DALI's (x, y) of each batch of the epoch as torch tensors (DLPack, no copy). On a GPU they are
        bound to torch's current stream: work queued there after this runs after DALI's, and the host
        does not wait for DALI."""
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        while True:
            try:
                x, y = pipe.run(stream)
            except StopIteration:  # the source's end of the epoch, once every prefetched batch is out
                return
            yield torch.from_dlpack(x.as_tensor()), torch.from_dlpack(y.as_tensor())

    def _handoff(self, pipe):
        keep = _HeldUntilUsed() if self.device.type == "cuda" else None
        for x, y in self._batches_of(pipe):
            # HWC -> NCHW view: the memory stays HWC, which is exactly channels_last.
            x, y = x.permute(0, 3, 1, 2), y.view(-1)
            if keep is not None:  # copy into torch's memory on its stream (and cast): see the module's doc
                x_out = x.to(self.dtype, copy=True, memory_format=self.memory_format)
                y_out = y.to(torch.int64, copy=True)
                keep.hold((x, y))
                x, y = x_out, y_out
            else:  # CPU: no stream to race, and torch's tensor keeps DALI's buffer alive
                x, y = x.to(self.dtype, memory_format=self.memory_format), y.long()
            yield x, y
        self._finished = True


class _HeldUntilUsed:
    """DALI buffers kept alive until the torch work queued on them (the hand-off copy) has run.

    A CUDA event is recorded on torch's stream after the copy; a buffer is let go once its event
    has completed (a query, never a wait), so DALI cannot refill memory a queued copy still reads.
    """

    def __init__(self):
        self.pending = collections.deque()

    def hold(self, buffers):
        event = torch.cuda.Event()
        event.record()
        self.pending.append((event, buffers))
        while self.pending and self.pending[0][0].query():
            self.pending.popleft()


make_loader = Loader  # the front door's name (`from pipelines import make_loader`), one signature
