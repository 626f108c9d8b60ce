"""CIFAR-10 on disk -> uint8 arrays in memory.

Three forms are accepted, each for the splits "train" (50,000) and "test" (10,000):
  1. the official binary tarball `cifar-10-binary.tar.gz` (or its extracted folder): records
     of 1 label byte + 3,072 pixel bytes (R, G, B planes of 32x32), parsed with numpy;
  2. the official python tarball `cifar-10-python.tar.gz` (or its folder): pickles, read by an
     unpickler that builds numpy arrays and plain data and refuses everything else;
  3. an image tree `train/<class>/*.jpg|jpeg|png`, `test/<class>/*`, or a .tar/.tar.gz of it;
     class index = position of the folder name in sorted order.

`load_cifar10(root, split)` returns images (N, 32, 32, 3) uint8 HWC and labels (N,) int64.
`load_cifar10(root, split, encoded=True)` (image trees only) returns the encoded file bytes
instead, for DALI's decoder. Every problem with the input raises `DataError`, one line that
names the file and what to do.

`synthetic_cifar` makes a small learnable stand-in (smoke runs, tests, the bench without data);
`subset` takes a class-balanced sample (`--limit-train`, `--limit-test`); `hold_out` a fixed balanced
validation set (`--val`).
`download` and `import_copy` serve `make data` (`python -m pipelines.fetch`).
"""
import codecs
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np

# --- the dataset's constants: every module takes them from here -------------------------------

SPLITS = {"train": 50_000, "test": 10_000}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SIZE = 32  # images are 32x32 RGB: the loaders refuse anything else
MEAN = (125.307, 122.950, 113.865)  # per channel, 0..255, over the 50,000 train images
STD = (62.993, 62.089, 66.705)
BINARY = {"name": "cifar-10-binary.tar.gz", "folder": "cifar-10-batches-bin",
          "md5": "c32a1d4ab5d03f1284b67883e8d87530",
          "url": "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
          "train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
PYTHON = {"name": "cifar-10-python.tar.gz", "folder": "cifar-10-batches-py",
          "md5": "c58f30108f718f92721af3b95e74349a",
          "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
RECORD = 1 + 3 * 32 * 32  # one label byte, then the R, G and B planes


class DataError(Exception):
    """Bad or missing input data: the message is one line for the user."""


# --- reading files, from a folder or from inside a tarball -------------------------------------

class Files:
    """Read-only view of a folder or a .tar/.tar.gz: `names()` and `read(name)` by relative path."""

    def __init__(self, path):
        self.path = Path(path)
        self.tar = None
        if self.path.is_file():
            if not _looks_like_archive(self.path):
                raise DataError(f"{self.path}: not a tar or tar.gz archive; pass a CIFAR-10 tarball, its extracted "
                                f"folder, or a train/<class>/ image tree")
            try:
                self.tar = tarfile.open(self.path)  # transparent gzip
                members = self.tar.getmembers()
                self.members = {m.name.lstrip("./"): m for m in members if m.isfile()}
                self.dirs = [m.name.lstrip("./") for m in members if m.isdir()]
            except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
                raise DataError(f"{self.path}: corrupt or truncated archive ({_short(e)}); fetch it again") from None

    def names(self):
        if self.tar is not None:
            return list(self.members)
        return [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]

    def folders(self):
        if self.tar is not None:
            return self.dirs
        return [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_dir()]

    def where(self, name):
        return f"{self.path}:{name}" if self.tar is not None else str(self.path / name)

    def read(self, name):
        try:
            if self.tar is not None:
                return self.tar.extractfile(self.members[name]).read()
            return (self.path / name).read_bytes()
        except (tarfile.TarError, EOFError, zlib.error, OSError, KeyError) as e:
            raise DataError(f"{self.where(name)}: unreadable ({_short(e)}); fetch the data again") from None



_opened = {}  # the last archive indexed, by (path, size, modification time): its Files, for the next split


def _files(path):
    """Files(path), an archive's index kept for the next call: indexing one takes a pass over all of it (60,000
    JPEGs: 2.4 s), and a run reads the train split, then the test split, of the same archive."""
    path = Path(path)
    if not path.is_file():
        return Files(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _opened:
        files = Files(path)  # raises on a bad archive, which is then not kept
        _opened.clear()
        _opened[key] = files
    return _opened[key]


def _looks_like_archive(path):
    """A gzip, bzip2 or xz stream, or a tar header: what tarfile.open can read (it says only "could not be opened")."""
    with open(path, "rb") as f:
        head = f.read(512)
    return head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ")) or head[257:262] == b"ustar"


def _short(e):
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _find_prefix(names, wanted):
    """The folder prefix under which all `wanted` files sit ('' or 'x/'), or None."""
    for name in names:
        if name.endswith("/" + wanted[0]) or name == wanted[0]:
            prefix = name[: -len(wanted[0])]
            return prefix
    return None


# --- the three formats -------------------------------------------------------------------------

def _check_labels(labels, where):
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{where}: label {int(labels.max() if labels.max() > 9 else labels.min())} outside 0..9; the "
                        "file is not CIFAR-10")


def _read_batch(files, name):
    if name not in set(files.names()):
        raise DataError(f"{files.where(name)}: missing batch file; the copy is incomplete, fetch it again")
    return files.read(name)


def _read_binary(files, prefix, batch_names):
    images, labels = [], []
    for batch in batch_names:
        name = prefix + batch
        raw = np.frombuffer(_read_batch(files, name), dtype=np.uint8)
        if raw.size == 0 or raw.size % RECORD:
            raise DataError(f"{files.where(name)}: {raw.size} bytes is not a whole number of {RECORD}-byte records; "
                            "the file is truncated")
        records = raw.reshape(-1, RECORD)
        _check_labels(records[:, 0], files.where(name))
        labels.append(records[:, 0].astype(np.int64))
        images.append(records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # planes -> HWC
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


_reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's array rebuilder, wherever it lives


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain containers; refuses any other global (no code runs)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): codecs.encode}  # how Python 3 writes bytes at protocol 2

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def _read_python(files, prefix, batch_names):
    images, labels = [], []
    for batch in batch_names:
        name = prefix + batch
        blob = _read_batch(files, name)
        try:
            d = _PlainDataUnpickler(io.BytesIO(blob), encoding="bytes").load()
        except pickle.UnpicklingError as e:
            raise DataError(f"{files.where(name)}: not a plain-data CIFAR pickle ({e}); use the official "
                            "tarball") from None
        except Exception as e:  # truncated or garbled pickle streams raise many types
            raise DataError(f"{files.where(name)}: corrupt pickle ({_short(e)}); fetch it again") from None
        try:
            data = np.asarray(d[b"data"], dtype=np.uint8)
            lab = np.asarray(d[b"labels"], dtype=np.int64)
            data = data.reshape(len(lab), 3, 32, 32)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{files.where(name)}: not a CIFAR-10 batch ({_short(e)}); use the official "
                            "tarball") from None
        _check_labels(lab, files.where(name))
        images.append(data.transpose(0, 2, 3, 1))
        labels.append(lab)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _tree_index(files, prefix, split):
    """[(name, label)] of one split of an image tree, in sorted order, with its checks."""
    names = [n for n in files.names() if n.startswith(prefix)]
    entries = [n[len(prefix):].rstrip("/").split("/") for n in names + files.folders() if n.startswith(prefix)]
    classes = sorted({e[1] for e in entries if len(e) >= 2 and e[0] == "train"})
    if not classes:
        raise DataError(f"{files.where(prefix + 'train')}: no class folders; expected train/<class>/*.jpg")
    by_class = {c: [] for c in classes}
    for n in sorted(names):
        parts = n[len(prefix):].split("/")
        if len(parts) == 3 and parts[0] == split and n.lower().endswith(IMAGE_SUFFIXES):
            if parts[1] not in by_class:
                raise DataError(f"{files.where(n)}: class folder '{parts[1]}' is not in train/; "
                                "the splits must share classes")
            by_class[parts[1]].append(n)
    for c, members in by_class.items():
        if not members:
            raise DataError(f"{files.where(f'{prefix}{split}/{c}')}: class folder missing or without .jpg/.png images")
    return [(n, label) for label, c in enumerate(classes) for n in by_class[c]]


def decode_image(blob, where="image"):
    """uint8 (32, 32, 3) pixels of one encoded CIFAR image; DataError naming `where` otherwise."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as im:
            if im.size != (32, 32) or im.mode != "RGB":
                raise DataError(f"{where}: image is {im.size[0]}x{im.size[1]} {im.mode}; CIFAR-10 needs 32x32 RGB")
            return np.asarray(im)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{where}: unreadable image ({_short(e)}); replace or remove it") from None


def check_encoded(blob, where="image"):
    """DataError naming `where` unless `blob` is a whole 32x32 RGB JPEG or PNG, checked without
    decoding it: the header (format, size, mode, read by Pillow) and the format's end marker
    (JPEG's EOI, PNG's IEND chunk), which a truncated file lacks. Tens of microseconds a file:
    every file of an encoded source is checked at load, so DALI never meets a broken one in the
    middle of an epoch."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as im:
            fmt, size, mode = im.format, im.size, im.mode
    except Exception as e:
        raise DataError(f"{where}: unreadable image ({_short(e)}); replace or remove it") from None
    if size != (32, 32) or mode != "RGB":
        raise DataError(f"{where}: image is {size[0]}x{size[1]} {mode}; CIFAR-10 needs 32x32 RGB")
    tail = bytes(blob[-64:])
    if (fmt == "JPEG" and b"\xff\xd9" not in tail) or (fmt == "PNG" and b"IEND" not in tail):
        raise DataError(f"{where}: truncated {fmt} ({len(blob):,} bytes, no end marker); replace or remove it")
    if fmt not in ("JPEG", "PNG"):
        raise DataError(f"{where}: a {fmt} image; an image tree holds JPEG or PNG files")


def _read_tree(files, prefix, split, encoded):
    index = _tree_index(files, prefix, split)
    labels = np.array([label for _, label in index], dtype=np.int64)
    _check_labels(labels, files.where(prefix + split))  # more than 10 class folders
    blobs = [files.read(n) for n, _ in index]
    if encoded:
        for (n, _), blob in zip(index, blobs):
            check_encoded(blob, files.where(n))  # here, not inside DALI in the middle of an epoch
        return [np.frombuffer(b, dtype=np.uint8) for b in blobs], labels
    return np.stack([decode_image(b, files.where(n)) for (n, _), b in zip(index, blobs)]), labels


# --- the front door ----------------------------------------------------------------------------

def _locate(root):
    """(Files, format, prefix) for whatever `root` holds."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data path {root} does not exist; run `make data` or pass the folder that holds CIFAR-10")
    candidates = [root]
    if root.is_dir():  # a data folder: its extracted sets first, then tarballs, then itself
        candidates = [root / BINARY["folder"], root / PYTHON["folder"], root / BINARY["name"], root / PYTHON["name"]]
        candidates += sorted(p for p in root.iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz")))
        candidates = [p for p in candidates if p.exists()] + [root]
    for path in candidates:
        files = _files(path)
        names = files.names()
        for fmt, spec in (("binary", BINARY), ("python", PYTHON)):
            prefix = _find_prefix(names, spec["train"])
            if prefix is not None:
                return files, fmt, prefix
        for n in names:
            parts = n.split("/")
            if "train" in parts[:-2] and n.lower().endswith(IMAGE_SUFFIXES):
                return files, "tree", "/".join(parts[: parts.index("train")] + [""]).lstrip("/")
    raise DataError(f"{root}: no CIFAR-10 found (official binary/python tarball, its folder, or train/<class>/ image "
                    "tree); run `make data`")


def load_cifar10(root, split, *, encoded=False):
    """(images uint8 (N,32,32,3), labels int64 (N,)) of `split` from whatever `root` holds.

    encoded=True returns a list of encoded image byte arrays instead of pixels (image trees only).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, not {split!r}")
    files, fmt, prefix = _locate(root)
    if fmt == "tree":
        return _read_tree(files, prefix, split, encoded)
    if encoded:
        raise DataError(f"{files.path}: holds raw {fmt} records, not encoded images; "
                        "use --source raw, or an image tree")
    spec = BINARY if fmt == "binary" else PYTHON
    read = _read_binary if fmt == "binary" else _read_python
    return read(files, prefix, spec[split])


def data_format(root):
    """'binary', 'python' or 'tree': what `load_cifar10(root, ...)` would read. Only a 'tree' holds
    encoded images (`encoded=True`); the tarballs hold raw pixel records."""
    return _locate(root)[1]


def is_encoded(images):
    """Whether loaded `images` are encoded file bytes (a list, from `encoded=True`) or a pixel array:
    the one place that tells the two forms apart."""
    return isinstance(images, list)


def fingerprint(images, labels, sample=64):
    """What identifies a loaded split, as plain data a checkpoint can hold: the image count, a hash
    of all labels and a hash of `sample` images spread evenly over it (pixels, or encoded bytes).
    A resume compares it with the data it is given."""
    picks = np.linspace(0, len(labels) - 1, min(sample, len(labels))).round().astype(int)
    images_hash = hashlib.sha256()
    for i in picks:
        images_hash.update(np.ascontiguousarray(images[i]).tobytes())
    return {"images": int(len(labels)),
            "labels_sha256": hashlib.sha256(np.asarray(labels, np.int64).tobytes()).hexdigest(),
            "sample_sha256": images_hash.hexdigest()}


def pixels(images, indices):
    """uint8 (len(indices), 32, 32, 3) pixels of the chosen images, decoded where they are encoded."""
    if is_encoded(images):
        return np.stack([decode_image(images[i]) for i in indices])
    return images[np.asarray(indices)]


# --- stand-ins and samples ----------------------------------------------------------------------

def synthetic_cifar(n, *, split="train", seed=0):
    """(images uint8 (n, 32, 32, 3), labels int64 (n,)) shaped like CIFAR-10 and learnable.

    Each class is a flat colour (the same in both splits) plus Gaussian noise (different per
    split), so a few steps of training beat chance. Labels are balanced and in class order, as
    `load_cifar10` returns an image tree.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, not {split!r}")
    labels = (np.arange(n) * len(CLASSES) // max(n, 1)).astype(np.int64)
    palette = np.random.default_rng(seed).integers(30, 225, (len(CLASSES), 3))
    noise = np.random.default_rng([seed, list(SPLITS).index(split)]).normal(0, 25, (n, SIZE, SIZE, 3))
    return np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8), labels


def balanced_order(labels, seed):
    """Every index, in the order a class-balanced sample takes them: round-robin over the classes of a
    seeded permutation (the first images of an image tree are all one class), so that the first n of it
    are a balanced sample of n."""
    order = np.random.default_rng(seed).permutation(len(labels))
    rank_in_class = np.empty(len(labels), np.int64)
    for c in np.unique(labels):
        members = order[labels[order] == c]
        rank_in_class[members] = np.arange(len(members))
    return order[np.argsort(rank_in_class[order], kind="stable")]


def take(images, labels, indices):
    """(images, labels) at `indices`, for pixel arrays and for lists of encoded images alike."""
    return [images[i] for i in indices] if is_encoded(images) else images[indices], labels[indices]


def subset(images, labels, n, *, seed=0):
    """A class-balanced random sample of n (images, labels), in their original order."""
    if n >= len(labels):
        return images, labels
    return take(images, labels, np.sort(balanced_order(labels, seed)[:n]))


VAL_SEED = 20261207  # one held-out set for every run, whatever its --seed: a sweep's variants and seeds compare on it


def hold_out(images, labels, n):
    """((train images, labels), (held-out images, labels)): n images set aside, class-balanced, the same n
    for every run (VAL_SEED, not the run's seed), both parts in their original order (`--val`)."""
    if not 0 < n < len(labels):
        raise ValueError(f"can hold out 1 to {len(labels) - 1} of {len(labels)} images, not {n}")
    order = balanced_order(labels, VAL_SEED)
    return take(images, labels, np.sort(order[n:])), take(images, labels, np.sort(order[:n]))


# --- `make data`: download or import, atomically -----------------------------------------------

def md5sum(path, chunk=1 << 20):
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(url, dest, md5):
    """Fetch `url` to `dest` with a progress bar; keep a present file whose md5 already matches."""
    from tqdm import tqdm

    dest = Path(dest)
    if dest.exists() and md5sum(dest) == md5:
        print(f"{dest} already present, md5 ok")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=30)
            except (OSError, ValueError) as e:
                raise DataError(f"cannot download {url} ({_short(getattr(e, 'reason', e))}); offline, copy the tarball "
                                f"in with `make data SRC=/path/to/{dest.name}` (or any accepted copy)") from None
            total = int(response.headers.get("Content-Length") or 0) or None
            with response, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        got = md5sum(tmp)
        if got != md5:
            raise DataError(f"{url}: md5 {got} does not match {md5}; the download is damaged, run `make data` again")
        os.replace(tmp, dest)  # atomic: the old file, if any, stays until the new one is whole
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def import_copy(src, data_dir):
    """Check that `src` loads as CIFAR-10 (both splits), then copy it into `data_dir` atomically."""
    src, data_dir = Path(src), Path(data_dir)
    for split in SPLITS:
        images, labels = load_cifar10(src, split)  # any problem stops here, before anything is written
        print(f"{src}: {split} {len(labels):,} images, {np.bincount(labels, minlength=10).tolist()} per class")
    dest = data_dir / src.name
    if dest.resolve() == src.resolve():
        return dest
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=data_dir, prefix=f".{src.name}."))
    try:
        staged = tmp / src.name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, staged)
        if dest.is_dir():  # swap folders: move the old one aside, then remove it once the new one is in
            old = tmp / "old"
            os.replace(dest, old)
        os.replace(staged, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"imported {src} -> {dest}")
    return dest
