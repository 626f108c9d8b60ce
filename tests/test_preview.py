import subprocess
import sys

import numpy as np
from PIL import Image

from pipelines.preview import augment_grid


def test_grid_shows_originals_then_draws():
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    grid = augment_grid(images, draws=4, zoom=2, gap=2)
    assert grid.dtype == np.uint8 and grid.shape == (3 * 66 + 2, 5 * 66 + 4, 3)
    first = grid[2:66, 2:66]  # row 0, column 0: the original, zoomed x2
    np.testing.assert_array_equal(first, images[0].repeat(2, axis=0).repeat(2, axis=1))
    draws = [grid[2:66, c * 66 + 4:c * 66 + 68] for c in range(1, 5)]
    assert any(not np.array_equal(d, first) for d in draws)  # the default recipe changed something


def test_cli_writes_png(image_tree, tmp_path):
    out = tmp_path / "aug.png"
    r = subprocess.run([sys.executable, "-m", "pipelines.preview", "--data", str(image_tree), "--out", str(out),
                        "--images", "4", "--draws", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (4 * 130 + 4, 4 * 130 + 2)


def test_cli_missing_data_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipelines.preview", "--data", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
