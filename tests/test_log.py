"""engine/log.py in-process: what the console says at the start of a run and on a long CPU run, and the
resume hint. What a whole run writes (TensorBoard, summary.json) is read in tests/test_train.py."""
import sys

import pytest
import torch

from engine.config import SHORT_RUN, Config, resolve
from engine.convs import ConvChoice, FuseChoice
from engine.device import CompileCheck, Env
from engine.log import Logger, NullLogger, resume_command
from engine.loop import make_optimizer, make_schedule
from engine.run import RunState
from net import build_model


@pytest.fixture
def started(tmp_path, capsys):
    """A Logger started as train.py starts it, for a CPU run of 2 epochs of 100 steps of 16; its output so far."""
    cfg = resolve(Config(smoke=True, epochs=2, cutout_p=0.0, runs=str(tmp_path), name="run"))
    env = Env(device=torch.device("cpu"), batch=cfg.batch_size, threads=2, threads_why="2 cores, 2 idle at start")
    model = build_model()
    schedule = make_schedule(cfg, make_optimizer(cfg, model), 100)
    log = Logger(cfg, env)
    log.start(tmp_path / "run", model, schedule, 100, RunState(), ["a note from the caller"],
              CompileCheck(model, compiled=False, note="torch.compile failed (X); training eager"),
              ConvChoice(impl={"C1.depthwise": "triton", "C2.grouped": "torch"},
                         ms={"C1.depthwise": {"triton": 0.1, "torch": 0.8},
                                                                                     "C2.grouped": {"triton": 2.0,
                                                                                                    "torch": 1.5}},
                         tiles={"forward": {"32->32 32x32 d2 NHWC bfloat16, batch 16": "32x32, 8 warps"}},
                         why="--conv-impl auto, timed"), sizes=(1600, 64, 0),
              fuse=FuseChoice(why="--fuse auto: the fused kernels are timed on CUDA only"))
    yield log, capsys.readouterr().out
    log.bar.close()
    log.writer.close()


def test_the_start_prints_the_config_and_what_will_run(started):
    _, out = started
    lines = out.splitlines()
    assert lines[0].startswith("config: {") and '"cutout_p": 0.0' in lines[0]
    assert "device: cpu x 1, fp32 channels_last, params 133,322, 100 steps/epoch of 16, 200 steps in all" in out
    assert "threads: torch 2, DALI 1 (2 cores, 2 idle at start)" in out
    assert "convs: C1.depthwise triton 0.10/0.80 ms, C2.grouped torch 2.00/1.50 ms (--conv-impl auto, timed)" in out
    assert "conv tiles: forward 32x32, 8 warps (32->32 32x32 d2 NHWC bfloat16, batch 16)\n" in out  # autotune's pick
    assert "fused: off (--fuse auto: the fused kernels are timed on CUDA only)\n" in out
    assert ("augmentation: flip p=0.5, shift-scale-rotate p=0.5 (shift 2 px, scale 1\u00b10.1, rotate \u00b115\u00b0)\n"
            in out)
    assert "note: a note from the caller" in out and "note: torch.compile failed (X); training eager" in out
    assert "training 2 epochs, 200 steps; run folder" in out


def test_a_long_cpu_run_says_its_cost_and_a_short_run_that_learns(started, capsys):
    log, _ = started
    log.step(0, 0, {"loss": 2.3, "acc": 0.1, "lr": 0.1, "img_per_s": 16.0})
    assert "note: on CPU" not in capsys.readouterr().out  # the first step includes start-up: not a rate to go by
    log.step(0, 1, {"loss": 2.2, "acc": 0.1, "lr": 0.1, "img_per_s": 2.0})  # 198 steps of 16 at 2 img/s: 26 minutes
    out = capsys.readouterr().out
    assert "note: on CPU at 2 img/s this run needs about 0.4 h more and" in out and "GB of memory" in out
    assert f"`{SHORT_RUN}`" in out and "% test accuracy" in out  # the measured short run


def test_a_short_cpu_run_is_not_warned_about(started, capsys):
    log, _ = started
    for step in range(2):
        log.step(0, step, {"loss": 2.3, "acc": 0.1, "lr": 0.1, "img_per_s": 1000.0})
    assert "note: on CPU" not in capsys.readouterr().out


@pytest.mark.parametrize("environ, expected", [
    ({"MAKELEVEL": "1"}, 'make train ARGS="--resume \'runs/my run\'"'),
    ({"RANK": "0", "LOCAL_WORLD_SIZE": "4"}, "torchrun --nproc_per_node 4 train.py --resume 'runs/my run'"),
    ({}, "train.py --resume 'runs/my run'"),
])
def test_the_resume_hint_is_worded_the_way_the_run_was_started(environ, expected, monkeypatch):
    for name in ("MAKELEVEL", "RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    assert resume_command("runs/my run").endswith(expected)


def test_other_ranks_log_nothing(capsys):
    log = NullLogger()
    log.start("anything", at="all")
    log.step(0, 0, {})
    log.stopped(RunState(), "epoch 1")
    log.error("x")
    assert capsys.readouterr() == ("", "")
