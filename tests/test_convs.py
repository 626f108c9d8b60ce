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


NARROW = (8, 16, 16, 16)  # the interpreter runs every step of the check: narrow layers, the real 32x32 maps


@interpreted
def test_fuse_on_checks_every_tensor_in_fp32_with_and_without_dropout_and_says_what_it_cost():
    torch.manual_seed(0)
    model = build_model(widths=NARROW, dropout=0.1)
    choice = convs.choose_fused(model, CPU, "on", batch=1)
    assert model.fused and choice.fused and choice.check.failed == []
    names = list(choice.check.errors)
    assert {n.split(":")[0] for n in names} == {"dropout 0", "dropout 0.1"}  # both steps
    assert sum(n.endswith("gradient") for n in names) == 2 * len(list(model.parameters()))  # every gradient
    assert sum("running_var" in n for n in names) == 2 * 12 and any(n.endswith("output") for n in names)
    _, worst, _ = choice.check.worst
    assert worst < 1e-3  # fp32 against float64
    assert choice.line().startswith("on, Triton kernels (--fuse on; checked in fp32 against float64 in ")
    assert f"{len(names)} tensors agree" in choice.line()


def broken(monkeypatch, what):
    """The fused path with one fault of `what`: a 3x3 conv's weight gradient returned as zeros (the 16-channel
    d4 layer, as issue #41 found the old bf16 check let through), or dropout's keep bits ignored by the kernels."""
    from net import fused

    if what == "weight gradient":
        real = fused.dw_backward

        def dw_backward(dy, dsum, dsumsq, y, y_prev, s, t, keep, weight, dilation):
            out = real(dy, dsum, dsumsq, y, y_prev, s, t, keep, weight, dilation)
            return (*out[:3], out[3] * 0) if dilation == 4 and weight.shape[1] == 16 else out

        monkeypatch.setattr(fused, "dw_backward", dw_backward)
    else:
        monkeypatch.setattr(fused, "keep_bits_op", lambda seeds, layer, p, n, c, h, w: torch.full(
            (n, h, w, (c + 31) // 32), -1, dtype=torch.int32))


@interpreted
@pytest.mark.parametrize("fault", ["weight gradient", "dropout"])
def test_the_check_fails_a_fused_path_with_a_wrong_kernel(monkeypatch, fault):
    """A zero weight gradient fails in fp32 (error 1 against ~1e-6) whatever the initialisation, on exactly the
    tensors it zeroes; dropout's kernels are held to the unfused layers applying dropout_mask's masks, so ignoring
    the masks fails the dropout step alone. On 8x8 maps: what the check can see does not depend on the size."""
    torch.manual_seed(1)
    model = build_model(widths=NARROW, dropout=0.1 if fault == "dropout" else 0.0)  # dropout 0: one step checked
    broken(monkeypatch, fault)
    check = convs.check_fused(model, CPU, batch=1, size=8)
    if fault == "weight gradient":  # the 16-channel d4 convs of the narrow model: C3's depthwise, C4's first
        assert set(check.failed) == {f"dropout 0: features.{b}.weight gradient" for b in ("2.1.0", "3.0.0")}
    else:
        assert check.failed and all(name.startswith("dropout 0.1: ") for name in check.failed)


@interpreted
def test_the_fp32_check_runs_fp32_whatever_the_runs_autocast(monkeypatch):
    """In a bf16 environment (CPU autocast here, as CUDA's would be), the fp32 check's kernels see fp32 tensors
    and TF32 stays off; the run-precision check sees bf16: the check would fail this test if autocast leaked in."""
    from net import fused

    seen = []
    real = fused.dw_forward

    def dw_forward(y_prev, *args):
        seen.append((y_prev.dtype, torch.is_autocast_enabled("cpu"), torch.backends.cuda.matmul.allow_tf32))
        return real(y_prev, *args)

    monkeypatch.setattr(fused, "dw_forward", dw_forward)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    bf16 = Env(device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
               dtype=torch.bfloat16)
    model = build_model(widths=NARROW, dropout=0.0)
    convs.check_fused(model, bf16, batch=1, size=4)
    assert seen and set(seen) == {(torch.float32, False, False)}
    assert torch.backends.cuda.matmul.allow_tf32  # restored
    seen.clear()
    convs.check_fused(model, bf16, batch=1, size=4, precision="run")
    assert {dtype for dtype, _, _ in seen} == {torch.bfloat16}


def test_a_fused_path_that_disagrees_stays_unfused_and_auto_keeps_the_faster(monkeypatch):
    monkeypatch.setattr(convs, "runs_kernels", lambda device: True)
    monkeypatch.setattr(convs, "AUTO_DEVICES", ("cuda", "cpu"))
    bad = convs.FusedCheck(errors={"dropout 0: output": (1e-3, 1e-6), "dropout 0: w gradient": (1.0, 1e-6)},
                           failed=["dropout 0: w gradient"], seconds=0.5)
    monkeypatch.setattr(convs, "check_fused", lambda model, env: bad)
    model = build_model()
    choice = convs.choose_fused(model, CPU, "on", batch=1)
    assert not model.fused and "disagrees with the unfused model, so unfused" in choice.line()
    assert "1 of 2 tensors disagree, first dropout 0: w gradient" in choice.line()
    good = convs.FusedCheck(errors={"dropout 0: output": (1e-6, 1e-6)}, seconds=0.5)
    monkeypatch.setattr(convs, "check_fused", lambda model, env: good)
    for fused_ms, expect in ((1.0, True), (3.0, False)):
        monkeypatch.setattr(convs, "time_steps", lambda model, env, **k: {"fused": fused_ms, "unfused": 2.0})
        choice = convs.choose_fused(model, CPU, "auto", batch=1, compiled=True)
        assert model.fused is choice.fused is expect
        assert f"{fused_ms:.2f} ms a step fused, 2.00 unfused" in choice.line() and "timed" in choice.line()
