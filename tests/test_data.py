import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from conftest import add_bytes, binary_records, make_split, python_batch
from PIL import Image

from engine.config import Config, UserError
from engine.run import load_split
from pipelines.data import BINARY, DataError, data_format, fingerprint, hold_out, load_cifar10, subset, synthetic_cifar


def assert_split(root, split):
    images, labels = load_cifar10(root, split)
    want_images, want_labels = make_split(split)
    assert images.dtype == np.uint8 and images.shape == want_images.shape  # (N, 32, 32, 3) HWC
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(images, want_images)  # pixel-exact, channel order included


# --- the three formats round-trip ----------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "test"])
def test_binary_tarball_round_trip(binary_tarball, split):
    assert data_format(binary_tarball) == "binary"
    assert_split(binary_tarball, split)  # the tarball itself
    assert_split(binary_tarball.parent, split)  # a data folder holding it


def test_binary_extracted_folder(binary_tarball, tmp_path):
    with tarfile.open(binary_tarball) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    assert_split(tmp_path / "x", "train")
    assert_split(tmp_path / "x" / BINARY["folder"], "test")


@pytest.mark.parametrize("split", ["train", "test"])
def test_python_tarball_round_trip(python_tarball, split):
    assert data_format(python_tarball) == "python"
    assert_split(python_tarball, split)


def test_image_tree_round_trip(image_tree, tmp_path):
    assert data_format(image_tree) == "tree"
    assert_split(image_tree, "train")
    with tarfile.open(tmp_path / "tree.tar.gz", "w:gz") as tar:  # the same tree as a tarball
        tar.add(image_tree, arcname="cifar")
    assert_split(tmp_path / "tree.tar.gz", "test")


def test_image_tree_hands_out_encoded_bytes(image_tree):
    blobs, labels = load_cifar10(image_tree, "train", encoded=True)
    images, _ = make_split("train")
    assert len(blobs) == len(labels) == len(images)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(blobs[5].tobytes()))), images[5])


def test_encoded_needs_an_image_tree(binary_tarball):
    with pytest.raises(DataError, match="not encoded images"):
        load_cifar10(binary_tarball, "train", encoded=True)


def test_shared_jpeg_copy_loads_in_full(shared_jpeg):
    for split, n in (("train", 50_000), ("test", 10_000)):
        blobs, labels = load_cifar10(shared_jpeg, split, encoded=True)
        assert len(blobs) == n
        assert np.bincount(labels).tolist() == [n // 10] * 10
    images, labels = load_cifar10(shared_jpeg, "test")
    assert images.shape == (10_000, 32, 32, 3) and images.dtype == np.uint8


# --- every bad input is one clear DataError --------------------------------------------------

def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        load_cifar10(tmp_path / "nope", "train")
    assert "make data" in one_line(e)


def test_truncated_archive(binary_tarball):
    blob = binary_tarball.read_bytes()
    binary_tarball.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="corrupt or truncated|unreadable"):
        load_cifar10(binary_tarball, "train")


def test_garbage_archive(tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(b"\x1f\x8b not really gzip" * 10)
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_cifar10(tmp_path / "x.tar.gz", "train")


def test_a_file_that_is_no_archive(tmp_path):
    (tmp_path / "notes.txt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(DataError, match="not a tar or tar.gz archive") as e:
        load_cifar10(tmp_path / "notes.txt", "train")
    assert "image tree" in one_line(e)


def write_binary_folder(tmp_path, records):
    folder = tmp_path / BINARY["folder"]
    folder.mkdir()
    for name in BINARY["train"] + BINARY["test"]:
        (folder / name).write_bytes(records)
    return folder


def test_record_size_not_a_multiple(tmp_path):
    folder = write_binary_folder(tmp_path, binary_records(*make_split("test"))[:-100])
    with pytest.raises(DataError, match="not a whole number of 3073-byte records"):
        load_cifar10(folder, "train")


def test_label_outside_range(tmp_path):
    images, labels = make_split("test")
    labels[3] = 12
    folder = write_binary_folder(tmp_path, binary_records(images, labels))
    with pytest.raises(DataError, match="label 12 outside 0..9"):
        load_cifar10(folder, "test")


def test_image_not_32x32_rgb(image_tree):
    Image.new("RGB", (28, 28)).save(image_tree / "train" / "cat" / "0000.png")
    with pytest.raises(DataError, match="28x28 RGB; CIFAR-10 needs 32x32 RGB"):
        load_cifar10(image_tree, "train")
    Image.new("L", (32, 32)).save(image_tree / "train" / "cat" / "0000.png")
    with pytest.raises(DataError, match="32x32 L"):
        load_cifar10(image_tree, "train")


def test_empty_class_folder(image_tree):
    for f in (image_tree / "test" / "dog").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="test/dog: class folder missing or without"):
        load_cifar10(image_tree, "test")


def test_missing_class_folder(image_tree):
    for f in (image_tree / "test" / "dog").iterdir():
        f.unlink()
    (image_tree / "test" / "dog").rmdir()
    with pytest.raises(DataError, match="test/dog: class folder missing"):
        load_cifar10(image_tree, "test")


def test_unreadable_image(image_tree):
    (image_tree / "train" / "cat" / "0001.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="0001.png: unreadable image"):
        load_cifar10(image_tree, "train")


def corrupt(kind, folder):
    """A broken file of `kind` written into `folder`, as real trees get them; returns its name."""
    good = io.BytesIO()
    Image.fromarray(make_split("train")[0][0]).save(good, format="JPEG", quality=90)
    if kind == "truncated jpeg":
        (folder / "0001.jpg").write_bytes(good.getvalue()[:len(good.getvalue()) // 2])  # a copy cut short
        return "0001.jpg"
    if kind == "wrong-size png":
        Image.new("RGB", (64, 48)).save(folder / "0001.png")
        return "0001.png"
    (folder / "0001.jpg").write_bytes(b"")  # zero bytes: a copy that never got its contents
    return "0001.jpg"


@pytest.mark.parametrize("encoded", [False, True], ids=["raw", "encoded"])
@pytest.mark.parametrize("kind, message", [
    ("truncated jpeg", "truncated JPEG|unreadable image"),  # encoded: the missing end marker; raw: the decoder
    ("wrong-size png", "image is 64x48 RGB; CIFAR-10 needs 32x32 RGB"),
    ("zero-byte file", "unreadable image"),
])
def test_a_broken_image_in_a_tree_is_refused_at_load_naming_the_file(image_tree, kind, message, encoded):
    name = corrupt(kind, image_tree / "train" / "cat")
    with pytest.raises(DataError, match=message) as e:
        load_cifar10(image_tree, "train", encoded=encoded)
    assert f"train/cat/{name}: " in str(e.value) and "\n" not in str(e.value)


def test_every_encoded_file_is_checked_not_only_the_first(image_tree):
    last = sorted((image_tree / "train" / "truck").iterdir())[-1]
    last.write_bytes(last.read_bytes()[:-12])  # the PNG's IEND chunk cut off
    with pytest.raises(DataError, match=f"{last.name}: truncated PNG"):
        load_cifar10(image_tree, "train", encoded=True)


def test_the_fingerprint_tells_data_apart(image_tree):
    images, labels = load_cifar10(image_tree, "train")
    same = fingerprint(*load_cifar10(image_tree, "train"))
    assert fingerprint(images, labels) == same and same["images"] == 40
    other_pixels = images.copy()
    other_pixels[0, 0, 0] ^= 1  # one value of the first image (always in the sample)
    assert fingerprint(other_pixels, labels)["sample_sha256"] != same["sample_sha256"]
    assert fingerprint(images, labels[::-1].copy())["labels_sha256"] != same["labels_sha256"]
    assert fingerprint(*subset(images, labels, 20))["images"] == 20


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused(tmp_path, capfd):
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            add_bytes(tar, f"cifar-10-batches-py/{name}", pickle.dumps({b"data": Exploit()}, protocol=2))
    with pytest.raises(DataError, match=r"refused to load (posix|os)\.system"):
        load_cifar10(path, "train")
    assert "pwned" not in capfd.readouterr().out


def test_real_python_pickles_need_only_numpy(tmp_path):
    images, labels = make_split("test")
    d = pickle.loads(python_batch(images, labels))  # what the official pickles contain, plainly
    assert set(d) == {b"batch_label", b"labels", b"data", b"filenames"}


# --- generated data and class-balanced samples ------------------------------------------------

def test_synthetic_cifar_is_shaped_like_cifar_and_seeded():
    images, labels = synthetic_cifar(50, split="train", seed=1)
    assert images.dtype == np.uint8 and images.shape == (50, 32, 32, 3) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [5] * 10 and np.all(np.diff(labels) >= 0)
    np.testing.assert_array_equal(images, synthetic_cifar(50, split="train", seed=1)[0])
    test_images = synthetic_cifar(50, split="test", seed=1)[0]
    assert not np.array_equal(images, test_images)  # other noise, same class colours:
    assert np.abs(images.mean((1, 2)) - test_images.mean((1, 2))).max() < 15  # learnable across splits


def test_subset_is_class_balanced_and_keeps_order(image_tree):
    images, labels = load_cifar10(image_tree, "train", encoded=True)  # a list of bytes, class after class
    picked, picked_labels = subset(images, labels, 20, seed=0)
    assert len(picked) == 20 and isinstance(picked, list)
    assert np.bincount(picked_labels, minlength=10).tolist() == [2] * 10  # not the first 20: all one class
    assert np.all(np.diff(picked_labels) >= 0)
    assert all(any(p is i for i in images) for p in picked)
    whole = subset(images, labels, 1000)
    assert whole[0] is images  # asking for more than there is: everything


def test_val_holds_out_the_same_balanced_images_for_every_run_and_trains_on_the_rest(image_tree):
    images, labels = load_cifar10(image_tree, "train")
    n = len(labels)
    (train, train_labels), (val, val_labels) = hold_out(images, labels, 10)
    assert np.bincount(val_labels, minlength=10).tolist() == [1] * 10 and len(train_labels) == n - 10
    rows = lambda a: {x.tobytes() for x in a}  # noqa: E731
    assert rows(train) | rows(val) == rows(images) and not rows(train) & rows(val)  # a partition
    assert np.all(np.diff(train_labels) >= 0) and np.all(np.diff(val_labels) >= 0)  # original order kept
    for seed in (0, 7):  # the run's seed changes its sample of the rest, never the held-out images
        cfg = Config(data=str(image_tree), val=10, limit_train=10, seed=seed)
        np.testing.assert_array_equal(load_split(cfg, "val")[0], val)
        assert rows(load_split(cfg, "train")[0]) <= rows(train)
    assert load_split(Config(data=str(image_tree)), "train")[0].shape[0] == n  # no --val: all of it
    with pytest.raises(UserError, match=f"--val {n} holds out all of the {n} train images; lower --val"):
        load_split(Config(data=str(image_tree), val=n), "train")
