"""export.py (`make export`): the model as ONNX, checked with onnxruntime against PyTorch."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import export as export_script
from engine.checkpoint import SaveError, load_weights
from net import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.xdist_group("short")
def test_the_onnx_model_gives_pytorchs_logits_at_any_batch_size(short_run, tmp_path):
    run, _ = short_run
    ort = pytest.importorskip("onnxruntime", reason="the export extra (pip install -e '.[export]')")
    r = subprocess.run([sys.executable, str(ROOT / "export.py"), run, "--out", tmp_path / "m.onnx"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr[-3000:]
    assert list(tmp_path.iterdir()) == [tmp_path / "m.onnx"]  # written whole, no temporary left
    model = build_model().eval()
    model.load_state_dict(load_weights(run)[0])  # what the script loads: best.pt's best weights
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    assert [i.name for i in session.get_inputs()] == ["images"] and session.get_inputs()[0].type == "tensor(float)"
    for batch in (1, 7):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(session.run(["logits"], {"images": x.numpy()})[0], expected, rtol=0, atol=1e-4)


@pytest.mark.xdist_group("short")
def test_a_file_that_cannot_be_written_is_one_line_naming_it(short_run, tmp_path):
    pytest.importorskip("onnxscript", reason="the export extra (pip install -e '.[export]')")
    with pytest.raises(SaveError, match=f"could not write {tmp_path / 'gone' / 'm.onnx'} "):
        export_script.main([str(short_run[0]), "--out", str(tmp_path / "gone" / "m.onnx")])  # no such folder
