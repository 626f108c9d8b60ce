"""`make data`: download (md5-checked, atomic) and import of a local copy."""
import hashlib
import subprocess
import sys

from conftest import write_binary_tarball, write_image_tree
from test_data import assert_split

from pipelines.data import BINARY


def run_data(*args):
    return subprocess.run([sys.executable, "-m", "pipelines.fetch", *args], capture_output=True, text=True)


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_checks_md5_and_writes_atomically(binary_tarball, tmp_path):
    out = tmp_path / "data"
    url = binary_tarball.as_uri()
    bad = run_data("--out", str(out), "--url", url, "--md5", "0" * 32)
    assert bad.returncode == 2 and "does not match" in bad.stderr and "Traceback" not in bad.stderr
    assert not out.exists() or list(out.iterdir()) == []  # no partial file left behind
    good = run_data("--out", str(out), "--url", url, "--md5", md5(binary_tarball))
    assert good.returncode == 0, good.stderr
    assert md5(out / BINARY["name"]) == md5(binary_tarball)
    again = run_data("--out", str(out), "--url", url, "--md5", md5(binary_tarball))
    assert "already present" in again.stdout


def test_download_offline_says_how_to_import(tmp_path):
    r = run_data("--out", str(tmp_path), "--url", "http://127.0.0.1:9/cifar-10-binary.tar.gz")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "make data SRC=" in r.stderr


def test_import_copies_and_bad_import_keeps_the_good_one(image_tree, tmp_path):
    out = tmp_path / "data"
    assert run_data("--out", str(out), "--src", str(image_tree)).returncode == 0
    assert_split(out, "test")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    broken = write_image_tree(tmp_path / "broken" / image_tree.name)
    (broken / "train" / "cat" / "0002.png").write_bytes(b"not an image")
    r = run_data("--out", str(out), "--src", str(broken))
    assert r.returncode == 2 and "unreadable image" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert_split(out, "train")  # the earlier good import still loads


def test_import_tarball(tmp_path):
    src = write_binary_tarball(tmp_path / "cifar-10-binary.tar.gz")
    r = run_data("--out", str(tmp_path / "data"), "--src", str(src))
    assert r.returncode == 0, r.stderr
    assert_split(tmp_path / "data", "train")


def test_import_missing_source(tmp_path):
    r = run_data("--out", str(tmp_path / "data"), "--src", str(tmp_path / "missing.tar.gz"))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "does not exist" in r.stderr
