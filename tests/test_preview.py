import subprocess
import sys

import numpy as np
from PIL import Image

from pipelines import CLASSES, Augment
from pipelines.preview import FRAME, HEADER, LINE, augment_grid, confusion_image, font, one_per_class, wrap
from pipelines.preview import main as preview_cli


def test_grid_shows_the_framed_original_then_draws():
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    grid = augment_grid(images, draws=4, zoom=2, gap=2)
    s, frame = 64 + 2, 2
    header = grid.shape[0] - (3 * s + 2)  # the caption wraps to the grid's width: a line or more
    assert grid.dtype == np.uint8 and grid.shape[1] == 5 * s + 2 + 2 * frame
    assert header >= HEADER and (header - HEADER) % LINE == 0
    top, left = header + 2, 2 + frame
    np.testing.assert_array_equal(grid[top:top + 64, left:left + 64], images[0].repeat(2, 0).repeat(2, 1))
    assert tuple(grid[top - 1, left - 1]) == FRAME  # the original is framed, the draws are not
    draws = [grid[top:top + 64, left + c * s + 2 * frame:left + c * s + 2 * frame + 64] for c in range(1, 5)]
    assert tuple(grid[top - 1, left + s + 2 * frame - 1]) != FRAME  # just outside the first draw: no frame
    assert any(not np.array_equal(d, grid[top:top + 64, left:left + 64]) for d in draws)  # the recipe changed something


def test_the_caption_says_the_recipe_drawn_and_fits_the_grid():
    caption = "4 draws: " + Augment(rotate=5).describe()
    lines = wrap(caption, font(14), 300)
    assert " ".join(lines) == caption and len(lines) > 1
    assert all(font(14).getlength(line) <= 300 for line in lines)
    assert "rotate \u00b15\u00b0" in caption and "cutout 16x16 p=0.5" in caption


def test_grid_names_each_row_in_a_margin():
    images = np.zeros((2, 32, 32, 3), np.uint8)
    plain, named = augment_grid(images, draws=2, zoom=2), augment_grid(images, names=["automobile", "cat"], draws=2,
                                                                       zoom=2)
    assert named.shape[0] == plain.shape[0] and named.shape[1] > plain.shape[1] + 40  # room for "automobile"
    margin = named[HEADER:, :named.shape[1] - plain.shape[1]]
    assert (margin < 128).any()  # text was drawn there


def test_one_per_class_takes_one_image_of_every_class():
    labels = np.repeat(np.arange(10), 5)  # sorted by class, as an image tree is
    picks = one_per_class(labels, seed=1)
    assert list(labels[picks]) == list(range(10))
    assert not np.array_equal(one_per_class(labels, seed=1), one_per_class(labels, seed=2))


def test_confusion_image_is_readable_at_card_size():
    confusion = np.diag(np.arange(10) + 90) + 1
    img = confusion_image(confusion, CLASSES)
    assert img.dtype == np.uint8 and img.shape[1] >= 600 and img.shape[0] >= 600  # 52 px a cell, names whole
    assert (img < 128).any()


def test_cli_writes_one_row_per_class(image_tree, tmp_path):
    out = tmp_path / "aug.png"
    r = subprocess.run([sys.executable, "-m", "pipelines.preview", "--data", str(image_tree), "--out", str(out),
                        "--draws", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    width, height = Image.open(out).size
    rows = 10 * (4 * 32 + 2) + 2  # ten rows, zoom 4, under a caption of a line or more
    assert height >= HEADER + rows and (height - HEADER - rows) % LINE == 0
    assert "one image per class" in r.stdout and not list(tmp_path.glob("*.tmp"))


def test_cli_missing_data_is_one_line(tmp_path, capsys):
    assert preview_cli(["--data", str(tmp_path / "nope")]) == 2  # the exit status: `sys.exit(main())`
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "does not exist" in err
