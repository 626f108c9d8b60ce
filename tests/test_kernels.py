"""net/kernels.py: the Triton depthwise conv against F.conv2d, on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1, which conftest.py sets on machines without an NVIDIA GPU), and on CUDA (`cuda` tests).

The interpreter's cost is per program and per operation, not per element: tiny shapes, few programs."""
import copy
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from net import build_model, kernels
from net.kernels import dwconv, dwconv_op, dwconv_reference
from net.model import depthwise_convs

ROOT = Path(__file__).resolve().parents[1]

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
def test_many_programs_and_tiles_cover_every_position_and_channel(monkeypatch):
    """Small blocks: several position blocks, channel blocks and backward tiles, each partly masked."""
    monkeypatch.setitem(kernels.INTERPRETED, "forward", dict(BLOCK_P=8, BLOCK_C=4))
    monkeypatch.setitem(kernels.INTERPRETED, "backward", dict(BLOCK_P=8, BLOCK_C=4))
    # 2 images of 20 positions x 6 outputs: 2 tiles of 12 positions an image (the second ending at the map's
    # edge), each two blocks of 8 (the second cut at the tile's end), x 2 channel blocks
    monkeypatch.setitem(kernels.BACKWARD_PROGRAMS, "interpreter", 4)
    monkeypatch.setattr(kernels, "TILE_ALIGN", 4)
    assert kernels.backward_tiles(2, 6, 20) == (2, 12)
    assert_matches_conv2d(3, 2, 2, torch.channels_last, torch.float32, h=4, w=5)


def test_every_tuning_configuration_fits_the_kernels(monkeypatch):
    """At least three tiles per kernel for autotune; each a whole number of times into a backward tile, with an even
    channel block (the backward adds the two outputs of each input channel side by side); autotune's key names
    kernel arguments (Triton 3.6 would drop a misspelt one silently)."""
    for kind, configs in kernels.TUNING.items():
        assert len(configs) >= 3 and len({tuple(sorted(c.items())) for c in configs}) == len(configs), kind
        for c in configs:
            assert kernels.TILE_ALIGN % c["BLOCK_P"] == 0 and c["BLOCK_C"] % 2 == 0, (kind, c)
        assert set(kernels.AUTOTUNE_KEY) <= set(inspect.signature(kernels.KERNELS[kind]).parameters), kind
    monkeypatch.setattr(kernels, "interpreting", lambda: False)  # the grids planned on CUDA
    assert kernels.backward_tiles(512, 256, 1024) == (1, 1024)  # the widest layer at batch 512: programs enough
    assert kernels.backward_tiles(8, 32, 1024) == (16, 64)


@pytest.mark.skipif(not kernels.interpreting(), reason=INTERPRETER_OFF)
def test_autotune_picks_a_tile_per_shape_and_reports_it(monkeypatch):
    """The CUDA path's autotune, run in the interpreter: Triton's own Autotuner over TUNING, with its timing (CUDA
    events) replaced by a stand-in that prefers the widest channel block; every pick still computes the conv."""
    from triton.runtime.autotuner import Autotuner

    def fake_bench(self, *args, config, **meta):
        return [1.0 / (config.kwargs["BLOCK_C"] * config.kwargs["BLOCK_P"] + config.num_warps)] * 3

    monkeypatch.setattr(Autotuner, "_bench", fake_bench)
    tuners = {kind: kernels.autotuned(kernels._compiled(fn, True), kind) for kind, fn in kernels.KERNELS.items()}
    monkeypatch.setattr(kernels, "_autotuners", tuners)
    monkeypatch.setattr(kernels, "interpreting", lambda: False)  # the CUDA launcher, on interpreted kernels
    assert_matches_conv2d(4, 2, 3, torch.channels_last, torch.float32, n=2, h=5, w=6)
    picked = kernels.tiles()
    widest = {kind: max(c, key=lambda c: (c["BLOCK_C"] * c["BLOCK_P"], c["num_warps"]))
              for kind, c in kernels.TUNING.items()}
    for kind in kernels.KERNELS:
        assert picked[kind] == {"4->8 5x6 d3 NHWC float32, batch 2":
                                "{BLOCK_P}x{BLOCK_C}, {num_warps} warps".format(**widest[kind])}, kind


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


SIDE_TRITON = "3.6.0"  # the Triton that the lent GPU's torch 2.11 brings


def side_triton(version):
    """A folder holding Triton `version` alone, to put first on PYTHONPATH: installed once with pip, kept under
    .cache/ (about 190 MB from the registry the first time); skips where pip cannot install it."""
    target = ROOT / ".cache" / f"triton-{version}"
    if not (target / "triton").is_dir():
        partial = target.with_name(target.name + ".partial")  # renamed when whole: a killed install is redone
        shutil.rmtree(partial, ignore_errors=True)
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(partial),
                            f"triton=={version}"], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"pip could not install triton=={version} (no package registry here?): "
                        f"{(r.stderr.strip().splitlines() or ['no message'])[-1]}")
        partial.rename(target)
    return target


def build_under(triton_version, scope, workers=1):
    """bench.roofline's `build_report(scope)` in a process that builds for the GPU (no TRITON_INTERPRET), under this
    environment's Triton ("pinned") or `triton_version` from a side folder: (Triton's version, the rows)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    if triton_version != "pinned":  # 3.9's default, and 3.6's
        env["PYTHONPATH"] = os.pathsep.join([str(side_triton(triton_version)), str(ROOT)])
    r = subprocess.run([sys.executable, "-c", "import json, triton; from bench.roofline import build_report; "
                        f"print(triton.__version__); print(json.dumps(build_report({scope!r}, {workers!r})))"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    version, rows = r.stdout.splitlines()[-2], json.loads(r.stdout.splitlines()[-1])
    assert triton_version in ("pinned", version), f"Triton {version} ran, not {triton_version}"
    print(f"Triton {version}: " + "; ".join(f"{r['kernel']} {r['tile']} ({r['variant']}) {r['registers']}"
                                           for r in rows))
    spilling = [r for r in rows if r["stack"]]  # local memory: these kernels have no local arrays, so spills
    assert not spilling, (version, spilling)
    return version, rows


@pytest.mark.long
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are built and run for real")
@pytest.mark.parametrize("triton_version", ["pinned", SIDE_TRITON])
def test_the_training_kernels_build_for_an_h100_without_register_spills(triton_version):
    """The built path, which the interpreter does not take (globals, constexprs, layouts, registers), under the
    Triton this environment has and the one the lent GPU has: every kernel a training step launches (the fused
    path and the unfused Triton convs, bf16, the recipe's dropout, channels_last, M 1 and 2) at its first tile, the
    one the start-up check pins, in one process per Triton. Every tile of every variant: the slow test below."""
    version, rows = build_under(triton_version, "training")
    kinds = {r["kernel"] for r in rows}
    assert kinds == {"dw_forward, M 1", "dw_forward, M 2", "dw_backward, M 1", "dw_backward, M 2", "pw_forward",
                     "pw_dgrad", "pw_wgrad", "pool_forward", "pool_backward", "keep_bits", "dwconv_forward_kernel, M 1",
                     "dwconv_forward_kernel, M 2", "dwconv_backward_kernel, M 1", "dwconv_backward_kernel, M 2"}
    assert all(r["registers"] <= 128 for r in rows if not r["kernel"].startswith("keep")), \
        [r for r in rows if r["registers"] > 128]  # the pinned tiles: occupancy to spare


@pytest.mark.slow  # about 180 builds a Triton: three minutes each
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are built and run for real")
@pytest.mark.parametrize("triton_version", ["pinned", SIDE_TRITON])
def test_every_tile_of_every_variant_builds_without_register_spills(triton_version):
    """Every tile autotune may pick (TUNING, both modules), in every variant a step can launch: M 1 and 2, bf16 and
    fp32 (the start-up check, gpu-check), dropout on and off, both layouts of the unfused convs; none spills, and each
    kernel has a tile at 128 registers or fewer in every bf16 variant."""
    version, rows = build_under(triton_version, "all", workers=None)  # a process per core: CI runs it apart
    for kernel in {r["kernel"] for r in rows}:
        bf16 = [r for r in rows if r["kernel"] == kernel and "bfloat16" in r["variant"]]
        worst = {}
        for r in bf16:
            worst[r["tile"]] = max(worst.get(r["tile"], 0), r["registers"])
        assert min(worst.values()) <= 128, (version, kernel, worst)
    for kind in kernels.TUNING:
        assert {r["tile"] for r in rows if r["kernel"].startswith(f"dwconv_{kind}")} == \
            {"{BLOCK_P}x{BLOCK_C}, {num_warps} warps".format(**t) for t in kernels.TUNING[kind]}
