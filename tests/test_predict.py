"""predict.py (`make predict`) as a user runs it: a table of the top classes, resized and unreadable files said."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.checkpoint import load_weights
from net import build_model
from pipelines import CLASSES, make_loader, synthetic_cifar

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.xdist_group("short")
def test_each_file_gets_its_top_3_and_the_model_agrees_with_the_pipeline(short_run, tmp_path):
    run, _ = short_run
    images, labels = synthetic_cifar(3, split="test")
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for image, path in zip(images, paths):
        Image.fromarray(image).save(path)
    Image.fromarray(images[0]).resize((64, 48)).save(tmp_path / "big.jpg", quality=95)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    r = subprocess.run([sys.executable, str(ROOT / "predict.py"), run, *paths, tmp_path / "big.jpg",
                        tmp_path / "broken.png"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1, r.stderr  # one file could not be read: said, the rest classified
    assert r.stderr.count("\n") == 1 and f"error: {tmp_path / 'broken.png'}: cannot read it as an image" in r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["file", "1st", "2nd", "3rd"] and len(lines) == 1 + 4 + 1
    assert lines[-1] == f"note: {tmp_path / 'big.jpg'}: 64x48, resized to 32x32"
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:5]}
    for cells in rows.values():  # "cat 71.2%" three times, most likely first
        probs = [float(p.rstrip("%")) for p in cells[1::2]]
        assert cells[0::2][0] in CLASSES and probs == sorted(probs, reverse=True) and sum(probs) <= 100.1

    # The same weights on the same pixels through the trainer's own eval pipeline (DALI normalizes there).
    model = build_model().eval()
    model.load_state_dict(load_weights(run)[0])  # what the script loads: best.pt's best weights
    [(x, _)] = list(make_loader(images, np.arange(3), batch_size=3, train=False, device="cpu"))
    with torch.no_grad():
        expected = model(x).argmax(1).tolist()
    assert [rows[str(p)][0] for p in paths] == [CLASSES[i] for i in expected]
