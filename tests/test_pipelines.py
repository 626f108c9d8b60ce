"""The DALI graph on CPU operators (device="cpu"); GPU cases skip without CUDA."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import MEAN as CIFAR_MEAN
from pipelines import STD as CIFAR_STD
from pipelines import Augment, load_cifar10, make_loader
from pipelines.augment import draw_augment

MEAN, STD = np.array(CIFAR_MEAN, np.float32), np.array(CIFAR_STD, np.float32)
NONE = dict(flip_p=0.0, ssr_p=0.0, cutout_p=0.0)


def random_images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def normalized(images):
    return (images.astype(np.float32) - MEAN) / STD


def run(images, augment, *, seed=0, batch_size=None, device="cpu", **kwargs):
    """One train epoch over `images`, returned as HWC numpy in input order (labels = indices)."""
    ids = np.arange(len(images))
    loader = make_loader(images, ids, batch_size=batch_size or len(images), train=True, augment=augment,
                         seed=seed, device=device, **kwargs)
    out = np.zeros(images.shape, np.float32)
    for x, y in loader:
        out[y.cpu().numpy()] = x.permute(0, 2, 3, 1).float().cpu().numpy()
    return out


def centroid(img):
    """Intensity-weighted (row, col) centre of a single-channel map."""
    w = img / img.sum()
    rows, cols = np.indices(img.shape)
    return (w * rows).sum(), (w * cols).sum()


# --- each augmentation, checked against what it should do --------------------------------------

def test_no_augmentation_is_normalization():
    images = random_images(64)
    np.testing.assert_allclose(run(images, Augment(**NONE)), normalized(images), atol=1e-5)


def test_flip_with_p1_is_the_mirror_image():
    images = random_images(64)
    out = run(images, Augment(**{**NONE, "flip_p": 1.0}))
    np.testing.assert_allclose(out, normalized(images[:, :, ::-1]), atol=1e-5)


def test_zero_shift_scale_rotation_is_identity():
    images = random_images(64)
    out = run(images, Augment(**{**NONE, "ssr_p": 1.0}, shift=0.0, scale=0.0, rotate=0.0))
    np.testing.assert_allclose(out, normalized(images), atol=1e-5)


RAW = dict(mean=(0, 0, 0), std=(1, 1, 1))  # unnormalized: the 0 fill is black like the background


def dots(n, rows, cols):
    """Images that are black but for a white block at [rows, cols]."""
    images = np.zeros((n, 32, 32, 3), np.uint8)
    images[:, rows, cols] = 255
    return images


def test_pure_shift_moves_content_by_at_most_the_shift():
    images = dots(200, slice(14, 16), slice(14, 16))
    content = run(images, Augment(**{**NONE, "ssr_p": 1.0}, shift=0.0625, scale=0.0, rotate=0.0), **RAW)[..., 0]
    moves = np.array([np.subtract(centroid(c), (14.5, 14.5)) for c in content])
    assert np.abs(moves).max() <= 0.0625 * 32 + 1e-3  # never beyond 2 px on either axis
    assert np.abs(moves).max() > 1.5  # and the full range is used
    assert abs(moves.mean()) < 0.3 and moves[:, 0].std() > 0.5 and moves[:, 1].std() > 0.5
    np.testing.assert_allclose(content.sum(axis=(1, 2)), content[0].sum(), rtol=1e-3)  # nothing lost


def test_pure_rotation_keeps_the_centre_in_place():
    centre = dots(50, slice(15, 17), slice(15, 17))  # the 2x2 block around the centre point (16, 16)
    out = run(centre, Augment(**{**NONE, "ssr_p": 1.0}, shift=0.0, scale=0.0, rotate=15.0), **RAW)
    for c in out[..., 0]:
        np.testing.assert_allclose(centroid(c), (15.5, 15.5), atol=1e-3)
    off_centre = dots(50, slice(4, 6), slice(15, 17))  # an off-centre dot does move: rotation happened
    moved = run(off_centre, Augment(**{**NONE, "ssr_p": 1.0}, shift=0.0, scale=0.0, rotate=15.0), **RAW)
    # 11.5 px above the centre, +-15 degrees: the column moves up to 11.5 sin(15) = 3 px
    cols = np.array([centroid(c)[1] for c in moved[..., 0]])
    assert np.abs(cols - 15.5).max() <= 11.5 * np.sin(np.radians(15)) + 0.05 and cols.std() > 1.0


def test_cutout_p1_zeroes_exactly_one_clipped_square():
    images = random_images(200)
    out = run(images, Augment(**{**NONE, "cutout_p": 1.0}))
    ref = normalized(images)  # never exactly 0: the means are not integers
    touched_border = 0
    for o, r in zip(out, ref):
        hole = (o == 0).all(axis=2)
        rows, cols = np.nonzero(hole)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert hole.sum() == h * w and h <= 16 and w <= 16  # one filled rectangle, at most 16x16
        if 0 < rows.min() and rows.max() < 31 and 0 < cols.min() and cols.max() < 31:
            assert h == w == 16  # away from the border: the full square
        else:
            touched_border += 1
        np.testing.assert_allclose(o[~hole], r[~hole], atol=1e-5)  # nothing else changed
    assert touched_border > 0  # clipped squares happen too


def bilinear(img, inverse):
    """img (H, W, C) sampled at inverse @ (x, y, 1) of each destination pixel centre, bilinearly, 0 outside:
    DALI's convention (pixel centres at k + 0.5), written out in numpy."""
    h, w, _ = img.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    sx, sy = (inverse[i, 0] * xs + inverse[i, 1] * ys + inverse[i, 2] - 0.5 for i in (0, 1))
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    out = np.zeros(img.shape)
    for dy, wy in ((0, 1 - (sy - y0)), (1, sy - y0)):
        for dx, wx in ((0, 1 - (sx - x0)), (1, sx - x0)):
            yy, xx = y0 + dy, x0 + dx
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            out += (wy * wx * inside)[..., None] * img[yy.clip(0, h - 1), xx.clip(0, w - 1)]
    return out


def reference_augment(images, d):
    """The original design's recipe on the draws `d`, one image at a time: normalize, flip, warp by the forward
    matrix (its inverse sampled), then clear the cutout square [floor(centre - side / 2), + side), clipped."""
    out = []
    for img, flip, forward, centre, (side, _) in zip(images, d["flip"], d["matrix"], d["anchor"], d["shape"]):
        x = normalized(img)[:, ::-1] if flip else normalized(img)
        x = bilinear(x, np.linalg.inv(np.vstack([forward.astype(np.float64), [0, 0, 1]]))[:2])
        top, left = np.floor(centre - side / 2).astype(int)
        x[max(top, 0):max(top + int(side), 0), max(left, 0):max(left + int(side), 0)] = 0
        out.append(x)
    return np.stack(out)


def test_the_graph_gives_the_recipe_as_an_independent_numpy_reference_does():
    """Each image's flip, shift-scale-rotate and cutout, drawn as the loader draws them, against numpy: the
    graph folds the flip into one inverse matrix and makes the cutout a multiply, and gives the same images."""
    images, aug, n = random_images(96, seed=4), Augment(), 96  # all three at p 0.5: every combination occurs
    ids = np.arange(n)
    x, y = next(iter(make_loader(images, ids, batch_size=n, train=True, augment=aug, seed=3, device="cpu")))
    d = draw_augment(aug, n, np.random.default_rng([3, 0, 0, 0]))  # (seed, epoch, shard, batch index)
    assert d["flip"].any() and (d["shape"][:, 0] > 0).any() and (d["matrix"][:, 0, 1] != 0).any()
    want = reference_augment(images[y.numpy()], d)  # the batch holds images y, in that order
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), want, atol=2e-4, rtol=0)


@pytest.mark.parametrize("which", ["flip_p", "ssr_p", "cutout_p"])
def test_probabilities_match_over_many_draws(which):
    images = random_images(2000, seed=1)
    p = 0.3
    out = run(images, Augment(**{**NONE, which: p}), batch_size=500)
    ref = normalized(images)
    changed = np.abs(out - ref).reshape(len(out), -1).max(axis=1) > 1e-4
    assert abs(changed.mean() - p) < 0.045  # 4 standard deviations at n=2000


# --- normalization, epochs, shards, determinism ------------------------------------------------

def test_normalization_statistics():
    images = random_images(500, seed=2)
    mean, std = images.reshape(-1, 3).mean(0), images.reshape(-1, 3).std(0)
    loader = make_loader(images, np.zeros(500, np.int64), batch_size=128, train=False, device="cpu",
                         mean=tuple(mean), std=tuple(std))
    x = torch.cat([x for x, _ in loader]).double()
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3, dtype=torch.float64), atol=1e-3, rtol=0)


def test_batches_are_channels_last_float_and_labels_int64():
    loader = make_loader(random_images(40), np.arange(40), batch_size=16, train=True, device="cpu")
    x, y = next(iter(loader))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    x16, _ = next(iter(make_loader(random_images(40), np.arange(40), batch_size=16, train=True, device="cpu",
                                   dtype=torch.bfloat16)))
    assert x16.dtype == torch.bfloat16


def test_nchw_batches_hold_the_same_values():
    images = random_images(40)
    x_cl, y_cl = next(iter(make_loader(images, np.arange(40), batch_size=16, train=True, device="cpu", seed=3)))
    x, y = next(iter(make_loader(images, np.arange(40), batch_size=16, train=True, device="cpu", seed=3,
                                 memory_format=torch.contiguous_format)))
    assert x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, x_cl) and torch.equal(y, y_cl)  # the same augmented batch, laid out NCHW
    with pytest.raises(ValueError, match="memory_format must be"):
        make_loader(images, np.arange(40), batch_size=16, train=True, device="cpu", memory_format=torch.preserve_format)


def epoch_ids(loader):
    return np.concatenate([y.numpy() for _, y in loader])


def test_train_epoch_covers_each_image_at_most_once_and_reshuffles():
    loader = make_loader(random_images(100), np.arange(100), batch_size=32, train=True, device="cpu")
    assert len(loader) == 3
    first, second = epoch_ids(loader), epoch_ids(loader)
    assert len(first) == len(second) == 96  # the partial batch of 4 is dropped
    assert len(set(first)) == 96 and len(set(second)) == 96
    assert not np.array_equal(first, second)


def test_eval_counts_every_image_once_in_order():
    loader = make_loader(random_images(100), np.arange(100), batch_size=32, train=False, device="cpu")
    assert len(loader) == 4
    sizes = [len(y) for _, y in loader]
    assert sizes == [32, 32, 32, 4]
    np.testing.assert_array_equal(epoch_ids(loader), np.arange(100))


@pytest.mark.parametrize("train", [True, False])
def test_shards_are_disjoint_and_cover_the_set(train):
    shards = [epoch_ids(make_loader(random_images(120), np.arange(120), batch_size=20, train=train,
                                    device="cpu", shard_id=r, num_shards=3)) for r in range(3)]
    assert sum(len(s) for s in shards) == 120
    assert len(set(np.concatenate(shards))) == 120


def test_same_seed_same_batches_other_seed_differs():
    images = random_images(64)
    a, b, c = (run(images, Augment(), seed=s, batch_size=32) for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_resumed_epoch_replays_exactly():
    images = random_images(64)
    loader = make_loader(images, np.arange(64), batch_size=32, train=True, device="cpu", seed=3)
    epoch_ids(loader)
    second = [x for x, _ in loader]
    resumed = make_loader(images, np.arange(64), batch_size=32, train=True, device="cpu", seed=3)
    resumed.set_epoch(1)
    for x, x_resumed in zip(second, (x for x, _ in resumed)):
        torch.testing.assert_close(x, x_resumed, rtol=0, atol=0)


def test_resumed_mid_epoch_replays_the_rest_exactly():
    images = random_images(96)
    full = make_loader(images, np.arange(96), batch_size=16, train=True, device="cpu", seed=5)
    full.set_epoch(2)
    batches = list(full)
    resumed = make_loader(images, np.arange(96), batch_size=16, train=True, device="cpu", seed=5)
    resumed.set_epoch(2, skip=4)  # as after a stop at step 4: the same images AND the same augmentation
    rest = list(resumed)
    assert len(rest) == len(batches) - 4
    for (x, y), (x_resumed, y_resumed) in zip(batches[4:], rest):
        torch.testing.assert_close(x, x_resumed, rtol=0, atol=0)
        torch.testing.assert_close(y, y_resumed, rtol=0, atol=0)


def rss_bytes():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_each_loader_builds_its_pipeline_once_and_memory_stays_flat(jpeg_tree):
    blobs, labels = load_cifar10(jpeg_tree, "train", encoded=True)
    loaders = [make_loader(random_images(64), np.arange(64), batch_size=16, train=True, device="cpu"),
               make_loader(random_images(50), np.arange(50), batch_size=16, train=False, device="cpu"),
               make_loader(blobs, labels, batch_size=8, train=True, device="cpu")]
    for epoch in range(20):
        if epoch == 3:  # DALI's pools are warm by now
            before = rss_bytes()
        for loader in loaders:
            assert len(epoch_ids(loader)) == (64 if loader is loaders[0] else 50 if loader is loaders[1] else 40)
    assert [loader.builds for loader in loaders] == [1, 1, 1]
    assert rss_bytes() - before < 8 * 2**20  # a new pipeline per epoch grew it by ~1 MB each


def test_an_epoch_left_unfinished_costs_a_rebuild_and_nothing_else():
    loader = make_loader(random_images(64), np.arange(64), batch_size=16, train=True, device="cpu", seed=1)
    next(iter(loader))  # epoch 0, abandoned after one batch
    second = [x for x, _ in loader]  # epoch 1
    fresh = make_loader(random_images(64), np.arange(64), batch_size=16, train=True, device="cpu", seed=1)
    fresh.set_epoch(1)
    for x, x_fresh in zip(second, (x for x, _ in fresh)):
        torch.testing.assert_close(x, x_fresh, rtol=0, atol=0)
    assert loader.builds == 2


# --- the encoded source ----------------------------------------------------------------------------

def test_encoded_source_decodes_like_pillow(jpeg_tree):
    blobs, labels = load_cifar10(jpeg_tree, "train", encoded=True)
    loader = make_loader(blobs, labels, batch_size=16, train=False, device="cpu", mean=(0, 0, 0), std=(1, 1, 1))
    decoded = torch.cat([x for x, _ in loader]).permute(0, 2, 3, 1).numpy()
    pillow = np.stack([np.asarray(Image.open(io.BytesIO(b.tobytes())).convert("RGB")) for b in blobs])
    diff = np.abs(decoded - pillow.astype(np.float32))
    assert diff.mean() < 1.0 and diff.max() <= 8  # JPEG decoders may round IDCT/upsampling differently


def test_encoded_source_trains_with_augmentation(jpeg_tree):
    blobs, labels = load_cifar10(jpeg_tree, "train", encoded=True)
    x, y = next(iter(make_loader(blobs, labels, batch_size=8, train=True, device="cpu")))
    assert x.shape == (8, 3, 32, 32) and torch.isfinite(x).all()


# --- bad arguments ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size"),
    (dict(device="tpu"), "device"),
    (dict(shard_id=2, num_shards=2), "shard_id"),
    (dict(batch_size=64), "fewer than one batch"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_loader(random_images(40), np.arange(40), **{"batch_size": 8, "train": True, "device": "cpu", **kwargs})


def test_cuda_requested_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        make_loader(random_images(40), np.arange(40), batch_size=8, train=True, device="cuda")


# --- GPU (skipped without CUDA) --------------------------------------------------------------------

@pytest.mark.cuda
def test_gpu_augmentation_matches_cpu_with_the_same_seed():
    images = random_images(512)
    every = Augment(flip_p=0.5, ssr_p=1.0, cutout_p=1.0)  # every augmentation on
    gpu = run(images, every, device="cuda", batch_size=128, seed=4)
    cpu = run(images, every, batch_size=128, seed=4)
    diff = np.abs(gpu - cpu)  # the same draws; bilinear warps may round differently at the edges
    assert diff.mean() < 1e-3 and (diff > 1e-2).mean() < 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_batches_are_channels_last_in_the_model_dtype(dtype):
    loader = make_loader(random_images(256), np.arange(256), batch_size=64, train=True, device="cuda", dtype=dtype)
    x, y = next(iter(loader))
    assert x.is_cuda and y.is_cuda and x.dtype == dtype and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    x_nchw, _ = next(iter(make_loader(random_images(256), np.arange(256), batch_size=64, train=True, device="cuda",
                                      dtype=dtype, memory_format=torch.contiguous_format)))
    assert x_nchw.is_contiguous() and x_nchw.dtype == dtype


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_handoff_survives_a_lagging_torch_stream(dtype):
    """DALI runs ahead while torch's stream is busy: no batch may change under torch's feet."""
    images = random_images(2048, seed=3)
    loader = make_loader(images, np.arange(2048), batch_size=128, train=True, augment=Augment(), seed=9,
                         device="cuda", dtype=dtype)

    def epoch_zero(lag):
        loader.set_epoch(0)
        seen = []
        for x, y in loader:
            if lag:
                torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time queued before torch reads the batch
            seen.append((x.float().sum(dim=(1, 2, 3)), y.clone()))  # queued behind the sleep
            if not lag:
                torch.cuda.synchronize()  # the reference: torch never behind
        torch.cuda.synchronize()
        return [(sums.cpu(), y.cpu()) for sums, y in seen]

    reference = epoch_zero(lag=False)
    for _ in range(3):
        lagged = epoch_zero(lag=True)
        assert len(lagged) == len(reference) == 16
        for (sums, y), (ref_sums, ref_y) in zip(lagged, reference):
            torch.testing.assert_close(y, ref_y, rtol=0, atol=0)
            torch.testing.assert_close(sums, ref_sums, rtol=0, atol=1e-3)


@pytest.mark.cuda
def test_gpu_raw_source_matches_cpu():
    images = random_images(256)
    gpu = run(images, Augment(**NONE), device="cuda", batch_size=64)
    np.testing.assert_allclose(gpu, run(images, Augment(**NONE), batch_size=64), atol=1e-4)
    x, _ = next(iter(make_loader(images, np.arange(256), batch_size=64, train=True, device="cuda")))
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.cuda
def test_gpu_nvjpeg_decode_matches_cpu_decode(jpeg_tree):
    blobs, labels = load_cifar10(jpeg_tree, "test", encoded=True)
    kw = dict(batch_size=8, train=False, mean=(0, 0, 0), std=(1, 1, 1))
    gpu = torch.cat([x.cpu() for x, _ in make_loader(blobs, labels, device="cuda", **kw)])
    cpu = torch.cat([x for x, _ in make_loader(blobs, labels, device="cpu", **kw)])
    assert (gpu - cpu).abs().max() <= 8 and (gpu - cpu).abs().mean() < 1.0


@pytest.mark.cuda
def test_gpu_nvjpeg_decode_of_real_cifar_jpegs_within_one_grey_level(shared_jpeg):
    blobs, labels = load_cifar10(shared_jpeg, "test", encoded=True)
    blobs, labels = blobs[:2000], labels[:2000]
    kw = dict(batch_size=500, train=False, mean=(0, 0, 0), std=(1, 1, 1))
    gpu = torch.cat([x.cpu() for x, _ in make_loader(blobs, labels, device="cuda", **kw)])
    cpu = torch.cat([x for x, _ in make_loader(blobs, labels, device="cpu", **kw)])
    assert (gpu - cpu).abs().mean() < 1.0
