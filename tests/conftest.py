"""Tiny CIFAR-10 copies in each official format, written by the tests themselves; train.py run inside a
test's process (`train_here`), and the one short run that tests read after training (`short_run`).

Every fixture holds the same pixels (seeded), so a test can check a round trip pixel-exactly.
Tests marked `@pytest.mark.cuda` skip without CUDA; `make gpu-check` runs exactly those.
"""
import contextlib
import io
import os
import pickle
import runpy
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# The Triton kernels' CPU tests run them in Triton's interpreter, which has to be chosen before Triton is
# first imported and then holds for the whole process (torch.compile imports Triton too): so here, for every
# test process. Where there is an NVIDIA GPU (nvidia-smi, as the Makefile asks), Triton builds them instead.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from PIL import Image

from pipelines.data import BINARY, CLASSES, PYTHON, synthetic_cifar

ROOT = Path(__file__).resolve().parents[1]
# The JPEG copy of CIFAR-10 beside the project's own checkouts; CIFAR10_JPEG points elsewhere (a GPU box).
SHARED_JPEG = Path(os.environ.get("CIFAR10_JPEG", ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one; `make gpu-check` runs them)")
    config.addinivalue_line("markers", "long: takes tens of seconds; started first, so the suite does not end on it")
    config.addinivalue_line("markers", "slow: minutes, or the package registry: past the suite's 3-minute budget, so "
                                       "run apart, by `make test ARGS='-m slow'` (CI runs it after the suite)")


def pytest_collection_modifyitems(config, items):
    # Longest first: pytest-xdist hands out tests in this order (after the shared-run groups), and a long test
    # started last leaves the other workers idle while it runs.
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
    if "slow" not in (config.option.markexpr or ""):
        apart = pytest.mark.skip(reason="slow: `make test ARGS='-m slow'` runs it (CI does, after the suite)")
        for item in items:
            if item.get_closest_marker("slow"):
                item.add_marker(apart)
    import torch  # here, not at the top: pytest-xdist's controller loads this file too, and never runs a test

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
N_PER_SPLIT = {"train": 40, "test": 20}  # 4 and 2 images of each class


def make_split(split, seed=0):
    """(images uint8 (N,32,32,3), labels int64 (N,)): every class present, labels in order."""
    return synthetic_cifar(N_PER_SPLIT[split], split=split, seed=seed)


def binary_records(images, labels):
    """Official binary layout: label byte, then R, G, B planes."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([labels.astype(np.uint8)[:, None], planes], axis=1).tobytes()


def add_bytes(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_binary_tarball(path, batches=5):
    """Official `cifar-10-binary.tar.gz`: train split across data_batch_1..5.bin."""
    images, labels = make_split("train")
    with tarfile.open(path, "w:gz") as tar:
        for i, idx in enumerate(np.array_split(np.arange(len(labels)), batches), 1):
            add_bytes(tar, f"{BINARY['folder']}/data_batch_{i}.bin", binary_records(images[idx], labels[idx]))
        add_bytes(tar, f"{BINARY['folder']}/test_batch.bin", binary_records(*make_split("test")))
        add_bytes(tar, f"{BINARY['folder']}/batches.meta.txt", "\n".join(CLASSES).encode())
    return path


def python_batch(images, labels):
    """A pickle as the official python tarball has them: bytes keys, (N, 3072) uint8 planes."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return pickle.dumps({b"batch_label": b"x", b"labels": labels.tolist(), b"data": planes,
                         b"filenames": [b"f.png"] * len(labels)}, protocol=2)


def write_python_tarball(path, batch=python_batch):
    images, labels = make_split("train")
    with tarfile.open(path, "w:gz") as tar:
        for i, idx in enumerate(np.array_split(np.arange(len(labels)), 5), 1):
            add_bytes(tar, f"{PYTHON['folder']}/data_batch_{i}", batch(images[idx], labels[idx]))
        add_bytes(tar, f"{PYTHON['folder']}/test_batch", batch(*make_split("test")))
    return path


def write_image_tree(root, fmt="png", quality=95):
    """train/<class>/NNNN.png and test/<class>/NNNN.png (png: lossless, so pixel-exact)."""
    root = Path(root)
    for split in N_PER_SPLIT:
        images, labels = make_split(split)
        for i, (img, label) in enumerate(zip(images, labels)):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:04d}.{fmt}", quality=quality)
    return root


@pytest.fixture
def binary_tarball(tmp_path):
    return write_binary_tarball(tmp_path / BINARY["name"])


@pytest.fixture
def python_tarball(tmp_path):
    return write_python_tarball(tmp_path / PYTHON["name"])


@pytest.fixture
def image_tree(tmp_path):
    return write_image_tree(tmp_path / "tree")


@pytest.fixture
def jpeg_tree(tmp_path):
    return write_image_tree(tmp_path / "jpeg", fmt="jpg")


@pytest.fixture(scope="session")
def shared_jpeg():
    if not SHARED_JPEG.exists():
        pytest.skip("the CIFAR-10 JPEG copy (../shared/data) is only in the project's own checkouts")
    return SHARED_JPEG


# train.py run directly, as a user would: not as a child of `make test` (it words its resume hint for make)
MAKE_VARIABLES = ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")
TRAIN_ENV = {**{k: v for k, v in os.environ.items() if k not in MAKE_VARIABLES}, "PYTHONUNBUFFERED": "1"}


def train_here(*args):
    """`python train.py ARGS` run inside this test's process, through train.py's own `__main__` block (its exit
    code, its one-line errors); returns what subprocess.run would: returncode, stdout, stderr.

    For the runs whose process boundary is not the point (signals, kills and torchrun stay subprocesses): a new
    process would import torch, Dynamo and DALI again, about 5 CPU-seconds here, before its first step. train.py
    leaves the process as it found it (signal handlers, its run folder's lock); this puts back the rest."""
    import torch

    made_by_make = {k: os.environ.pop(k) for k in MAKE_VARIABLES if k in os.environ}
    argv, threads, code, output = sys.argv, torch.get_num_threads(), 0, ()
    handlers = signal_handlers()
    sys.argv = ["train.py", *map(str, args)]
    try:
        with captured_output() as output:
            try:
                runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
            except SystemExit as e:
                code = e.code
    except BaseException:
        sys.stderr.write("".join(output))  # what the run printed, beside the traceback in pytest's report
        raise
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
        os.environ.update(made_by_make)
    assert signal_handlers() == handlers, "train.py left its Ctrl-C handling in place"  # it is its to put back
    return subprocess.CompletedProcess(["train.py", *map(str, args)], code, *output)


def signal_handlers():
    """SIGINT's and SIGTERM's handlers, and the wake-up file descriptor (read by setting it, then back)."""
    wakeup_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup_fd)
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}, wakeup_fd


@contextlib.contextmanager
def captured_output():
    """A list that holds, once the block ends, what Python and C++ (DALI, torch) wrote to stdout and to stderr,
    each in order, as a subprocess's pipes would: two strings."""
    files = [tempfile.TemporaryFile("w+", encoding="utf-8") for _ in range(2)]
    python_streams, saved_fds = (sys.stdout, sys.stderr), []
    for stream, fd, file in zip(python_streams, (1, 2), files):
        stream.flush()
        saved_fds.append(os.dup(fd))
        os.dup2(file.fileno(), fd)
    sys.stdout, sys.stderr = (open(fd, "w", encoding="utf-8", buffering=1, closefd=False) for fd in (1, 2))
    output = []
    try:
        yield output
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = python_streams
        for fd, saved in zip((1, 2), saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        for file in files:
            with file:
                file.seek(0)
                output.append(file.read())


@pytest.fixture(scope="session")
def short_run(tmp_path_factory):
    """(run folder, stdout) of the one finished run that tests read after training: 3 steps of 8 images from a
    JPEG image tree, decoded by DALI (--source encoded), cut short by --max-steps inside the first epoch (of 4
    steps), evaluated on 20 test images; with a moving average of the weights (--ema) and the final weights
    also evaluated with flip TTA (--tta); in NCHW memory (--no-channels-last), where every other run is
    channels_last. Tests that use it are marked xdist_group("short"), so one worker makes it once."""
    tmp = tmp_path_factory.mktemp("short")
    tree = write_image_tree(tmp / "jpeg", fmt="jpg")
    r = train_here("--data", tree, "--source", "encoded", "--device", "cpu", "--limit-train", "32", "--limit-test",
                   "20",
                   "--batch-size", "8", "--eval-batch-size", "20", "--epochs", "5", "--max-steps", "3", "--ema", "0.9",
                   "--tta", "--no-channels-last", "--runs", tmp, "--name", "short")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "short", r.stdout
