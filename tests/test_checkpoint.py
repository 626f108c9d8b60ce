"""engine/checkpoint.py: files written atomically, checkpoints read with weights_only, a run's weights read back."""
import os
import pickle
import tempfile
from pathlib import Path

import pytest
import torch

from engine.checkpoint import SaveError, init_from, load_checkpoint, write_atomic
from engine.config import UserError
from net import build_model


class Boom:
    def __reduce__(self):
        return (os.system, ("echo owned",))


@pytest.mark.parametrize("content, message", [
    (b"", "is empty (0 bytes)"),
    (bytes(range(256)) * 2, "not a readable torch.save file"),  # fixed bytes: the same test id on every xdist worker
    (pickle.dumps({"model": Boom()}), "not a readable torch.save file"),
    (None, "not a checkpoint of this project"),
    ("code", "objects other than tensors"),
    ("old", "was written by an older train.py"),
])
def test_bad_checkpoints_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "last.pt"
    if content is None:
        torch.save({"weights": torch.zeros(2)}, path)  # a real torch file, not ours
    elif content == "code":
        torch.save({"model": Boom()}, path)  # would run os.system if unpickled without weights_only
    elif content == "old":  # a checkpoint from before the run state had all its fields
        keys = ("model", "optimizer", "scheduler", "rng_cpu", "config")
        torch.save({**dict.fromkeys(keys, {}), "state": {"epoch": 1}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    assert "without --resume" in str(e.value)  # and the way out


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), OSError(30, "Read-only file system")])
def test_a_write_that_fails_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch, error):
    (tmp_path / "last.pt").write_bytes(b"the good one")

    def fails_halfway(tmp):
        Path(tmp).write_bytes(b"half")
        raise error

    with pytest.raises(SaveError) as e:
        write_atomic(tmp_path / "last.pt", fails_halfway)
    assert str(e.value) == f"could not write {tmp_path / 'last.pt'} ({error.strerror}); the previous last.pt is intact"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind
    assert (tmp_path / "last.pt").read_bytes() == b"the good one"
    monkeypatch.setattr(tempfile, "mkstemp", lambda **kw: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
    with pytest.raises(SaveError, match=r"could not write .*summary.json \(Read-only file system\)$"):
        write_atomic(tmp_path / "summary.json", lambda tmp: None)  # not even a temporary could be made


@pytest.mark.xdist_group("short")
def test_init_from_loads_another_runs_best_weights_and_says_so(short_run):
    run, _ = short_run
    model = build_model()
    note = init_from(model, run)
    ckpt = torch.load(run / "best.pt", weights_only=True)
    best = ckpt["ema"]["model"] if ckpt["state"]["best_weights"] == "ema" else ckpt["model"]  # as the run marked them
    assert all(torch.equal(model.state_dict()[k], v) for k, v in best.items())
    assert note.startswith(f"starting from {run}/best.pt (epoch 1, test accuracy ") and "start fresh" in note


@pytest.mark.xdist_group("short")
def test_init_from_weights_that_do_not_fit_is_one_line(short_run, tmp_path):
    (tmp_path / "other").mkdir()
    ckpt = torch.load(short_run[0] / "best.pt", weights_only=True)
    ckpt["state"]["best_weights"] = "raw"  # the weights init_from takes
    ckpt["model"]["head.2.weight"] = torch.zeros(100, 128)  # a head for 100 classes
    torch.save(ckpt, tmp_path / "other" / "best.pt")
    model = build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as e:
        init_from(model, tmp_path / "other")
    assert str(e.value) == (f"--init-from {tmp_path / 'other'}: its weights do not fit this model (head.2.weight: "
                            f"(100, 128) against (10, 128)); start from a run of this model")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # untouched
    with pytest.raises(UserError, match="--init-from nowhere is not a folder"):
        init_from(model, "nowhere")
