"""train.py end to end on CPU, on the tiny generated `--smoke` dataset (~40 img/s here)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from net import build_model

ROOT = Path(__file__).resolve().parents[1]
LEARN = ["--smoke", "--epochs", "3", "--warmup-epochs", "0.5"]


def summary(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """One uninterrupted 3-epoch run, shared by the tests that read its outputs."""
    runs = tmp_path_factory.mktemp("runs")
    assert train.main(LEARN + ["--runs", str(runs), "--name", "learn"]) == 0
    return runs / "learn"


def test_loss_falls_and_accuracy_rises(learned):
    h = summary(learned)["history"]
    assert h[-1]["train_loss"] < 0.8 * h[0]["train_loss"]
    assert h[-1]["train_acc"] > h[0]["train_acc"] + 0.2
    assert h[-1]["test_acc"] > 0.2  # chance is 0.1


def test_summary_has_every_field(learned):
    s = summary(learned)
    for key in ("config", "device", "torch", "dali", "params", "best_acc", "final_acc", "epochs_run", "wall_s",
                "mean_train_img_per_s", "target_acc", "epoch_to_target", "wall_s_to_target", "history", "commit"):
        assert key in s, key
    assert s["epochs_run"] == 3 and s["params"] == 133_322 and s["device"] == "cpu"
    assert s["best_acc"] >= s["final_acc"] > 0 and s["mean_train_img_per_s"] > 0
    assert s["config"]["recipe"] == "fast" and s["config"]["epochs"] == 3


def test_target_accuracy_is_timed(tmp_path):
    assert train.main(LEARN[:1] + ["--runs", str(tmp_path), "--name", "t", "--target-acc", "0.01"]) == 0
    s = summary(tmp_path / "t")
    assert s["epoch_to_target"] == 1 and 0 < s["wall_s_to_target"] <= s["wall_s"]


def test_tensorboard_holds_the_curves_and_pictures(learned):
    events = EventAccumulator(str(learned), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/acc", "test/loss", "test/acc", "lr", "throughput/train_img_per_s",
                "time/epoch_s", "test_class/airplane", "test_class/truck"):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("test/acc")] == [1, 2, 3]
    assert {"augmentations", "test/confusion_matrix"} <= set(events.Tags()["images"])
    hparams = [f for f in learned.iterdir() if f.name.startswith("events")]
    assert any(b"hparams" in f.read_bytes() for f in hparams)


def test_checkpoints_load_weights_only(learned):
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(learned / name, weights_only=True)
        build_model().load_state_dict(ckpt["model"])
        assert {"optimizer", "scheduler", "rng_cpu", "loader", "state", "config"} <= set(ckpt)
    assert torch.load(learned / "last.pt", weights_only=True)["state"]["epoch"] == 3


# --- interruption and resume --------------------------------------------------------------------

def start(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def wait_for(proc, prefix):
    for line in proc.stdout:
        if line.startswith(prefix):
            return
    pytest.fail(f"never printed {prefix!r}: {proc.stderr.read()}")


def test_interrupted_run_resumes_on_the_same_schedule(learned, tmp_path):
    proc = start(*LEARN, "--runs", str(tmp_path), "--name", "cut")
    wait_for(proc, "epoch   1/3")  # interrupt during epoch 2
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"--resume {tmp_path / 'cut'}" in err
    assert train.main(["--resume", str(tmp_path / "cut")]) == 0
    schedule = [(h["epoch"], h["step"], h["lr"]) for h in summary(tmp_path / "cut")["history"]]
    assert schedule == [(h["epoch"], h["step"], h["lr"]) for h in summary(learned)["history"]]
    assert summary(tmp_path / "cut")["epochs_run"] == 3


def test_sigterm_saves_a_loadable_checkpoint(tmp_path):
    proc = start("--smoke", "--epochs", "2", "--runs", str(tmp_path), "--name", "term")
    wait_for(proc, "training ")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    ckpt = torch.load(tmp_path / "term" / "last.pt", weights_only=True)
    assert ckpt["state"]["epoch"] == 0 and ckpt["state"]["step_in_epoch"] >= 1
    build_model().load_state_dict(ckpt["model"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    def poisoned_model(**kwargs):
        """Returns NaN logits from the 3rd training step of epoch 2 (16 steps per epoch)."""
        model = build_model(**kwargs)
        forward, steps = model.forward, []

        def nan_forward(x):
            steps.append(model.training)
            out = forward(x)
            return out * float("nan") if sum(steps) == 16 + 3 and model.training else out

        model.forward = nan_forward
        return model

    monkeypatch.setattr(train, "build_model", poisoned_model)
    assert train.main(["--smoke", "--epochs", "2", "--log-every", "1", "--runs", str(tmp_path), "--name", "nan"]) == 1
    assert "non-finite loss at epoch 2, step 3" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "nan" / "last.pt", weights_only=True)
    assert ckpt["state"]["epoch"] == 1  # epoch 1's checkpoint, untouched
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# --- other sources and devices ------------------------------------------------------------------

def test_encoded_source_trains(jpeg_tree, tmp_path):
    assert train.main(["--data", str(jpeg_tree), "--source", "encoded", "--epochs", "1", "--batch-size", "8",
                       "--eval-batch-size", "20", "--runs", str(tmp_path), "--name", "jpeg"]) == 0
    assert summary(tmp_path / "jpeg")["epochs_run"] == 1


def test_two_ranks_under_torchrun(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "train.py"), "--smoke", "--runs", str(tmp_path), "--name", "ddp"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, "\n".join(l for l in r.stderr.replace("\r", "\n").splitlines() if "step/s" not in l)[-6000:]
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]  # one run folder, written by rank 0
    s = summary(tmp_path / "ddp")
    assert s["world_size"] == 2 and s["epochs_run"] == 1
    assert r.stdout.count("done:") == 1  # only rank 0 prints
    # each rank took 8 of the 16 images per step: the global batch is the same as on one rank
    assert s["history"][0]["step"] == 256 // 16


# --- bad flags: argparse-style, exit 2, before any work -----------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--epochs", "-3"], "--epochs must be at least 1"),
    (["--recipe", "turbo"], "invalid choice: 'turbo'"),
    (["--data", "/no/such/folder"], "does not exist; run `make data`"),
    (["--lr", "-1"], "--lr must be positive"),
])
def test_bad_flags_exit_2(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(flags + ["--runs", str(tmp_path)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_unwritable_run_folder_exits_2(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        train.main(["--smoke", "--runs", str(tmp_path / "file" / "runs")])
    assert e.value.code == 2 and "cannot write the run folder" in capsys.readouterr().err


def test_corrupt_checkpoint_exits_2(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "last.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(tmp_path / "bad")])
    assert e.value.code == 2 and "corrupt or incompatible checkpoint" in capsys.readouterr().err


def test_existing_run_is_not_overwritten(learned, capsys):
    before = (learned / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        train.main(["--smoke", "--runs", str(learned.parent), "--name", learned.name])
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    assert (learned / "last.pt").read_bytes() == before


def test_cli_help_lists_every_config_field():
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True).stdout
    for f in train.dataclasses.fields(train.Config):
        assert "--" + f.name.replace("_", "-") in out
