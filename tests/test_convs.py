"""engine/convs.py: `--conv-impl` decided per layer at start: checked against F.conv2d, timed (auto), set on the model.

The kernels run in Triton's interpreter here (conftest.py), on one 5x5 image."""
import pytest
import torch

from engine import convs
from engine.convs import choose_convs
from engine.device import Env
from net import build_model, kernels
from net.kernels import dwconv_reference
from net.model import depthwise_convs

CPU = Env(device=torch.device("cpu"))
TINY = dict(batch=1, size=5)  # one program a kernel in the interpreter
interpreted = pytest.mark.skipif(not (kernels.HAVE_TRITON and kernels.interpreting()),
                                 reason="needs Triton's interpreter (conftest.py sets it without a GPU)")


def impls(model):
    return {name: conv.impl for name, conv in depthwise_convs(model).items()}


def test_torch_runs_every_depthwise_conv_on_conv2d_and_checks_nothing(monkeypatch):
    monkeypatch.setattr(convs, "check_layer", lambda *a, **k: pytest.fail("torch needs no check"))
    model = build_model()
    choice = choose_convs(model, CPU, "torch", **TINY)
    assert set(impls(model).values()) == {"torch"} and list(choice.impl) == list(depthwise_convs(model))
    assert choice.line() == "torch for all 7 depthwise and grouped convs (--conv-impl torch)"


@interpreted
def test_triton_runs_every_depthwise_conv_on_the_kernels_once_they_agree_with_conv2d():
    model = build_model()
    choice = choose_convs(model, CPU, "triton", **TINY)
    assert set(impls(model).values()) == {"triton"} and choice.notes == [] and choice.ms == {}
    assert len(choice.errors) == 7 and max(choice.errors.values()) < 1e-5  # fp32 here
    assert "triton for all 7" in choice.line() and "checked against F.conv2d" in choice.line()
    assert choice.tiles_line() == "forward 128x256 (interpreter (pinned)); backward 128x256 (interpreter (pinned))"


def test_the_tiles_line_counts_the_shapes_each_tile_was_picked_for():
    tiles = {"forward": {"32->64 32x32 d2 NHWC bfloat16, batch 512": "32x32, 8 warps",
                         "64->64 32x32 d3 NHWC bfloat16, batch 512": "16x64, 8 warps",
                         "64->128 32x32 d3 NHWC bfloat16, batch 512": "32x32, 8 warps"},
             "backward": {"32->64 32x32 d2 NHWC bfloat16, batch 512": "16x32, 8 warps"}}
    assert convs.ConvChoice(tiles=tiles).tiles_line() == (
        "forward 32x32, 8 warps (2 shapes), 16x64, 8 warps (1 shape); "
        "backward 16x32, 8 warps (32->64 32x32 d2 NHWC bfloat16, batch 512)")
    assert convs.ConvChoice().tiles_line() == ""  # torch convs: no kernel ran


def test_a_kernel_that_disagrees_falls_back_to_torch_with_a_note(monkeypatch):
    monkeypatch.setattr(convs, "runs_kernels", lambda device: True)

    def off_on_the_last_layer(x, weight, dilation):  # the kernels, wrong on C4's depthwise conv only
        y = dwconv_reference(x, weight, dilation)
        return y * 1.01 if x.shape[1] == weight.shape[0] == 256 else y

    monkeypatch.setattr(convs, "dwconv_op", off_on_the_last_layer)
    model = build_model()
    choice = choose_convs(model, CPU, "triton", **TINY)
    assert impls(model) == {**{name: "triton" for name in choice.impl}, "C4.depthwise": "torch"}
    assert len(choice.notes) == 1 and choice.notes[0].startswith("the Triton kernel disagrees with F.conv2d on "
                                                                 "C4.depthwise (relative error 1.0e-02")


def test_auto_keeps_the_faster_of_the_two_per_layer(monkeypatch):
    monkeypatch.setattr(convs, "AUTO_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(convs, "runs_kernels", lambda device: True)
    monkeypatch.setattr(convs, "check_layer", lambda conv, **shape: (1e-7, 1e-7))
    monkeypatch.setattr(convs, "time_layer", lambda conv, impl, **shape: {"triton": 1.0, "torch": 2.0}[impl] *
                        (3 if impl == "triton" and conv.in_channels == 32 else 1))  # C1 and C2's grouped: torch faster
    model = build_model()
    choice = choose_convs(model, CPU, "auto", **TINY)
    assert impls(model) == {"C1.depthwise": "torch", "C2.grouped": "torch", "C2.depthwise": "triton",
                            "C3.grouped": "triton", "C3.depthwise": "triton", "C4.grouped": "triton",
                           "C4.depthwise": "triton"}
    assert choice.ms["C1.depthwise"] == {"triton": 3.0, "torch": 2.0}
    assert choice.line().startswith("C1.depthwise torch 3.00/2.00 ms, C2.grouped torch") and "timed" in choice.line()


def test_auto_where_the_kernels_are_not_timed_is_torch_and_says_why():
    model = build_model()
    choice = choose_convs(model, CPU, "auto", **TINY)  # a CPU: the interpreter is for tests, never timed
    assert set(impls(model).values()) == {"torch"}
    assert choice.line().endswith("(--conv-impl auto: the kernels are timed on CUDA only)")


def test_time_layer_times_forward_and_backward_of_either_implementation():
    conv = depthwise_convs(build_model())["C2.grouped"]
    ms = convs.time_layer(conv, "torch", **TINY, dtype=torch.float32, memory_format=torch.channels_last,
                          device=torch.device("cpu"), sync=lambda: None, calls=1, repeats=2)
    assert ms > 0


@pytest.mark.cuda
def test_on_cuda_auto_checks_and_times_every_layer_at_the_trainers_batch():
    env = Env(device=torch.device("cuda"), dtype=torch.bfloat16)
    model = build_model().cuda().to(memory_format=torch.channels_last)
    choice = choose_convs(model, env, "auto", batch=64)
    assert len(choice.ms) == len(choice.errors) == 7 and choice.notes == []
    assert all(len(shapes) == 7 for shapes in choice.tiles.values())  # autotune's pick for each layer's shape
    assert all(impl == min(choice.ms[name], key=choice.ms[name].get) for name, impl in impls(model).items())


# --- --fuse ----------------------------------------------------------------------------------------

def test_fuse_off_runs_unfused_and_checks_nothing(monkeypatch):
    monkeypatch.setattr(convs, "check_fused", lambda *a, **k: pytest.fail("off needs no check"))
    model = build_model()
    choice = convs.choose_fused(model, CPU, "off", batch=1)
    assert not model.fused and choice.line() == "off (--fuse off)"


def test_fuse_auto_off_cuda_is_off_and_says_why():
    model = build_model()
    choice = convs.choose_fused(model, CPU, "auto", batch=1)  # a CPU: the interpreter is for tests, never timed
    assert not model.fused and choice.line() == "off (--fuse auto: the fused kernels are timed on CUDA only)"


@interpreted
def test_fuse_on_checks_the_fused_path_against_the_unfused_model_in_float64():
    torch.manual_seed(0)
    model = build_model(widths=(8, 16, 16, 16))  # narrow: the interpreter runs the check's two steps
    choice = convs.choose_fused(model, CPU, "on", batch=1)
    assert model.fused and choice.fused and choice.error <= 2 * choice.unfused_error + 1e-4
    assert choice.line().startswith("on (--fuse on, checked against the unfused model; error against float64 ")


def test_a_fused_path_that_disagrees_stays_unfused_and_auto_keeps_the_faster(monkeypatch):
    monkeypatch.setattr(convs, "runs_kernels", lambda device: True)
    monkeypatch.setattr(convs, "AUTO_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(convs, "check_fused", lambda model, env: (5e-2, 1e-3))
    model = build_model()
    choice = convs.choose_fused(model, CPU, "on", batch=1)
    assert not model.fused and "disagrees with the unfused model (relative error 5.0e-02" in choice.line()
    monkeypatch.setattr(convs, "check_fused", lambda model, env: (1e-3, 1e-3))
    for fused_ms, expect in ((1.0, True), (3.0, False)):
        monkeypatch.setattr(convs, "time_steps", lambda model, env, **k: {"fused": fused_ms, "unfused": 2.0})
        choice = convs.choose_fused(model, CPU, "auto", batch=1, compiled=True)
        assert model.fused is choice.fused is expect
        assert f"{fused_ms:.2f} ms a step fused, 2.00 unfused" in choice.line() and "timed" in choice.line()
