"""net/kernels.py: the Triton depthwise conv against F.conv2d, on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1, which conftest.py sets on machines without an NVIDIA GPU), and on CUDA (`cuda` tests).

The interpreter's cost is per program and per operation, not per element: tiny shapes, few programs."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from net import build_model, kernels
from net.kernels import dwconv, dwconv_op, dwconv_reference
from net.model import depthwise_convs

pytestmark = pytest.mark.skipif(not kernels.HAVE_TRITON, reason="needs Triton (pip install -e '.[test]')")
INTERPRETER_OFF = "Triton's interpreter is off: a GPU machine (the `cuda` tests run the kernels there)"

# (input channels, outputs per input channel, dilation) of each depthwise and grouped conv of the model
MODEL_CONVS = {name: (m.in_channels, m.out_channels // m.in_channels, m.dilation[0])
               for name, m in depthwise_convs(build_model()).items()}
LAYOUTS = {"NHWC": torch.channels_last, "NCHW": torch.contiguous_format}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}  # relative to the largest value


def conv_and_grads(fn, x, weight, dilation, dy):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    y = fn(x, weight, dilation)
    return (y, *torch.autograd.grad(y, (x, weight), dy))


def assert_matches_conv2d(c, m, dilation, layout, dtype, n=2, h=7, w=9, seed=0, device="cpu"):
    """Output, input gradient and weight gradient of the kernels against fp32 F.conv2d on the same values."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen).to(device, dtype).contiguous(memory_format=layout)
    weight = torch.randn(c * m, 1, 3, 3, generator=gen).to(device, dtype)
    dy = torch.randn(n, c * m, h, w, generator=gen).to(device, dtype).contiguous(memory_format=layout)
    got = conv_and_grads(dwconv_op, x, weight, dilation, dy)
    want = conv_and_grads(dwconv_reference, x.float(), weight.float(), dilation, dy.float())
    for name, a, b in zip(("output", "input gradient", "weight gradient"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        error = ((a.float() - b).abs().max() / b.abs().max()).item()
        assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.2e}"
    for name, a in zip(("output", "input gradient"), got[:2]):  # the layout F.conv2d gives
        assert a.is_contiguous(memory_format=layout), f"{name} is not in the input's layout"


@pytest.mark.skipif(not kernels.interpreting(), reason=INTERPRETER_OFF)
@pytest.mark.parametrize("layer", MODEL_CONVS)
def test_every_depthwise_conv_of_the_model_matches_conv2d_in_both_layouts(layer):
    c, m, dilation = MODEL_CONVS[layer]
    assert_matches_conv2d(c, m, dilation, torch.channels_last, torch.bfloat16, n=1)  # as the trainer runs it
    assert_matches_conv2d(c, m, dilation, torch.contiguous_format, torch.float32, n=1)


@pytest.mark.skipif(not kernels.interpreting(), reason=INTERPRETER_OFF)
@pytest.mark.parametrize("dilation, m, layout", [(1, 1, "NHWC"), (2, 2, "NCHW"), (3, 1, "NCHW"), (4, 2, "NHWC"),
                                                 (5, 2, "NCHW")])  # each dilation; each M in both layouts
def test_every_dilation_on_odd_sizes(dilation, m, layout):
    assert_matches_conv2d(3, m, dilation, LAYOUTS[layout], torch.float32, n=2, h=5, w=11)


@pytest.mark.skipif(not kernels.interpreting(), reason=INTERPRETER_OFF)
def test_fp16_in_and_out():
    assert_matches_conv2d(5, 2, 2, torch.channels_last, torch.float16)


@pytest.mark.skipif(not kernels.interpreting(), reason=INTERPRETER_OFF)
def test_many_programs_and_chunks_cover_every_position_and_channel(monkeypatch):
    """Small tiles: several position blocks, channel blocks and backward chunks, each partly masked."""
    small = dict(BLOCK_P=8, BLOCK_C=4, num_warps=1)
    monkeypatch.setitem(kernels.BLOCKS, "cpu", {"forward": small, "backward": small})
    # 2 images x 3 position blocks (20 positions) x 2 channel blocks (6 outputs): 2 chunks a program,
    # the second program of each image holding one block and one past the map
    monkeypatch.setattr(kernels, "BACKWARD_PROGRAMS", 6)
    assert_matches_conv2d(3, 2, 2, torch.channels_last, torch.float32, h=4, w=5)


@pytest.mark.skipif(not kernels.interpreting(), reason=INTERPRETER_OFF)
def test_the_ops_pass_torch_library_opcheck():
    """Schema, autograd registration, fake (meta) implementation against the real one, and AOT dispatch."""
    x = torch.randn(2, 4, 5, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(8, 1, 3, 3, requires_grad=True)
    torch.library.opcheck(dwconv_op, (x, weight, 2))


@pytest.mark.skipif(not kernels.interpreting(), reason=INTERPRETER_OFF)
def test_under_autocast_it_runs_at_the_autocast_dtype_as_conv2d_does():
    x, weight = torch.randn(2, 4, 6, 6), torch.randn(4, 1, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dwconv(x, weight, 1).dtype == dwconv_reference(x, weight, 1).dtype == torch.bfloat16


@pytest.mark.skipif(not kernels.interpreting(), reason=INTERPRETER_OFF)
def test_what_the_kernels_do_not_cover_goes_to_conv2d(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "dwconv_op", lambda *args: calls.append(args))
    x = torch.randn(2, 4, 6, 6)
    for weight in (torch.randn(12, 1, 3, 3), torch.randn(4, 1, 5, 5)):  # 3 outputs per channel; a 5x5 kernel
        torch.testing.assert_close(dwconv(x, weight, 1), dwconv_reference(x, weight, 1))
    monkeypatch.delenv("TRITON_INTERPRET")  # a CPU outside the interpreter
    torch.testing.assert_close(dwconv(x, weight := torch.randn(4, 1, 3, 3), 1), dwconv_reference(x, weight, 1))
    assert calls == []


@pytest.mark.skipif(not kernels.interpreting(), reason=INTERPRETER_OFF)
def test_a_model_run_by_the_kernels_equals_the_torch_model_forward_and_backward():
    torch.manual_seed(0)
    model = build_model(dropout=0.0)  # dropout's draws would differ between the two passes
    fast = copy.deepcopy(model)
    for conv in depthwise_convs(fast).values():
        conv.impl = "triton"
    assert fast.state_dict().keys() == model.state_dict().keys()  # the same parameters and buffers, by name
    x = torch.randn(1, 3, 6, 6).contiguous(memory_format=torch.channels_last)  # one image: one program a kernel
    losses = [F.cross_entropy(m(x), torch.tensor([3])) for m in (model, fast)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not kernels.interpreting(), reason=INTERPRETER_OFF)
def test_torch_compile_sees_one_op_each_way_and_no_graph_break():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8, 1, 3, 3))

        def forward(self, x):
            return torch.relu(dwconv(x, self.weight, 2)).sum()

    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    block = Block()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)  # a graph break raises
    x = torch.randn(2, 4, 6, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    compiled(x).backward()
    got = x.grad, block.weight.grad
    x.grad, block.weight.grad = None, None
    block(x).backward()
    torch.testing.assert_close(got, (x.grad, block.weight.grad))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1


@pytest.mark.cuda
@pytest.mark.skipif(kernels.interpreting(), reason="TRITON_INTERPRET=1: Triton builds nothing in this process")
def test_on_cuda_every_depthwise_conv_of_the_model_matches_conv2d():
    for c, m, dilation in MODEL_CONVS.values():
        for layout in LAYOUTS.values():
            for dtype in (torch.bfloat16, torch.float32):
                assert_matches_conv2d(c, m, dilation, layout, dtype, n=8, h=32, w=32, device="cuda")


def ptxas_report(fn, args, constexprs, num_warps):
    """What ptxas says of `fn` built for an H100 (sm_90a) with `args` (name -> value; a string is a pointer's
    dtype), each int specialised as Triton's launcher would (1: a constant; a multiple of 16: divisible)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    signature, constants, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(inspect.signature(fn).parameters):
        value = args.get(name)
        if name in constexprs or value == 1:
            signature[name], constants[name] = "constexpr", constexprs.get(name, value)
        else:
            signature[name] = value if isinstance(value, str) else "i32"
            if isinstance(value, str) or value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    build = triton.compile(ASTSource(kernels._compiled(fn, interpreted=False), signature, constexprs=constants,
                                     attrs=attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    r = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", "-", "-o", "/dev/null"], input=build.asm["ptx"],
                       capture_output=True, text=True)
    return r.stderr if r.returncode == 0 else f"ptxas failed: {r.stderr}"


def gpu_build_reports():
    """ptxas's report on both kernels at the model's widest shapes, bf16 channels_last, C -> 2C (the larger
    case), the GPU tile sizes. Run without TRITON_INTERPRET: Triton builds nothing in a process that has it."""
    c, h, w = 128, 32, 32
    nhwc = dict(sxn=h * w * c, sxc=1, sxh=w * c, sxw=c)
    grouped = dict(syn=h * w * 2 * c, syc=1, syh=w * 2 * c, syw=2 * c)
    forward = dict(x="*bf16", w="*bf16", y="*bf16", C_out=2 * c, H=h, W=w, DIL=4, **nhwc, **grouped)
    backward = dict(x="*bf16", w="*bf16", dy="*bf16", dx="*bf16", dw_partial="*fp32", C_out=2 * c, H=h, W=w, DIL=4,
                    CHUNKS=8, **nhwc, **grouped, **{k.replace("sx", "sd"): v for k, v in nhwc.items()})
    reports = {}
    for kind, fn, args in (("forward", kernels._dwconv_forward_kernel, forward),
                           ("backward", kernels._dwconv_backward_kernel, backward)):
        blocks = dict(kernels.BLOCKS["cuda"][kind])
        num_warps = blocks.pop("num_warps")
        reports[kind] = ptxas_report(fn, args, {"M": 2, **blocks}, num_warps)
    return reports


@pytest.mark.long
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are built and run for real")
def test_the_gpu_build_compiles_for_an_h100_and_spills_no_registers():
    """The built path, which the interpreter does not take (globals, constexprs, layouts, registers)."""
    # 3.9's default
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    r = subprocess.run([sys.executable, "-c", "import json; from tests.test_kernels import gpu_build_reports; "
                        "print(json.dumps(gpu_build_reports()))"], capture_output=True, text=True, env=env,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    for kind, report in json.loads(r.stdout.splitlines()[-1]).items():
        assert "Used" in report and "0 bytes spill stores" in report and "0 bytes spill loads" in report, (kind, report)
